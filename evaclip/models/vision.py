"""EVA image towers: EVA-02 (SwiGLU, sub-LN, 2D RoPE) and EVA-01 (GELU MLP, optional post-norm, LayerScale).

Architecture only. Shapes: see the legend in docs/ARCHITECTURE.md (B batch, N tokens = CLS + kept patches, P patch
tokens, K kept patch tokens, D width, H heads, F per-head feature dim (the local ``Dh``), C channels, Z patch side in
pixels (the local ``p``), E embed dim).
Parameter names follow the EVA-CLIP release (q_bias/v_bias, inner_attn_ln, mlp.ffn_ln/w3) except that q, k and v share
one fused ``qkv`` projection and the SwiGLU's w1/w2 one fused ``w12`` (one GEMM each instead of three / two).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import Attend
from .registry import VisionCfg
from .rope import rope_tables, rotate, signed_sin
from .token_drop import gather_tokens, keep_indices


class DropPath(nn.Module):
    """Stochastic depth per sample."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionCfg, attend: Attend):
        super().__init__()
        D = cfg.width
        self.heads, self.head_dim = cfg.heads, D // cfg.heads
        self.qkv = nn.Linear(D, 3 * D, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(D)) if cfg.qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(D)) if cfg.qkv_bias else None
        self.inner_attn_ln = nn.LayerNorm(D, eps=cfg.ln_eps) if cfg.subln else nn.Identity()
        self.proj = nn.Linear(D, D)
        self.attend = attend

    def forward(self, x_BND: torch.Tensor, rope=None, cls_only: bool = False) -> torch.Tensor:
        """B x N x D -> B x N x D, or B x 1 x D with ``cls_only`` (the CLS query against all keys and values)."""
        B, N, D = x_BND.shape
        bias = None
        if self.q_bias is not None:  # k has no bias in EVA
            bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        H, Dh = self.heads, self.head_dim
        to_layout = (lambda t: t.transpose(1, 2)) if self.attend.layout == "BHND" else (lambda t: t)  # views
        if cls_only:  # the CLS query only (one row of the q GEMM); keys and values from every token
            W = self.qkv.weight
            q_bias, kv_bias = (None, None) if bias is None else (bias[:D], bias[D:])
            q = to_layout(F.linear(x_BND[:, :1], W[:D], q_bias).view(B, 1, H, Dh))
            k, v = (to_layout(t) for t in F.linear(x_BND, W[D:], kv_bias).view(B, N, 2, H, Dh).unbind(2))
            N = 1  # row 0 of the RoPE tables (CLS) is the identity: the CLS query needs no rotation
        else:
            q, k, v = (to_layout(t) for t in F.linear(x_BND, self.qkv.weight, bias).view(B, N, 3, H, Dh).unbind(2))
            if rope is not None:
                q = rotate(q, *rope)
        if rope is not None:
            k = rotate(k, *rope)
        out = self.attend(q, k, v)
        out = (out.transpose(1, 2) if self.attend.layout == "BHND" else out).reshape(B, N, D)  # N = 1 with cls_only
        return self.proj(self.inner_attn_ln(out))


