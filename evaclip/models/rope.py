"""2D rotary position embedding of EVA-02 (interleaved pairs, one half of each head for rows, one for columns).

Shapes: N patch tokens (grid*grid), D head dim, B batch, K kept tokens.
Positions are rescaled to the pretraining grid (``pt_hw_seq_len`` in the config), so a 336 px tower keeps the 224 px
frequencies.
"""
from __future__ import annotations

from typing import Optional

import torch


def rope_tables(head_dim: int, grid: int, pt_grid: Optional[int] = None, theta: float = 10000.0):
    """cos and sin tables, each N x D, for a ``grid`` x ``grid`` patch layout (row-major, as the patch embedding)."""
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs a head dim divisible by 4, got {head_dim}")
    half = head_dim // 2  # rotary dims per axis
    inv_freq = 1.0 / theta ** (torch.arange(0, half, 2, dtype=torch.float64) / half)
    pos = torch.arange(grid, dtype=torch.float64) / grid * (pt_grid or grid)
    freqs_G = torch.outer(pos, inv_freq).repeat_interleave(2, dim=-1)  # grid x half, each freq for a pair
    rows = freqs_G[:, None, :].expand(grid, grid, half)
    cols = freqs_G[None, :, :].expand(grid, grid, half)
    freqs_ND = torch.cat([rows, cols], dim=-1).reshape(grid * grid, head_dim)
    return freqs_ND.cos().float(), freqs_ND.sin().float()


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    x_pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-x_pairs[..., 1], x_pairs[..., 0]), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (..., N, D) by tables broadcastable to it (N x D, or B x 1 x K x D after a gather)."""
    return x * cos.to(x.dtype) + rotate_pairs(x) * sin.to(x.dtype)


def gather_tables(cos_ND: torch.Tensor, sin_ND: torch.Tensor, keep_idx_BK: torch.Tensor):
    """The tables of the kept patch tokens, B x K x D (shared by all heads: no per-head copies)."""
    return cos_ND[keep_idx_BK], sin_ND[keep_idx_BK]
