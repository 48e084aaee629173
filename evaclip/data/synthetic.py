"""Synthetic batches for benchmarks and smoke tests: no I/O, no decode, deterministic from a seed.

Shapes: B batch, C channels (3), H/W image side, L context length.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch


def synthetic_batches(batch_size: int, image_size: int, context_length: int = 77, vocab_size: int = 49408,
                      steps: Optional[int] = None, seed: int = 0, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32, fixed: bool = True
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(images_BCHW, tokens_BL)`` ``steps`` times (forever if None).

    Images are standard-normal (what normalised pixels look like); tokens are CLIP-shaped: SOT, random ids, EOT (the
    highest id, so EOT pooling by argmax works), zero padding. ``fixed=True`` reuses one batch (pure compute
    benchmarks); ``fixed=False`` draws a new one per step.
    """
    if batch_size < 1 or image_size < 1 or context_length < 3 or vocab_size < 4:
        raise ValueError(f"bad synthetic batch shape: batch_size={batch_size}, image_size={image_size}, "
                         f"context_length={context_length}, vocab_size={vocab_size}")
    g = torch.Generator().manual_seed(seed)

    def make():
        images_BCHW = torch.randn(batch_size, 3, image_size, image_size, generator=g)
        lengths_B = torch.randint(1, context_length - 1, (batch_size,), generator=g)
        tokens_BL = torch.randint(1, vocab_size - 2, (batch_size, context_length), generator=g)
        pos_L = torch.arange(context_length)
        tokens_BL[:, 0] = vocab_size - 2  # start of text
        tokens_BL[pos_L[None] == lengths_B[:, None] + 1] = vocab_size - 1  # end of text
        tokens_BL[pos_L[None] > lengths_B[:, None] + 1] = 0
        return images_BCHW.to(device=device, dtype=dtype), tokens_BL.to(device)

    batch = make()
    step = 0
    while steps is None or step < steps:
        yield batch
        step += 1
        if not fixed:
            batch = make()


class SyntheticDataInfo:
    """The DataInfo interface over synthetic batches, so train.py can run with ``data.synthetic=true``."""

    def __init__(self, batch_size: int, image_size: int, context_length: int, vocab_size: int, num_batches: int,
                 seed: int = 0):
        self._args = (batch_size, image_size, context_length, vocab_size)
        self.num_batches, self.seed = num_batches, seed
        self.num_samples = num_batches * batch_size
        self.set_epoch(0)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        b, s, ctx, voc = self._args
        self.loader = synthetic_batches(b, s, ctx, voc, steps=self.num_batches - start_step, seed=self.seed + epoch)

    def skipped(self) -> int:
        return 0