class _GatedSilu(torch.autograd.Function):
    """silu(h1) * h2 for h = [h1 | h2] (the fused w12 output), whose backward writes both halves of dL/dh into one
    tensor: autograd's chunk backward would allocate the halves and then concatenate them (a copy of the largest
    activation in the block, ~0.8% of a CPU step of EVA02-CLIP-S-16)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor) -> torch.Tensor:
        gate, up = h.chunk(2, dim=-1)
        act = F.silu(gate)
        ctx.save_for_backward(h, act)
        return act * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        h, act = ctx.saved_tensors
        gate, up = h.chunk(2, dim=-1)
        grad_h = torch.empty_like(h)
        grad_gate, grad_up = grad_h.chunk(2, dim=-1)
        torch.mul(grad, act, out=grad_up)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=grad_gate)
        return grad_h


def gated_silu(h: torch.Tensor) -> torch.Tensor:
    """silu(first half) * second half of the last dim; the one-tensor backward when a gradient is needed."""
    if torch.is_grad_enabled() and h.requires_grad and not torch.onnx.is_in_onnx_export():
        return _GatedSilu.apply(h)
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


class SwiGLU(nn.Module):
    """EVA-02 MLP: silu(w1 x) * (w2 x) -> ffn_ln (sub-LN) -> w3, with w1 and w2 fused into one ``w12`` GEMM
    (rows: w1 then w2; convert.py splits it back for the EVA-CLIP and timm layouts)."""

    def __init__(self, cfg: VisionCfg):
        super().__init__()
        D, Hd = cfg.width, cfg.mlp_hidden
        self.w12 = nn.Linear(D, 2 * Hd)
        self.ffn_ln = nn.LayerNorm(Hd, eps=cfg.ln_eps) if cfg.subln else nn.Identity()
        self.w3 = nn.Linear(Hd, D)

    def forward(self, x):
        return self.w3(self.ffn_ln(gated_silu(self.w12(x))))


class GeluMlp(nn.Module):
    """EVA-01 MLP: fc1 -> GELU -> fc2."""

    def __init__(self, cfg: VisionCfg):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(cfg.width, cfg.mlp_hidden), nn.Linear(cfg.mlp_hidden, cfg.width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionCfg, attend: Attend, drop_path: float = 0.0):
        super().__init__()
        self.postnorm = cfg.postnorm
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.attn = VisionAttention(cfg, attend)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.mlp = SwiGLU(cfg) if cfg.swiglu else GeluMlp(cfg)
        self.drop_path = DropPath(drop_path)
        if cfg.layer_scale is not None:
            self.gamma_1 = nn.Parameter(cfg.layer_scale * torch.ones(cfg.width))
            self.gamma_2 = nn.Parameter(cfg.layer_scale * torch.ones(cfg.width))
        else:
            self.gamma_1 = self.gamma_2 = None

    def _branch(self, y, gamma):
        return self.drop_path(y if gamma is None else y * gamma)

    def forward(self, x_BND, rope=None, cls_only: bool = False):
        """``cls_only``: compute only the CLS token's output (B x 1 x D); the other tokens still serve as keys and
        values. Exact for the last block of a CLS-pooled tower, where no later layer reads the patch tokens."""
        res = x_BND[:, :1] if cls_only else x_BND  # B x 1 x D with cls_only, else B x N x D (so is y)
        if self.postnorm:
            y = res + self._branch(self.norm1(self.attn(x_BND, rope, cls_only)), self.gamma_1)
            return y + self._branch(self.norm2(self.mlp(y)), self.gamma_2)
        y = res + self._branch(self.attn(self.norm1(x_BND), rope, cls_only), self.gamma_1)
        return y + self._branch(self.mlp(self.norm2(y)), self.gamma_2)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionCfg):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.proj = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, img_BCHW: torch.Tensor, keep_idx_BK: Optional[torch.Tensor] = None) -> torch.Tensor:
        """B x P x D for every patch, or B x K x D for the kept patches ``keep_idx_BK`` only.

        A kernel-equals-stride convolution is one linear map per flattened patch, so with token dropping only the
        kept patches' pixels are gathered (a strided view, then one copy of K patches) and embedded by a GEMM with
        the convolution's weight: the dropped patches cost neither FLOPs nor memory.
        """
        if keep_idx_BK is None:
            return self.proj(img_BCHW).flatten(2).transpose(1, 2)
        B, C, H, W = img_BCHW.shape
        p = self.patch_size
        patches_BPCZZ = img_BCHW.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).flatten(1, 2)
        kept_BKCZZ = patches_BPCZZ[torch.arange(B, device=img_BCHW.device)[:, None], keep_idx_BK]
        return F.linear(kept_BKCZZ.flatten(2), self.proj.weight.flatten(1), self.proj.bias)


class EVAVisionTransformer(nn.Module):
    """EVA ViT with CLS pooling and a projection head to ``embed_dim``.

    ``token_drop`` is the fraction of patch tokens dropped in training mode (the CLS token is always kept); the RoPE
    tables are gathered with the same kept indices.
    """

    num_prefix = 1

    def __init__(self, cfg: VisionCfg, embed_dim: int, attend: Attend, token_drop: float = 0.0):
        super().__init__()
        self.cfg = cfg
        D, P = cfg.width, cfg.grid ** 2
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, P + 1, D))
        dpr = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # python: builds on meta too
        self.blocks = nn.ModuleList([VisionBlock(cfg, attend, dpr[i]) for i in range(cfg.depth)])
        self.norm = nn.LayerNorm(D, eps=cfg.ln_eps)
        self.head = nn.Linear(D, embed_dim)
        if cfg.rope:
            cos, sin = rope_tables(D // cfg.heads, cfg.grid, cfg.pt_hw_seq_len)
            # a leading identity row (cos 1, sin 0) leaves the CLS token unrotated
            cos = torch.cat([torch.ones_like(cos[:1]), cos])
            sin = torch.cat([torch.zeros_like(sin[:1]), sin])
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", signed_sin(sin), persistent=False)  # sign folded in: see rotate
        else:
            self.rope_cos = self.rope_sin = None
        self.grad_checkpointing = False
        self.set_token_drop(token_drop)
        self._init_weights()

    @property
    def layout(self) -> str:
        """The attention layout, read from the blocks: an ``auto`` backend may change when the model moves."""
        return self.blocks[0].attn.attend.layout

    def set_token_drop(self, ratio: float) -> None:
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"token_drop must be in [0, 1), got {ratio}")
        self.token_drop = float(ratio)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def _init_weights(self):
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for i, blk in enumerate(self.blocks):  # EVA's rescale of the residual output projections
            blk.attn.proj.weight.data.div_(math.sqrt(2.0 * (i + 1)))
            out = blk.mlp.w3 if isinstance(blk.mlp, SwiGLU) else blk.mlp.fc2
            out.weight.data.div_(math.sqrt(2.0 * (i + 1)))

    def _rope(self, keep_idx_BK: Optional[torch.Tensor]):
        """RoPE tables shaped for the attention layout; gathered by the kept token indices when dropping."""
        if self.rope_cos is None:
            return None
        cos, sin = self.rope_cos, self.rope_sin  # (1 + P) x F, row 0 is the CLS identity
        if keep_idx_BK is not None:  # B x (1+K) x F, shared by all heads
            idx_BN = torch.cat([keep_idx_BK.new_zeros(keep_idx_BK.shape[0], 1), keep_idx_BK + 1], dim=1)
            cos, sin = cos[idx_BN], sin[idx_BN]
        head_axis = -3 if self.layout == "BHND" else -2  # a size-1 head axis broadcasts over heads, no copies
        return cos.unsqueeze(head_axis), sin.unsqueeze(head_axis)

    def _embed(self, img_BCHW: torch.Tensor, patch_fn=None):
        """Tokens entering the first block (CLS first) and the kept patch indices (None without token dropping).
        ``patch_fn`` (B x P x D -> B x P x D) edits the patch embeddings before the position embedding is added (MIM
        puts its mask token there); it needs every patch, so not with token dropping."""
        B = img_BCHW.shape[0]
        cls_B1D = (self.cls_token + self.pos_embed[:, :1]).expand(B, -1, -1)
        keep_idx_BK = None
        if self.training and self.token_drop > 0:  # indices first, so only the kept patches are embedded
            if patch_fn is not None:
                raise ValueError("patch_fn needs every patch embedding: set token_drop to 0")
            keep_idx_BK = keep_indices(B, self.pos_embed.shape[1] - 1, 1.0 - self.token_drop, img_BCHW.device)
            pos_BKD = gather_tokens(self.pos_embed[:, 1:].expand(B, -1, -1), keep_idx_BK)
            patches_BKD = self.patch_embed(img_BCHW, keep_idx_BK) + pos_BKD
        else:
            patches_BPD = self.patch_embed(img_BCHW)
            if patch_fn is not None:
                patches_BPD = patch_fn(patches_BPD)
            patches_BKD = patches_BPD + self.pos_embed[:, 1:]  # K = P: every patch kept
        return torch.cat([cls_B1D, patches_BKD], dim=1), keep_idx_BK

    def _blocks(self, x_BND: torch.Tensor, rope, cls_only_last: bool) -> torch.Tensor:
        """B x N x D -> B x N x D, or B x 1 x D (the CLS token only) with ``cls_only_last``."""
        last = len(self.blocks) - 1
        x = x_BND
        for i, blk in enumerate(self.blocks):
            cls_only = cls_only_last and i == last
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, rope, cls_only, use_reentrant=False)
            else:
                x = blk(x, rope, cls_only)
        return x

    def forward_features(self, img_BCHW: torch.Tensor, patch_fn=None) -> torch.Tensor:
        """Every token's final features, B x (1 + K) x D (K = kept patches in training with token dropping);
        ``patch_fn``: see ``_embed``."""
        x_BND, keep_idx = self._embed(img_BCHW, patch_fn)
        return self.norm(self._blocks(x_BND, self._rope(keep_idx), cls_only_last=False))

    def final_tokens(self, img_BCHW: torch.Tensor) -> torch.Tensor:
        """The patch tokens after the final norm, CLS dropped: B x K x D (K kept patches in training with token
        dropping, every patch otherwise); what a model reading the patches (LCL's pooler) takes instead of ``head``."""
        return self.forward_features(img_BCHW)[:, self.num_prefix:]

    def _layer_index(self, layer: int) -> int:
        depth = len(self.blocks)
        if not -depth <= layer < depth:
            raise ValueError(f"layer must be in [{-depth}, {depth - 1}] for a tower of {depth} blocks, got {layer}")
        return layer % depth

    def forward_intermediates(self, img_BCHW: torch.Tensor, indices=None, *, norm: bool = False,
                              prefix: bool = False, intermediates_only: bool = False):
        """Every token's output of chosen blocks, as timm's ``forward_intermediates`` (``output_fmt='NLC'``).

        ``indices``: an int n = the last n blocks, a list of block indices (negative from the end: -1 the last, -2
        the penultimate), None = every block. Each intermediate is B x P x D (the CLS token dropped; B x (1 + P) x D
        with ``prefix``), through the final norm with ``norm`` (as timm does), else the block's raw output. Returns
        ``(final_BND, intermediates)`` (``final``: every token after the last block and the final norm, the input of
        ``head``), or the list alone with ``intermediates_only`` (then the blocks after the last chosen one are not
        run). Eval mode: no token dropping."""
        depth = len(self.blocks)
        if indices is None:
            take = list(range(depth))
        elif isinstance(indices, int):
            if not 0 < indices <= depth:
                raise ValueError(f"indices={indices}: the last n blocks needs 0 < n <= {depth}")
            take = list(range(depth - indices, depth))
        else:
            take = [self._layer_index(int(i)) for i in indices]
        if self.training and self.token_drop > 0:
            raise ValueError("forward_intermediates needs every patch: call it in eval mode (model.eval())")
        x_BND, _ = self._embed(img_BCHW)
        rope = self._rope(None)
        last = max(take) if intermediates_only else depth - 1
        out: dict[int, torch.Tensor] = {}
        for i, blk in enumerate(self.blocks[:last + 1]):
            x_BND = blk(x_BND, rope)
            if i in take:
                t = self.norm(x_BND) if norm else x_BND
                out[i] = t if prefix else t[:, self.num_prefix:]
        intermediates = [out[i] for i in take]
        return intermediates if intermediates_only else (self.norm(x_BND), intermediates)

    def patch_tokens(self, img_BCHW: torch.Tensor, layer: int = -1, *, norm: bool = False,
                     prefix: bool = False) -> torch.Tensor:
        """The per-patch tokens of one block, B x P x D (B x (1 + P) x D with ``prefix``): the input a multimodal
        model reads. LLaVA-style: ``layer=-2`` (the penultimate block), no norm, no CLS; the last block with or
        without the final norm: ``layer=-1``, ``norm=True`` / ``False``. See ``forward_intermediates``."""
        return self.forward_intermediates(img_BCHW, [layer], norm=norm, prefix=prefix, intermediates_only=True)[0]

    def forward(self, img_BCHW: torch.Tensor) -> torch.Tensor:
        """Image embeddings B x E from the CLS token; the last block computes the CLS token only (exact: pooling
        reads nothing else), which saves about three quarters of that block's FLOPs."""
        x_BND, keep_idx = self._embed(img_BCHW)
        x_B1D = self._blocks(x_BND, self._rope(keep_idx), cls_only_last=True)
        return self.head(self.norm(x_B1D[:, 0]))
