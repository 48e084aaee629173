"""BEiT's block-wise mask generator, as used by EVA / EVA-02 masked image modeling.

Shapes: see the legend in docs/ARCHITECTURE.md (P patch tokens, S grid side); the grid may be rectangular,
``height x width`` patches (S x S when square), P = height * width. Masks are row-major over the grid (the order of
the tower's patch tokens), ``True`` = masked.

The method (BEiT, Bao et al. 2021, section 2.5; EVA-02's ``masking_generator.py`` keeps it unchanged): until the target
count is reached, place rectangular blocks. Per block, up to ``tries`` draws of

- a target area ``A ~ U(min_block, remaining)`` patches, where ``remaining`` is the target minus what is already masked
  (when ``remaining < min_block`` the interval is reversed, as with ``random.uniform``: ``A`` lies in
  ``[remaining, min_block]``),
- an aspect ratio ``r = h / w`` drawn log-uniformly in ``aspect``,
- ``h = round(sqrt(A * r))``, ``w = round(sqrt(A / r))``; a block must be strictly smaller than the grid on each side
  (``h < height``, ``w < width``, as in the released code), at a uniform position;

a draw is kept when it masks at least one new patch and no more than ``remaining`` new ones (blocks may overlap). A
block is done at its first kept draw; when all ``tries`` draws of a block fail, generation stops. So the count never
exceeds the target and can end slightly under it (e.g. 105 targeted on the 16 x 16 grid of a 224 px, patch-14 tower;
most masks reach it, a few stop a handful of patches short). The area bound is on the drawn ``A``: rounding ``h`` and
``w`` makes a placed block's ``h * w`` differ from ``A`` by up to about ``(sqrt(A r) + sqrt(A / r)) / 2``.

Small grids. BEiT's minimum block of 16 patches was chosen for 14 x 14 and 16 x 16 grids; on a 4 x 4 or 8 x 8 demo
grid a 16-patch block does not fit (or is most of the mask). The minimum block used is therefore

    min_block = max(1, min(min_block_patches, P // 10))

i.e. at most a tenth of the grid: 16 on every grid of 160 patches or more (so 14 x 14 and 16 x 16 keep the published
16), 6 on 8 x 8, 1 on 4 x 4. At 40 % masking the smallest block is then at most a quarter of the mask on any grid.

Target count. ``num_masked`` (if given) or ``round(mask_ratio * P)``. EVA-02's released runs mask 105 of 256 patches
(their scripts' comment reads "224*224/14/14 * 0.4"): the recipes set ``num_masked=105`` (``mask_ratio=0.41`` gives
the same, round(104.96)).

Randomness. Every draw comes from the generator passed in (a ``numpy.random.Generator``, a ``torch.Generator`` or an
int seed): the same generator state gives the same mask, which is what exact resume needs. Nothing touches global RNG
state. ``fixed_masks`` gives the validation masks: a pure function of (settings, seed, sample index), independent of
any training RNG and of batch size or process count.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import torch

RNG = Union[np.random.Generator, torch.Generator, int]
_VAL_TAG = 0x6D61736B  # "mask": keeps fixed validation masks apart from any stream seeded with small integers


@dataclass(frozen=True)
class Block:
    """One placed block: its corner and sides on the grid, the drawn target area and aspect ratio, and how many
    patches it newly masked (it may overlap earlier blocks)."""

    top: int
    left: int
    h: int
    w: int
    area: float
    aspect: float
    new: int


def scaled_min_block(num_patches: int, min_block_patches: int) -> int:
    """The minimum block size used on a grid of ``num_patches``: ``max(1, min(min_block_patches, num_patches // 10))``
    (see the module docstring)."""
    return max(1, min(int(min_block_patches), int(num_patches) // 10))


def _uniforms(rng: Union[np.random.Generator, torch.Generator], n: int) -> list[float]:
    if isinstance(rng, torch.Generator):
        return torch.rand(n, generator=rng, dtype=torch.float64).tolist()
    return rng.random(n).tolist()


def as_generator(rng: RNG) -> Union[np.random.Generator, torch.Generator]:
    """``rng`` itself if it is a numpy or torch (CPU) generator; an int seeds a new numpy generator."""
    if isinstance(rng, (np.random.Generator, torch.Generator)):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise TypeError(f"expected a numpy.random.Generator, a torch.Generator or an int seed, got {type(rng).__name__}")


class BlockMaskGenerator:
    """Block-wise masks over a ``height x width`` patch grid (BEiT / EVA-02); see the module docstring for the method.

    ``grid_hw``: (height, width) or one int for a square grid. ``mask_ratio``: target fraction of patches (ignored when
    ``num_masked`` is given). ``min_block_patches``: minimum drawn block area, scaled down on small grids
    (``self.min_block``). ``aspect``: (min, max) of h / w, drawn log-uniformly. ``tries``: placement draws per block.
    ``max_block_patches``: optional cap on a block's drawn area (BEiT's ``max_num_patches``; default: the target).
    """

    def __init__(self, grid_hw: Union[int, Sequence[int]], mask_ratio: float = 0.4, min_block_patches: int = 16,
                 aspect: Sequence[float] = (0.3, 1 / 0.3), tries: int = 10, *, num_masked: Optional[int] = None,
                 max_block_patches: Optional[int] = None):
        hw = (grid_hw, grid_hw) if isinstance(grid_hw, int) else tuple(int(x) for x in grid_hw)
        if len(hw) != 2 or min(hw) < 2:
            raise ValueError(f"grid_hw must be (height, width) with at least 2 patches per side, got {grid_hw!r}")
        self.height, self.width = hw
        self.num_patches = self.height * self.width
        if num_masked is None:
            if not 0.0 <= mask_ratio < 1.0:
                raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
            num_masked = int(round(mask_ratio * self.num_patches))
        if not 0 <= num_masked < self.num_patches:
            raise ValueError(f"num_masked must be in [0, {self.num_patches}), got {num_masked}")
        if min_block_patches < 1:
            raise ValueError(f"min_block_patches must be >= 1, got {min_block_patches}")
        lo, hi = (float(aspect[0]), float(aspect[1])) if len(aspect) == 2 else (None, None)
        if lo is None or not 0 < lo <= hi:
            raise ValueError(f"aspect must be (min, max) with 0 < min <= max, got {aspect!r}")
        if tries < 1:
            raise ValueError(f"tries must be >= 1, got {tries}")
        self.num_masked = int(num_masked)
        self.min_block = scaled_min_block(self.num_patches, min_block_patches)
        self.max_block = self.num_masked if max_block_patches is None else int(max_block_patches)
        self.log_aspect = (math.log(lo), math.log(hi))
        self.tries = int(tries)

    def __repr__(self) -> str:
        lo, hi = (math.exp(a) for a in self.log_aspect)
        return (f"BlockMaskGenerator({self.height}x{self.width}, target {self.num_masked}, blocks >= {self.min_block}"
                f", aspect {lo:.3g}..{hi:.3g}, tries {self.tries})")

    # -- one mask ------------------------------------------------------------------------------------------------
    def _place(self, grid: np.ndarray, remaining: int, rng, blocks: Optional[list]) -> int:
        """One block: up to ``tries`` draws; returns the patches it newly masked (0: every draw failed)."""
        lo_a, hi_a = self.min_block, min(remaining, self.max_block)
        for _ in range(self.tries):
            u_area, u_aspect, u_top, u_left = _uniforms(rng, 4)
            area = lo_a + u_area * (hi_a - lo_a)
            aspect = math.exp(self.log_aspect[0] + u_aspect * (self.log_aspect[1] - self.log_aspect[0]))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if not (h < self.height and w < self.width):
                continue
            top = int(u_top * (self.height - h + 1))
            left = int(u_left * (self.width - w + 1))
            window = grid[top:top + h, left:left + w]
            new = h * w - int(window.sum())
            if 0 < new <= remaining:
                window[...] = True
                if blocks is not None:
                    blocks.append(Block(top, left, h, w, area, aspect, new))
                return new
        return 0

    def draw(self, rng: RNG, return_blocks: bool = False):
        """One mask, bool ``(P,)`` (numpy); with ``return_blocks`` also the list of placed ``Block``s."""
        rng = as_generator(rng)
        grid = np.zeros((self.height, self.width), dtype=bool)
        blocks: Optional[list] = [] if return_blocks else None
        count = 0
        while count < self.num_masked:
            new = self._place(grid, self.num_masked - count, rng, blocks)
            if new == 0:
                break
            count += new
        mask_P = grid.reshape(-1)
        return (mask_P, blocks) if return_blocks else mask_P

    __call__ = draw

    # -- batches -------------------------------------------------------------------------------------------------
    def batch(self, n: int, rng: RNG) -> torch.Tensor:
        """``n`` masks drawn one after another from ``rng``: bool tensor ``(n, P)``."""
        rng = as_generator(rng)
        out = np.zeros((n, self.num_patches), dtype=bool)
        for i in range(n):
            out[i] = self.draw(rng)
        return torch.from_numpy(out)

    def fixed_masks(self, indices: Union[int, Iterable[int], torch.Tensor], seed: int = 0) -> torch.Tensor:
        """Validation masks, bool ``(len(indices), P)``: the mask of sample ``i`` depends only on the generator's
        settings, ``seed`` and ``i`` (its own numpy generator; no global or training RNG is read or advanced). An int
        ``indices`` means ``range(indices)``."""
        if isinstance(indices, torch.Tensor):
            indices = indices.reshape(-1).tolist()
        elif isinstance(indices, (int, np.integer)):
            indices = range(int(indices))
        idx = [int(i) for i in indices]
        out = np.zeros((len(idx), self.num_patches), dtype=bool)
        for row, i in enumerate(idx):
            if i < 0:
                raise ValueError(f"sample indices must be >= 0, got {i}")
            out[row] = self.draw(np.random.default_rng((_VAL_TAG, int(seed), i)))
        return torch.from_numpy(out)

    def fixed_mask(self, seed: int = 0) -> torch.Tensor:
        """One fixed validation mask, bool ``(P,)`` (sample index 0 of ``fixed_masks``), for a set that shares one."""
        return self.fixed_masks([0], seed)[0]


def alternating_masks(n: int, num_patches: int) -> torch.Tensor:
    """EVA's validation masks, bool ``(n, P)``: every even patch index masked, every odd one visible (50 %, the same
    for every image; baaivision/EVA, EVA-02/asuka/engine_for_pretraining.py, ``evaluate_pt``), so a validation
    curve can be laid beside EVA's published pre-training logs."""
    mask_P = torch.zeros(num_patches, dtype=torch.bool)
    mask_P[0::2] = True
    return mask_P.expand(n, num_patches).clone()
