"""create_model: a registered architecture, built with one attention backend, optionally loaded from checkpoints."""
from __future__ import annotations

from typing import Optional, Union

import torch

from .attention import Attend, resolve_backend
from .clip import CLIP
from .registry import CLIPCfg, cfg_from_dict, get_model_config
from .text import TextTransformer
from .vision import EVAVisionTransformer


def create_model(name: Union[str, CLIPCfg], pretrained: Optional[str] = None, *, image_init: Optional[str] = None,
                 text_init: Optional[str] = None, attn_backend: str = "auto", token_drop: float = 0.0,
                 grad_checkpointing: bool = False, device: Optional[Union[str, torch.device]] = None,
                 **overrides) -> CLIP:
    """Build a CLIP model by name (see ``list_models()``); overrides are architecture fields (``vision.depth=4``).

    ``pretrained`` loads a whole-CLIP checkpoint, ``image_init`` / ``text_init`` one tower, in any supported format
    (see ``evaclip.models.convert``), strictly. The attention backend is resolved once, here.
    """
    cfg = get_model_config(name, **overrides)
    backend = resolve_backend(attn_backend, device)
    model = CLIP(cfg, Attend(backend), token_drop=token_drop)
    if pretrained or image_init or text_init:
        from .convert import load_pretrained

        load_pretrained(model, pretrained=pretrained, image_init=image_init, text_init=text_init)
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    if device is not None:
        model.to(device)
    return model


def build_tower(cfg: Union[str, CLIPCfg, dict], tower: str, attn_backend: str = "sdpa",
                device: Optional[Union[str, torch.device]] = None) -> torch.nn.Module:
    """One tower alone (``"visual"`` or ``"text"``), e.g. for an exported encoder; its parameter names are the ones
    under ``visual.`` / ``text.`` in the whole model. ``cfg`` is a registered name, a CLIPCfg or its dict form."""
    if tower not in ("visual", "text"):
        raise ValueError(f"tower must be 'visual' or 'text', got {tower!r}")
    cfg = cfg_from_dict(cfg) if isinstance(cfg, dict) else get_model_config(cfg)
    attend = Attend(resolve_backend(attn_backend, device))
    module = EVAVisionTransformer(cfg.vision, cfg.embed_dim, attend) if tower == "visual" else \
        TextTransformer(cfg.text, cfg.embed_dim, attend)
    return module.to(device) if device is not None else module
