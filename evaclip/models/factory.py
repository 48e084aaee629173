"""create_model: a registered architecture, built with one attention backend, optionally loaded from checkpoints."""
from __future__ import annotations

import logging
from typing import Optional, Union

import torch

from .attention import Attend, normalize_precision, resolve_backend
from .clip import CLIP
from .registry import CLIPCfg, cfg_from_dict, get_model_config
from .text import TextTransformer
from .towers import vision_tower

Device = Optional[Union[str, torch.device]]
Precision = Union[str, torch.dtype, None]


def _attend(attn_backend: str, device: Device, precision: Precision) -> Attend:
    """The attention module for a model that will run on ``device`` (None: where tensors are created now, the CPU
    unless a ``torch.device`` context says otherwise) in ``precision``."""
    if device is None:
        device = torch.get_default_device()
    precision = normalize_precision(precision)
    return Attend(resolve_backend(attn_backend, device, precision), requested=attn_backend, precision=precision)


def create_model(name: Union[str, CLIPCfg], pretrained: Optional[str] = None, *, image_init: Optional[str] = None,
                 text_init: Optional[str] = None, attn_backend: str = "auto", token_drop: float = 0.0,
                 grad_checkpointing: bool = False, device: Device = None, precision: Precision = "fp32",
                 **overrides) -> CLIP:
    """Build a CLIP model by name (see ``list_models()``); overrides are architecture fields (``vision.depth=4``).

    ``pretrained`` loads a whole-CLIP checkpoint, ``image_init`` / ``text_init`` one tower, in any supported format
    (see ``evaclip.models.convert``), strictly.

    ``device``: where the model will run; it is moved there. None keeps it on the CPU (never "CUDA if there is one").
    ``precision``: the run's compute precision, ``fp32`` | ``bf16`` | ``fp16`` (or a torch dtype; bf16/fp16 = the
    autocast dtype). ``attn_backend="auto"`` is flash_attn only on a CUDA device with a working flash kernel and a
    bf16/fp16 run, SDPA otherwise; an explicit ``flash_attn`` with fp32 raises FlashPrecisionError (a ValueError).
    An ``auto`` backend is resolved again when the model is moved (``model.to(device)``).
    """
    cfg = get_model_config(name, **overrides)
    model = CLIP(cfg, _attend(attn_backend, device, precision), token_drop=token_drop)
    if pretrained or image_init or text_init:
        from .convert import load_pretrained

        report = load_pretrained(model, pretrained=pretrained, image_init=image_init, text_init=text_init)
        # what the init did, in one place for every caller (training logs it; dropped / fresh keys are expected ones)
        log = logging.getLogger("evaclip.models")
        log.info("loaded %s: dropped %d known-ignorable keys %s, adapted %s, fresh %s, fresh with their own init %s",
                 report.formats, len(report.ignored), sorted(report.ignored)[:6], sorted(report.adapted),
                 sorted(report.fresh)[:8], report.reinit or "none")
        for note in report.notes:
            log.info("init: %s", note)
        # a projection dropped for its width is new: a locked tower keeps it trainable (optim.lock_towers reads this)
        model.unlocked_params = {k for k in report.fresh
                                 if k == "text.text_projection" and "text_init" in report.formats}
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    if device is not None:
        model.to(device)
    return model


def build_tower(cfg: Union[str, CLIPCfg, dict], tower: str, attn_backend: str = "sdpa", device: Device = None,
                precision: Precision = "fp32") -> torch.nn.Module:
    """One tower alone (``"visual"`` or ``"text"``), e.g. for an exported encoder; its parameter names are the ones
    under ``visual.`` / ``text.`` in the whole model. ``cfg`` is a registered name, a CLIPCfg or its dict form.
    ``device`` and ``precision`` as in ``create_model``."""
    if tower not in ("visual", "text"):
        raise ValueError(f"tower must be 'visual' or 'text', got {tower!r}")
    cfg = cfg_from_dict(cfg) if isinstance(cfg, dict) else get_model_config(cfg)
    attend = _attend(attn_backend, device, precision)
    module = vision_tower(cfg.vision, cfg.embed_dim, attend) if tower == "visual" else \
        TextTransformer(cfg.text, cfg.embed_dim, attend)
    return module.to(device) if device is not None else module
