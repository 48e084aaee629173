"""Standalone image / text encoders exported by ``evaclip export``: load one tower without the training code.

Shapes: B batch, C channels, H/W image height/width, L context length, E embedding dim, P patches, D tower width.

An encoder folder holds ``config.json`` (format, tower, architecture, embed dim, image size, mean/std or tokenizer and
context length, and the tower's full architecture config) beside ``model.safetensors`` and/or ``model.onnx``::

    enc = evaclip.load_encoder("export/image", "image")
    feats_BE = enc(enc.preprocess(pil_image)[None], normalize=True)
    patches_BPD = enc.patch_features(enc.preprocess(pil_image)[None], layer=-2)  # LLaVA-style: penultimate, no CLS
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

ENCODER_FORMAT = "evaclip-encoder"
ENCODER_FORMAT_VERSION = 1
TOWERS = ("image", "text")
CLIP_BPE = "clip-bpe"  # the OpenAI CLIP byte-pair tokenizer (open_clip.SimpleTokenizer)


class _Encoder(nn.Module):
    """One tower and its ``config.json``: ``inputs -> features_BE`` (projected to the shared embedding space)."""

    def __init__(self, tower: nn.Module, config: dict):
        super().__init__()
        self.tower = tower
        self.config = config

    def forward(self, inputs: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        f_BE = self.tower(inputs)
        return F.normalize(f_BE, dim=-1) if normalize else f_BE


class ImageEncoder(_Encoder):
    """The image tower: ``images_BCHW -> features_BE``."""

    @property
    def preprocess(self) -> Callable:
        """The eval transform the model was trained for (PIL image -> CHW tensor), from open_clip."""
        from open_clip.transform import image_transform

        c = self.config
        return image_transform(c["image_size"], is_train=False, mean=tuple(c["mean"]), std=tuple(c["std"]),
                               interpolation=c.get("interpolation"), resize_mode=c.get("resize_mode"))


    def patch_features(self, images_BCHW: torch.Tensor, layer: int = -1, norm: bool = False,
                       prefix: bool = False) -> torch.Tensor:
        """Per-patch tokens of block ``layer`` (negative from the end), B x P x D, for a multimodal model: LLaVA-style
        ``layer=-2, norm=False`` (penultimate block, CLS dropped); the last block ``layer=-1`` without or with
        (``norm=True``) the final norm; ``prefix=True`` keeps the CLS token first. Not projected (width D, not E)."""
        return self.tower.patch_tokens(images_BCHW, layer, norm=norm, prefix=prefix)


class TextEncoder(_Encoder):
    """The text tower: ``tokens_BL -> features_BE``."""

    @property
    def tokenizer(self) -> Callable:
        """``list[str] -> tokens_BL`` as in training (open_clip's tokenizer of the architecture)."""
        import open_clip

        name = self.config.get("tokenizer", CLIP_BPE)
        # CLIP_BPE is open_clip's default SimpleTokenizer (what every EVA-CLIP text tower uses); other values are
        # open_clip tokenizer names (e.g. 'hf-hub:...')
        return open_clip.get_tokenizer("" if name == CLIP_BPE else name, context_length=self.config["context_length"])


def read_encoder_config(path: Union[str, Path], tower: Optional[str] = None) -> dict:
    """Read and check an encoder folder's ``config.json``; errors name the file and what is wrong."""
    path = Path(path)
    f = path / "config.json"
    if not f.is_file():
        raise FileNotFoundError(f"{path} is not an exported encoder folder: {f.name} is missing "
                                "(create one with `evaclip export CKPT --out DIR --format safetensors`)")
    cfg = json.loads(f.read_text())
    if cfg.get("format") != ENCODER_FORMAT:
        raise ValueError(f"{f} is not an evaclip encoder config (format={cfg.get('format')!r})")
    if cfg.get("format_version", 0) > ENCODER_FORMAT_VERSION:
        raise ValueError(f"{f} has format_version {cfg['format_version']}; this evaclip reads up to "
                         f"{ENCODER_FORMAT_VERSION}: upgrade evaclip")
    if tower is not None and cfg.get("tower") != tower:
        raise ValueError(f"{path} holds the {cfg.get('tower')} encoder, not the {tower} encoder")
    return cfg


def build_tower(model_cfg: dict, tower: str, attn_backend: str = "sdpa", kind: str = "clip") -> nn.Module:
    """One tower (``image`` or ``text``) of the architecture ``model_cfg`` (a ``CLIPCfg`` as a dict), weights
    uninitialised-but-valid; only the model definitions are imported. ``kind="lcl"``: an LCL model's image tower +
    pooler (pooled latent) or its LM read at ``<boi>`` (``evaclip.models.lcl.LCLImageTower`` / ``LCLTextTower``)."""
    from evaclip.models.attention import Attend, resolve_backend
    from evaclip.models.registry import TextCfg, VisionCfg

    attend = Attend(resolve_backend(attn_backend))
    if kind == "lcl":
        from evaclip.models.lcl import LCLImageTower, LCLTextTower
        from evaclip.models.registry import cfg_from_dict

        cfg = cfg_from_dict(model_cfg)
        return LCLImageTower.build(cfg, attend) if tower == "image" else LCLTextTower.build(cfg, attend)
    if kind != "clip":
        raise ValueError(f"unknown encoder kind {kind!r} (this evaclip builds 'clip' and 'lcl' encoders)")
    if tower == "image":
        from evaclip.models.towers import vision_tower

        return vision_tower(VisionCfg(**model_cfg["vision"]), model_cfg["embed_dim"], attend)
    from evaclip.models.text import TextTransformer

    return TextTransformer(TextCfg(**model_cfg["text"]), model_cfg["embed_dim"], attend)


def _resolve_dir(path: Path, tower: str) -> Path:
    # accept the export root (holding image/ and text/) as well as the tower folder itself
    if not (path / "config.json").is_file() and (path / tower / "config.json").is_file():
        return path / tower
    return path


def load_encoder(path: Union[str, Path], tower: str = "image", device: Union[str, torch.device] = "cpu",
                 dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Load an exported encoder (``ImageEncoder`` or ``TextEncoder``) from its folder or the export root.

    Builds only that tower (architecture from ``config.json``), loads ``model.safetensors`` strictly and returns it in
    eval mode. Attention uses PyTorch SDPA (portable: no flash_attn needed).
    """
    if tower not in TOWERS:
        raise ValueError(f"tower must be one of {TOWERS}, got {tower!r}")
    path = _resolve_dir(Path(path), tower)
    cfg = read_encoder_config(path, tower)
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing (only an ONNX export here? run it with onnxruntime: "
                                f"{path / 'model.onnx'})")
    from safetensors.torch import load_file

    enc = (ImageEncoder if tower == "image" else TextEncoder)(build_tower(cfg["model_cfg"], tower,
                                                                          kind=cfg.get("kind", "clip")), cfg)
    sd = load_file(str(weights))
    missing, unexpected = enc.tower.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights} does not match the architecture in config.json: missing {sorted(missing)[:8]}, "
                         f"unexpected {sorted(unexpected)[:8]}")
    return enc.to(device=device, dtype=dtype).eval()
