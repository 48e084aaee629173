"""Masked image modeling (EVA / EVA-02): the student that predicts a frozen CLIP's patch features, and that teacher.

Shapes: see the legend in docs/ARCHITECTURE.md (B batch, C channels, H/W image side, S patch-grid side, P = S * S
patches, D width, T teacher feature dim, M masked patches in a batch). Masks are bool, row-major over the grid (the
tower's patch order), True = masked.

Student (``MIMStudent``): an EVA-02 (or EVA-01) image tower of any registered size whose masked patch embeddings are
replaced, in place, by one learned ``mask_token`` (nothing is removed, no decoder); CLS + absolute positions (+ 2D RoPE
on the patch tokens for EVA-02) -> blocks -> final norm -> CLS dropped -> the masked positions -> ``lm_head``, a Linear
from the width to T. It *is* an ``EVAVisionTransformer`` (a subclass, built from the registry's ``VisionCfg``) with
the CLIP ``head`` renamed ``lm_head``, so its parameter names are EVA's MIM names: an evaclip MIM checkpoint reads as
the ``eva_mim`` format (``model.image_init`` loads it, dropping ``mask_token`` / ``lm_head``), FSDP2 finds its blocks,
and ``evaclip.models.convert.to_eva_mim_state_dict`` writes the released layout by splitting the fused projections.

Teacher (``MIMTeacher``): any CLIP image tower evaclip loads, frozen, in eval mode, without gradients, seeing the full
unmasked image. Target: the final layer's patch tokens (CLS dropped) through the tower's final norm and its CLIP
projection ``head``, per token, not L2-normalised (EVA-02 with EVA01-CLIP-g/14: ``norm`` then ``head``). EVA-01's
teacher, OpenAI CLIP-L/14 (an OpenAI-layout file, ``evaclip.models.openai_vit``): CLS dropped, ``ln_post``, ``@ proj``.
Different geometry: images whose size is not the teacher's are resized to it (bicubic, antialiased) before the
teacher; a teacher grid other than the student's is resized to the student's grid (``resize_target_map``: bilinear,
antialiased when shrinking, or area), so every student patch has a target from the same image region.
"""
from __future__ import annotations

import math
import re
from typing import Callable, Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attend
from .openai_vit import OpenAIVisionTower
from .registry import CLIPCfg, VisionCfg, get_model_config
from .vision import EVAVisionTransformer, SwiGLU

Init = Literal["eva02", "eva01", "beit"]  # "beit": EVA-01's name for the same init (its code is BEiT's)
Resize = Literal["bilinear", "area"]

_EMBED = re.compile(r"^(patch_embed\.|cls_token$|pos_embed$|mask_token$)")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_NO_WD = re.compile(r"(^|\.)(pos_embed|cls_token)$")


