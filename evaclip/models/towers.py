"""Which image tower a ``VisionCfg`` describes: an EVA ViT (``vision.py``) or a tower built by timm (``timm_vision.py``,
ViTamin). The one place that chooses, for ``CLIP``, ``build_tower`` and exported encoders."""
from __future__ import annotations

from torch import nn

from .attention import Attend
from .registry import VisionCfg


def is_timm_tower(cfg: VisionCfg) -> bool:
    """True when the image tower is built by timm (``vision.timm_model`` set): a hybrid with conv stages (ViTamin)."""
    return bool(cfg.timm_model)


def vision_tower(cfg: VisionCfg, embed_dim: int, attend: Attend, token_drop: float = 0.0) -> nn.Module:
    """The image tower of ``cfg``: ``images_BCHW -> B x embed_dim``. ``attend`` is used by EVA towers; timm towers
    run timm's own attention (PyTorch SDPA)."""
    if is_timm_tower(cfg):
        from .timm_vision import TimmVisionTower

        return TimmVisionTower(cfg, embed_dim, token_drop)
    from .vision import EVAVisionTransformer

    return EVAVisionTransformer(cfg, embed_dim, attend, token_drop)
