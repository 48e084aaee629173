"""OpenAI CLIP's ViT image tower (also open_clip's non-timm ``VisionTransformer``), as a frozen MIM teacher.

EVA-01 distils OpenAI CLIP-L/14: its targets are the tower's patch tokens with the CLS token dropped, through
``ln_post`` and ``@ proj``, per token, not normalised (baaivision/EVA, EVA-01/eva/clip/model.py,
``VisionTransformer.forward``). ``OpenAIVisionTower.patch_targets`` computes exactly that. The architecture is read
off the weights as OpenAI's ``build_model`` does (width from ``conv1``, layers from the blocks, patch from the kernel,
image size from the position grid, heads = width // 64); the activation is not in the weights: QuickGELU for OpenAI's
models, GELU for open_clip models trained without ``-quickgelu``.

Keys (OpenAI's, under ``visual.`` in a whole-CLIP file, or bare): ``conv1.weight`` (no bias), ``class_embedding``,
``positional_embedding``, ``ln_pre``, ``transformer.resblocks.i.{ln_1, attn.in_proj_weight, attn.in_proj_bias,
attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}`` (+ open_clip's LayerScale ``ls_1.gamma`` / ``ls_2.gamma``), ``ln_post``,
``proj``. Shapes: see the legend in docs/ARCHITECTURE.md (B batch, N tokens, P patches, D width, H heads, F head dim,
T the CLIP embedding size).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Act = Literal["quick_gelu", "gelu"]
_PREFIX = "visual."
_BLOCK_KEY = ".attn.in_proj_weight"


@dataclass
class OpenAIVisionCfg:
    """The geometry of an OpenAI-layout ViT, as read off its weights."""

    image_size: int
    patch_size: int
    width: int
    depth: int
    heads: int
    embed_dim: int
    layer_scale: bool = False
    act: Act = "quick_gelu"

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


def is_openai_vit(sd: dict) -> bool:
    """Whether a state dict holds an OpenAI-layout ViT image tower (``visual.conv1`` + ``visual.transformer``; OpenAI's
    release layout and open_clip's non-timm ViTs), under ``visual.`` or bare."""
    for p in (_PREFIX, ""):
        if f"{p}conv1.weight" in sd and f"{p}transformer.resblocks.0{_BLOCK_KEY}" in sd and f"{p}proj" in sd:
            return True
    return False


def openai_visual_part(sd: dict) -> dict:
    """The image-tower keys of an OpenAI-layout file, relative to the tower (``visual.`` stripped)."""
    if f"{_PREFIX}conv1.weight" in sd:
        return {k[len(_PREFIX):]: v for k, v in sd.items() if k.startswith(_PREFIX)}
    return dict(sd)


def openai_vision_cfg(visual: dict, act: Act = "quick_gelu") -> OpenAIVisionCfg:
    """The architecture from the tower's weights, by OpenAI's ``build_model`` rules (EVA-01/eva/clip/model.py:438-442
    and :307, ``vision_heads = vision_width // 64``)."""
    if act not in ("quick_gelu", "gelu"):
        raise ValueError(f"act must be 'quick_gelu' or 'gelu', got {act!r}")
    width, _, patch, _ = visual["conv1.weight"].shape
    depth = len([k for k in visual if k.startswith("transformer.resblocks.") and k.endswith(_BLOCK_KEY)])
    grid = math.isqrt(visual["positional_embedding"].shape[0] - 1)
    return OpenAIVisionCfg(image_size=patch * grid, patch_size=patch, width=width, depth=depth, heads=width // 64,
                           embed_dim=visual["proj"].shape[1],
                           layer_scale="transformer.resblocks.0.ls_1.gamma" in visual, act=act)


class _LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class _Attention(nn.Module):
    """``nn.MultiheadAttention``'s parameters (``in_proj_weight`` 3D x D, ``in_proj_bias``, ``out_proj``) computed with
    SDPA, batch first."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x_BND: torch.Tensor) -> torch.Tensor:
        B, N, D = x_BND.shape
        qkv = F.linear(x_BND, self.in_proj_weight, self.in_proj_bias).view(B, N, 3, self.heads, D // self.heads)
        q_BHNF, k_BHNF, v_BHNF = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out_BHNF = F.scaled_dot_product_attention(q_BHNF, k_BHNF, v_BHNF)
        return self.out_proj(out_BHNF.transpose(1, 2).reshape(B, N, D))


class _ResBlock(nn.Module):
    def __init__(self, cfg: OpenAIVisionCfg):
        super().__init__()
        D = cfg.width
        self.ln_1, self.ln_2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.attn = _Attention(D, cfg.heads)
        self.mlp = nn.Module()
        self.mlp.c_fc, self.mlp.c_proj = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)
        self.quick = cfg.act == "quick_gelu"
        self.ls_1 = _LayerScale(D) if cfg.layer_scale else nn.Identity()
        self.ls_2 = _LayerScale(D) if cfg.layer_scale else nn.Identity()

    def forward(self, x_BND: torch.Tensor) -> torch.Tensor:
        x_BND = x_BND + self.ls_1(self.attn(self.ln_1(x_BND)))
        h = self.mlp.c_fc(self.ln_2(x_BND))
        h = h * torch.sigmoid(1.702 * h) if self.quick else F.gelu(h)  # OpenAI's QuickGELU, or open_clip's GELU
        return x_BND + self.ls_2(self.mlp.c_proj(h))


class OpenAIVisionTower(nn.Module):
    """OpenAI CLIP's ViT image tower (parameter names as the release, relative to ``visual.``)."""

    num_prefix = 1

    def __init__(self, cfg: OpenAIVisionCfg):
        super().__init__()
        self.cfg = cfg
        D = cfg.width
        self.conv1 = nn.Conv2d(3, D, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(D))
        self.positional_embedding = nn.Parameter(torch.zeros(cfg.grid ** 2 + 1, D))
        self.ln_pre, self.ln_post = nn.LayerNorm(D), nn.LayerNorm(D)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList([_ResBlock(cfg) for _ in range(cfg.depth)])
        self.proj = nn.Parameter(torch.zeros(D, cfg.embed_dim))

    @property
    def feature_dim(self) -> int:
        """T: the CLIP embedding size (``proj``'s output)."""
        return self.cfg.embed_dim

    def set_token_drop(self, ratio: float) -> None:
        if ratio:
            raise ValueError("an OpenAI-layout tower has no token dropping")

    def forward_tokens(self, img_BCHW: torch.Tensor) -> torch.Tensor:
        """Every token after the last block, B x (1 + P) x D (CLS first), before ``ln_post``."""
        x_BDSS = self.conv1(img_BCHW)
        x_BPD = x_BDSS.flatten(2).transpose(1, 2)
        cls_B1D = self.class_embedding.to(x_BPD.dtype).expand(x_BPD.shape[0], 1, -1)
        x_BND = self.ln_pre(torch.cat([cls_B1D, x_BPD], dim=1) + self.positional_embedding.to(x_BPD.dtype))
        for blk in self.transformer.resblocks:
            x_BND = blk(x_BND)
        return x_BND

    def patch_targets(self, img_BCHW: torch.Tensor) -> torch.Tensor:
        """EVA-01's MIM targets, B x P x T: CLS dropped, ``ln_post``, ``@ proj`` (EVA-01/eva/clip/model.py:269-273)."""
        return self.ln_post(self.forward_tokens(img_BCHW)[:, self.num_prefix:]) @ self.proj

    def forward(self, img_BCHW: torch.Tensor) -> torch.Tensor:
        """OpenAI's image embedding B x T (the CLS token through ``ln_post`` and ``proj``)."""
        return self.ln_post(self.forward_tokens(img_BCHW)[:, 0]) @ self.proj


def openai_vision_tower(sd: dict, act: Act = "quick_gelu", source: str = "checkpoint") -> OpenAIVisionTower:
    """An ``OpenAIVisionTower`` loaded strictly from an OpenAI-layout state dict (whole CLIP or the tower alone);
    CheckpointError names missing / unexpected keys (e.g. open_clip options this tower does not implement)."""
    from .convert import CheckpointError

    visual = openai_visual_part(sd)
    tower = OpenAIVisionTower(openai_vision_cfg(visual, act))
    missing, unexpected = tower.load_state_dict(visual, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{source}: an OpenAI-layout ViT image tower, but its keys do not match OpenAI's: "
                              f"missing {sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}")
    return tower
