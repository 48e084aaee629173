"""Random token dropping (FLIP / EVA-CLIP "patch dropout"): keep a random subset of patch tokens per sample.

Shapes: B batch, N tokens (prefix + patches), P patch tokens, K kept patch tokens, D width.
"""
from __future__ import annotations

from typing import Optional

import torch


def num_kept(num_patches: int, drop_ratio: float) -> int:
    """Patch tokens kept at ``drop_ratio`` (at least one)."""
    return max(1, int(round(num_patches * (1.0 - drop_ratio))))


def drop_tokens(x_BND: torch.Tensor, keep_ratio: float, num_prefix: int = 1,
                generator: Optional[torch.Generator] = None):
    """Keep the ``num_prefix`` tokens (CLS) and a random ``keep_ratio`` of the patch tokens, chosen per sample.

    Returns ``(x_kept, keep_idx_BK)``: x_kept is B x (num_prefix + K) x D; keep_idx are patch indices (0-based,
    prefix excluded), sorted so kept tokens stay in raster order. One batched gather, no per-sample loop.
    """
    B, N, D = x_BND.shape
    P = N - num_prefix
    K = num_kept(P, 1.0 - keep_ratio)
    noise_BP = torch.rand(B, P, device=x_BND.device, generator=generator)
    keep_idx_BK = noise_BP.topk(K, dim=1, sorted=False).indices.sort(dim=1).values
    patches_BKD = x_BND[:, num_prefix:].gather(1, keep_idx_BK.unsqueeze(-1).expand(B, K, D))
    return torch.cat([x_BND[:, :num_prefix], patches_BKD], dim=1), keep_idx_BK
