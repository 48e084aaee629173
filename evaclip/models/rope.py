"""2D rotary position embedding of EVA-02 (interleaved pairs, one half of each head for rows, one for columns).

Shapes: see the legend in docs/ARCHITECTURE.md (P patch tokens = S x S, S the grid side, F per-head feature dim,
B batch, K kept patch tokens, N rows of whatever ``x`` is rotated).
Positions are rescaled to the pretraining grid (``pt_hw_seq_len`` in the config), so a 336 px tower keeps the 224 px
frequencies.
"""
from __future__ import annotations

from typing import Optional

import torch


def rope_tables(head_dim: int, grid: int, pt_grid: Optional[int] = None, theta: float = 10000.0):
    """cos and sin tables, each P x F, for a ``grid`` x ``grid`` (S x S) patch layout (row-major, as the patch
    embedding)."""
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs a head dim divisible by 4, got {head_dim}")
    half = head_dim // 2  # rotary dims per axis
    inv_freq = 1.0 / theta ** (torch.arange(0, half, 2, dtype=torch.float64) / half)
    pos = torch.arange(grid, dtype=torch.float64) / grid * (pt_grid or grid)
    freqs = torch.outer(pos, inv_freq).repeat_interleave(2, dim=-1)  # S x F/2, each freq for a pair
    rows = freqs[:, None, :].expand(grid, grid, half)
    cols = freqs[None, :, :].expand(grid, grid, half)
    freqs_PF = torch.cat([rows, cols], dim=-1).reshape(grid * grid, head_dim)
    return freqs_PF.cos().float(), freqs_PF.sin().float()


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """The sin table with the sign of the pair rotation folded in (even entries negated), for ``rotate``."""
    sign = torch.tensor([-1.0, 1.0], dtype=sin.dtype, device=sin.device).repeat(sin.shape[-1] // 2)
    return sin * sign


def _complex_ok(x: torch.Tensor) -> bool:
    """The complex form needs fp32/fp64, (real, imag) pairs viewable in place, and no tracer that lacks complex."""
    if x.dtype not in (torch.float32, torch.float64) or x.stride(-1) != 1 or any(st % 2 for st in x.stride()[:-1]):
        return False
    return not (torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export())


def rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x0, x1) -> (x0 c - x1 s, x1 c + x0 s); tables broadcastable to ``x`` (..., N, F).

    fp32 (CPU training, export checks): the pairs are viewed in place as complex numbers and multiplied by
    e^{i angle}, one pass forward and one backward (fwd + bwd 2.2 -> 0.7-1.0 ms for a 16 x 6 x 99 x 64 query on 2
    CPU cores). Other dtypes (bf16 / fp16 have no complex kernels) and tracers: x * cos + swap_pairs(x) *
    signed_sin, three passes. Half-precision ``x`` is rotated with the tables as they are (fp32: type promotion
    computes in fp32) and the result cast back once, as timm and EVA-CLIP do: the tables are never rounded to bf16.
    """
    if _complex_ok(x):
        angle = torch.complex(cos[..., 0::2].to(x.dtype), sin_signed[..., 1::2].to(x.dtype))
        return torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * angle).flatten(-2)
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return torch.addcmul(x * cos, swapped, sin_signed).to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (..., N, F) by the plain tables of ``rope_tables`` (broadcastable: P x F, or B x 1 x K x F)."""
    return rotate(x, cos, signed_sin(sin))