class MIMStudent(EVAVisionTransformer):
    """An EVA image tower trained to predict a CLIP teacher's features at masked patches (see the module docstring).

    Args:
        cfg: the image tower's architecture (a registered CLIP's ``vision`` section, with overrides).
        target_dim: T, the teacher's feature size (``lm_head``'s output).
        attend: the attention module (``evaclip.models.attention.Attend``).
        attn_subln: keep the attention sub-LN (``inner_attn_ln``) of sub-LN towers. EVA-02 B / L MIM students have
            none (only the MLP's ``ffn_ln``); EVA-CLIP adds it when it starts from them, so it starts fresh there.
        init: ``eva02``: EVA-02's released init (``xavier_normal_init=True``: xavier-normal Linear weights with each
            EVA Linear's own fan, so in sub-LN towers (EVA-02 B / L, whose q, k, v and SwiGLU w1, w2 are separate
            layers) each D-row block of the fused ``qkv`` and each hidden-row block of ``w12`` on its own;
            xavier-uniform patch kernel; tokens truncated normal at ``init_std`` cut at +-``init_std``; and in sub-LN
            towers the weights EVA-02 rescales, the v rows of qkv, ``attn.proj`` and every MLP Linear, multiplied by
            sqrt(ln(2 * depth))). ``eva01`` (alias ``beit``): EVA-01's init, which is BEiT's: every Linear weight,
            the patch kernel and the tokens truncated normal at ``init_std`` cut at +-``init_std`` (EVA-01 g: 0.015),
            zero biases, each block's ``attn.proj`` and MLP output divided by sqrt(2 * layer), post-norm LayerNorms
            zeroed.
        init_std: the truncated normals' std (EVA's ``init_std``: 0.02; EVA-01 g/14 0.015).
        patch_embed_grad_scale: multiplies the gradient reaching the patch embedding (EVA-02's ``stop_grad_conv1``
            is 0.1); the forward is unchanged.
    """

    def __init__(self, cfg: VisionCfg, target_dim: int, attend: Attend, *, attn_subln: bool = False,
                 init: Init = "eva02", patch_embed_grad_scale: float = 1.0, init_std: float = 0.02):
        super().__init__(cfg, target_dim, attend)
        if init not in ("eva02", "eva01", "beit"):
            raise ValueError(f"init must be 'eva02' or 'eva01' (alias 'beit'), got {init!r}")
        if not init_std > 0:
            raise ValueError(f"init_std must be > 0, got {init_std}")
        if not 0.0 <= patch_embed_grad_scale <= 1.0:
            raise ValueError(f"patch_embed_grad_scale must be in [0, 1], got {patch_embed_grad_scale}")
        self.lm_head = self.head  # Linear(D, T), initialised by the tower with its CLIP head
        del self.head
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.attn_subln = bool(attn_subln and cfg.subln)
        if not self.attn_subln:
            for blk in self.blocks:
                blk.attn.inner_attn_ln = nn.Identity()
        self.patch_embed_grad_scale = float(patch_embed_grad_scale)
        self.init_std = float(init_std)
        self._init_eva02() if init == "eva02" else self._init_eva01()

    @property
    def target_dim(self) -> int:
        return self.lm_head.out_features

    def _trunc_normal_(self, t: torch.Tensor) -> None:
        """EVA's ``trunc_normal_``: std ``init_std``, cut at +-``init_std`` (one std, not timm's +-2)."""
        nn.init.trunc_normal_(t, std=self.init_std, a=-self.init_std, b=self.init_std)

    def _init_eva02(self) -> None:
        for p in (self.cls_token, self.pos_embed, self.mask_token):
            self._trunc_normal_(p)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        if not self.cfg.subln:
            return  # Ti / S: fused qkv and w12 in EVA-02 too (xformers' SwiGLU), one fan each
        scale = math.sqrt(math.log(2 * self.cfg.depth))
        D, Hd = self.cfg.width, self.cfg.mlp_hidden
        with torch.no_grad():
            for blk in self.blocks:
                for rows in blk.attn.qkv.weight.split(D):  # q, k, v: EVA's three D x D Linears
                    nn.init.xavier_normal_(rows)
                if isinstance(blk.mlp, SwiGLU):
                    for rows in blk.mlp.w12.weight.split(Hd):  # w1, w2: two Hd x D Linears
                        nn.init.xavier_normal_(rows)
                blk.attn.qkv.weight[2 * D:].mul_(scale)  # the v projection's rows
                blk.attn.proj.weight.mul_(scale)
                for m in blk.mlp.modules():
                    if isinstance(m, nn.Linear):
                        m.weight.mul_(scale)

    def _init_eva01(self) -> None:
        for p in (self.cls_token, self.pos_embed, self.mask_token, self.patch_embed.proj.weight):
            self._trunc_normal_(p)
        nn.init.zeros_(self.patch_embed.proj.bias)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                self._trunc_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        with torch.no_grad():
            for i, blk in enumerate(self.blocks):
                out = blk.mlp.w3 if isinstance(blk.mlp, SwiGLU) else blk.mlp.fc2
                for w in (blk.attn.proj.weight, out.weight):
                    w.div_(math.sqrt(2.0 * (i + 1)))
                if self.cfg.postnorm:  # EVA-01's _init_respostnorm
                    for norm in (blk.norm1, blk.norm2):
                        nn.init.zeros_(norm.weight)
                        nn.init.zeros_(norm.bias)

    def set_token_drop(self, ratio: float) -> None:
        if ratio:
            raise ValueError("a MIM student sees every patch (masked ones as the mask token): token_drop must be 0")
        super().set_token_drop(ratio)

    # --- forward -----------------------------------------------------------------------------------------------
    def _patch_fn(self, mask_BP: Optional[torch.Tensor]) -> Optional[Callable]:
        """The edit of the patch embeddings before the position embedding: gradient scaling, then the mask token."""
        scale = self.patch_embed_grad_scale
        if mask_BP is None and scale == 1.0:
            return None

        def edit(x_BPD: torch.Tensor) -> torch.Tensor:
            if scale != 1.0:
                x_BPD = x_BPD.detach().lerp(x_BPD, scale)  # same values; d/dx = scale
            if mask_BP is not None:
                x_BPD = torch.where(mask_BP.unsqueeze(-1), self.mask_token.to(x_BPD.dtype), x_BPD)
            return x_BPD

        return edit

    def patch_features(self, images_BCHW: torch.Tensor, mask_BP: Optional[torch.Tensor] = None) -> torch.Tensor:
        """B x P x D: every patch token after the final norm (CLS dropped); ``mask_BP`` (B x P or B x S x S) puts the
        mask token at the masked patches."""
        if mask_BP is not None:
            mask_BP = mask_BP.reshape(images_BCHW.shape[0], -1).bool()
        tokens = self.forward_features(images_BCHW, self._patch_fn(mask_BP))
        return tokens[:, self.num_prefix:]

    def forward(self, images_BCHW: torch.Tensor, mask_BP: Optional[torch.Tensor],
                all_positions: bool = False) -> torch.Tensor:
        """Predictions of the teacher's features: M x T for the masked patches (in mask order, as ``x[mask]``), or
        B x P x T for every patch with ``all_positions``."""
        feats_BPD = self.patch_features(images_BCHW, mask_BP)
        if all_positions or mask_BP is None:
            return self.lm_head(feats_BPD)
        return self.lm_head(feats_BPD[mask_BP.reshape(feats_BPD.shape[:2]).bool()])

    def pooled_features(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """B x D image features for k-NN monitoring: the mean of the unmasked image's patch tokens after the final
        norm (the tokens ``lm_head`` reads). Not the CLS token: it gets gradients only as a key / value of the
        patch tokens, its own final readout is never trained, so it says little about what the student has learnt;
        not L2-normalised (k-NN normalises)."""
        return self.patch_features(images_BCHW).mean(dim=1)

    # --- hooks for the optimizer (see evaclip.optim.groups) ----------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        """1-D tensors (norms, biases), the position embedding and the CLS token (EVA-02's released settings; the
        mask token decays, as it does there)."""
        return {n for n, p in self.named_parameters() if p.ndim <= 1 or n.endswith(".bias") or _NO_WD.search(n)}

    @staticmethod
    def param_tower(name: str) -> str:
        """Every parameter belongs to the image tower (``optim.visual_*`` settings apply)."""
        return "visual"

    def num_layers(self, tower: str) -> int:
        return self.cfg.depth if tower == "visual" else 0

    def layer_id(self, name: str) -> int:
        """0 for the embeddings and the mask token, i+1 for block i, L+1 for the final norm and ``lm_head``."""
        name = name.removeprefix("module.")
        if _EMBED.match(name):
            return 0
        m = _BLOCK.match(name)
        return int(m.group(1)) + 1 if m else self.cfg.depth + 1


def build_student(model: Union[str, CLIPCfg], target_dim: int, *, attn_backend: str = "auto",
                  device: Optional[Union[str, torch.device]] = None, precision="fp32", attn_subln: bool = False,
                  init: Init = "eva02", patch_embed_grad_scale: float = 1.0, grad_checkpointing: bool = False,
                  init_std: float = 0.02, **overrides) -> MIMStudent:
    """A MIM student with the image tower of the registered CLIP ``model`` (overrides as in ``create_model``:
    ``vision.patch_size=14``, ``vision.drop_path=0.1``); other arguments as in ``MIMStudent`` / ``create_model``."""
    from .factory import _attend

    cfg = get_model_config(model, **overrides)
    student = MIMStudent(cfg.vision, target_dim, _attend(attn_backend, device, precision), attn_subln=attn_subln,
                         init=init, patch_embed_grad_scale=patch_embed_grad_scale, init_std=init_std)
    student.set_grad_checkpointing(grad_checkpointing)
    return student.to(device) if device is not None else student


# ----------------------------------------------------------------------------------------------------------------------
# teacher
# ----------------------------------------------------------------------------------------------------------------------
def resize_target_map(target_BPT: torch.Tensor, grid: int, mode: Resize = "bilinear") -> torch.Tensor:
    """A B x P x T patch-feature map on an S x S grid -> B x grid^2 x T (fp32). ``bilinear``: antialiased, so when
    shrinking each target averages the teacher patches under it, when enlarging it interpolates between neighbours;
    ``area``: plain averaging (nearest neighbour when enlarging)."""
    B, P, T = target_BPT.shape
    src = math.isqrt(P)
    if src * src != P:
        raise ValueError(f"{P} teacher patch tokens are not a square grid")
    if src == grid:
        return target_BPT
    img_BTSS = target_BPT.float().transpose(1, 2).reshape(B, T, src, src)
    if mode == "bilinear":
        img_BTSS = F.interpolate(img_BTSS, size=(grid, grid), mode="bilinear", align_corners=False, antialias=True)
    elif mode == "area":
        img_BTSS = F.interpolate(img_BTSS, size=(grid, grid), mode="area")
    else:
        raise ValueError(f"target resize mode must be 'bilinear' or 'area', got {mode!r}")
    return img_BTSS.flatten(2).transpose(1, 2)


class _PatchTargets(nn.Module):
    """A CLIP image tower's per-patch features: final norm, CLS dropped, CLIP ``head`` per token. Its own module, so
    that FSDP2 (``mim.teacher_shard``) makes it the tower's unit and gathers the embeddings, norm and head when it is
    called (calling the tower's ``forward_features`` directly would bypass the unit's hooks)."""

    def __init__(self, tower: EVAVisionTransformer):
        super().__init__()
        self.tower = tower

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        if not isinstance(self.tower, EVAVisionTransformer):  # OpenAI layout: its own EVA-01 targets
            return self.tower.patch_targets(images_BCHW)
        tokens = self.tower.forward_features(images_BCHW)
        return self.tower.head(tokens[:, self.tower.num_prefix:])


class MIMTeacher(nn.Module):
    """A frozen CLIP image tower that gives the MIM targets (see the module docstring). Always in eval mode (``train()``
    leaves it there), no parameter requires a gradient, ``forward`` runs without autograd."""

    def __init__(self, tower: Union[EVAVisionTransformer, OpenAIVisionTower], resize: Resize = "bilinear"):
        super().__init__()
        if resize not in ("bilinear", "area"):
            raise ValueError(f"target resize mode must be 'bilinear' or 'area', got {resize!r}")
        tower.set_token_drop(0.0)
        self.targets = _PatchTargets(tower.requires_grad_(False))
        self.resize = resize
        self.eval()

    def train(self, mode: bool = True) -> "MIMTeacher":
        return super().train(False)

    @property
    def tower(self) -> EVAVisionTransformer:
        return self.targets.tower

    @property
    def feature_dim(self) -> int:
        """T: the CLIP embedding size, the student's ``lm_head`` output."""
        if isinstance(self.tower, OpenAIVisionTower):
            return self.tower.feature_dim
        return self.tower.head.out_features

    @property
    def grid(self) -> int:
        return self.tower.cfg.grid

    @property
    def image_size(self) -> int:
        return self.tower.cfg.image_size

    @torch.no_grad()
    def forward(self, images_BCHW: torch.Tensor, grid: Optional[int] = None) -> torch.Tensor:
        """B x P x T targets for the unmasked ``images_BCHW`` (already in the teacher's normalisation), on the
        student's ``grid`` (default: the teacher's own)."""
        size = self.image_size
        if tuple(images_BCHW.shape[-2:]) != (size, size):
            images_BCHW = F.interpolate(images_BCHW, size=(size, size), mode="bicubic", align_corners=False,
                                        antialias=True)
        target_BPT = self.targets(images_BCHW)
        return target_BPT if grid is None else resize_target_map(target_BPT, grid, self.resize)
