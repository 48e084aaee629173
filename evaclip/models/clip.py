"""The CLIP wrapper: image tower + text tower + logit scale, and the hooks the optimizer reads.

Shapes: B batch, E embed dim.
"""
from __future__ import annotations

import re
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attend
from .registry import CLIPCfg
from .text import TextTransformer
from .towers import vision_tower


class CLIPOutput(NamedTuple):
    image_features: torch.Tensor  # B x E, L2-normalised
    text_features: torch.Tensor  # B x E, L2-normalised
    logit_scale: torch.Tensor  # scalar, exponentiated
    logit_bias: Optional[torch.Tensor] = None  # scalar (SigLIP), else None


_EMBED = re.compile(r"^(visual\.(patch_embed|cls_token|pos_embed)|text\.(token_embedding|positional_embedding))")
_BLOCK = re.compile(r"^(?:visual\.blocks|text\.transformer\.resblocks)\.(\d+)\.")
_NO_WD = re.compile(r"(^|\.)(pos_embed|cls_token|positional_embedding|logit_scale|logit_bias)$")


class CLIP(nn.Module):
    def __init__(self, cfg: CLIPCfg, attend: Attend, token_drop: float = 0.0):
        super().__init__()
        self.cfg = cfg
        self.visual = vision_tower(cfg.vision, cfg.embed_dim, attend, token_drop)
        self.text = TextTransformer(cfg.text, cfg.embed_dim, attend)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        self.logit_bias = None
        if cfg.init_logit_bias is not None:
            self.logit_bias = nn.Parameter(torch.tensor(float(cfg.init_logit_bias)))

    @property
    def attn_backend(self) -> str:
        return self.text.transformer.resblocks[0].attn.attend.backend  # the one both towers share (EVA image towers)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

    def encode_image(self, images_BCHW: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        f = self.visual(images_BCHW)
        return F.normalize(f, dim=-1) if normalize else f

    def encode_patches(self, images_BCHW: torch.Tensor, layer: int = -1, norm: bool = False,
                       prefix: bool = False) -> torch.Tensor:
        """Per-patch tokens of image-tower block ``layer``, B x P x D (see ``EVAVisionTransformer.patch_tokens``):
        ``layer=-2`` for LLaVA-style features, ``layer=-1`` (``norm=True`` for the final norm) for the last block."""
        return self.visual.patch_tokens(images_BCHW, layer, norm=norm, prefix=prefix)

    def encode_text(self, tokens_BL: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        f = self.text(tokens_BL)
        return F.normalize(f, dim=-1) if normalize else f

    def forward(self, images_BCHW: Optional[torch.Tensor] = None, tokens_BL: Optional[torch.Tensor] = None):
        img = self.encode_image(images_BCHW, normalize=True) if images_BCHW is not None else None
        txt = self.encode_text(tokens_BL, normalize=True) if tokens_BL is not None else None
        return CLIPOutput(img, txt, self.logit_scale.exp(), self.logit_bias)

    # --- hooks for the optimizer ---------------------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        """Parameters that take no weight decay: 1-D tensors (norms, biases), position embeddings, CLS, logit scale;
        an image tower with its own rule (timm towers: ViTamin decays ``pos_embed``, as upstream) decides for itself."""
        own = getattr(self.visual, "no_weight_decay", None)
        out = {n for n, p in self.named_parameters() if p.ndim <= 1 or n.endswith(".bias") or _NO_WD.search(n)}
        if own is None:
            return out
        return {n for n in out if not n.startswith("visual.")} | {f"visual.{n}" for n in own()}

    def weight_decay_names(self) -> set[str]:
        """Parameters that take weight decay although their names read as embeddings (``pos_embed``): the image
        tower's own rule overrides the optimizer's name-based exclusions for them."""
        if getattr(self.visual, "no_weight_decay", None) is None:
            return set()
        no_wd = self.no_weight_decay()
        return {n for n, _ in self.named_parameters() if n.startswith("visual.") and n not in no_wd}

    @staticmethod
    def param_tower(name: str) -> str:
        """``visual``, ``text`` or ``other`` (logit scale / bias)."""
        name = name.removeprefix("module.")
        return "visual" if name.startswith("visual.") else "text" if name.startswith("text.") else "other"

    def num_layers(self, tower: str) -> int:
        """Depth L of a tower (0 for ``other``); a timm image tower counts its conv stages too."""
        if tower == "visual" and hasattr(self.visual, "num_layers"):
            return self.visual.num_layers()
        return {"visual": self.cfg.vision.depth, "text": self.cfg.text.layers}.get(tower, 0)

    def layer_id(self, name: str) -> int:
        """EVA-CLIP's layer ids: 0 embeddings, i+1 for block i, L+1 for final norms, heads and projections (a timm
        image tower: its own ids, stem / conv stages / blocks, see ``TimmVisionTower.layer_id``)."""
        name = name.removeprefix("module.")
        if name.startswith("visual.") and hasattr(self.visual, "layer_id"):
            return self.visual.layer_id(name[len("visual."):])
        if _EMBED.match(name):
            return 0
        m = _BLOCK.match(name)
        if m:
            return int(m.group(1)) + 1
        return self.num_layers(self.param_tower(name)) + 1
