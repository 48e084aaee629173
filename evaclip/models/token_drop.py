"""Random token dropping (FLIP / EVA-CLIP "patch dropout"): keep a random subset of patch tokens per sample.

Shapes: see the legend in docs/ARCHITECTURE.md (B batch, N tokens = prefix + patches, P patch tokens, K kept patch
tokens, D width).
"""
from __future__ import annotations

from typing import Optional

import torch


def num_kept(num_patches: int, drop_ratio: float) -> int:
    """Patch tokens kept at ``drop_ratio`` (at least one)."""
    return max(1, int(round(num_patches * (1.0 - drop_ratio))))


def keep_indices(batch: int, num_patches: int, keep_ratio: float, device=None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A random ``keep_ratio`` of ``num_patches`` patch indices per sample, B x K, sorted (raster order kept).

    One batched topk over uniform noise: no per-sample loop, no host sync.
    """
    K = num_kept(num_patches, 1.0 - keep_ratio)
    noise_BP = torch.rand(batch, num_patches, device=device, generator=generator)
    return noise_BP.topk(K, dim=1, sorted=False).indices.sort(dim=1).values


def gather_tokens(x_BPD: torch.Tensor, keep_idx_BK: torch.Tensor) -> torch.Tensor:
    """Rows ``keep_idx_BK`` of each sample of ``x_BPD``: B x K x D, one gather."""
    B, K = keep_idx_BK.shape
    return x_BPD.gather(1, keep_idx_BK.unsqueeze(-1).expand(B, K, x_BPD.shape[-1]))


def drop_tokens(x_BND: torch.Tensor, keep_ratio: float, num_prefix: int = 1,
                generator: Optional[torch.Generator] = None):
    """Keep the ``num_prefix`` tokens (CLS) and a random ``keep_ratio`` of the patch tokens, chosen per sample.

    Returns ``(x_kept, keep_idx_BK)``: x_kept is B x (num_prefix + K) x D; keep_idx are patch indices (0-based,
    prefix excluded), sorted so kept tokens stay in raster order. (The image tower itself draws the indices first
    and embeds only the kept patches; this form is for tokens that are already embedded.)
    """
    B, N, _ = x_BND.shape
    keep_idx_BK = keep_indices(B, N - num_prefix, keep_ratio, x_BND.device, generator)
    return torch.cat([x_BND[:, :num_prefix], gather_tokens(x_BND[:, num_prefix:], keep_idx_BK)], 1), keep_idx_BK
