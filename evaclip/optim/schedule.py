"""Learning-rate schedules by optimizer step: linear warmup, then cosine decay to a floor, or constant.

The scheduler multiplies each group's own peak lr (``base_lr * lr_scale``) by one factor, so the tower lrs and the
layer-wise decay hold at every step.
"""
from __future__ import annotations

import math

from torch.optim import Optimizer

KINDS = ("cosine", "const")


def lr_factor(step: int, kind: str, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based).

    Warmup ramps linearly (step + 1) / warmup_steps so the first step already moves; cosine then goes from 1 at the
    end of warmup to ``min_lr_ratio`` at ``total_steps`` and stays there.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "const":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class Scheduler:
    """Sets ``group["lr"] = group["base_lr"] * group["lr_scale"] * lr_factor(step)`` on every group.

    The lr for step 0 is set at construction; call ``step()`` once after each optimizer step.
    """

    def __init__(self, optimizer: Optimizer, kind: str, total_steps: int, warmup_steps: int = 0,
                 min_lr_ratio: float = 0.0) -> None:
        if kind not in KINDS:
            raise ValueError(f"optim.schedule must be one of {list(KINDS)}, got {kind!r}")
        if total_steps < 1:
            raise ValueError(f"the schedule needs total_steps >= 1, got {total_steps}")
        if warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {warmup_steps}")
        if kind == "cosine" and warmup_steps >= total_steps:
            raise ValueError(f"optim.warmup_steps ({warmup_steps}) must be smaller than the run's total steps "
                             f"({total_steps}) for the cosine schedule")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        for i, g in enumerate(optimizer.param_groups):
            g.setdefault("base_lr", g["lr"])
            g.setdefault("lr_scale", 1.0)
            if g["base_lr"] < 0:
                raise ValueError(f"param group {i} has a negative base_lr {g['base_lr']}")
        self.optimizer = optimizer
        self.kind, self.total_steps = kind, total_steps
        self.warmup_steps, self.min_lr_ratio = warmup_steps, min_lr_ratio
        self.last_step = 0
        self._apply()

    def factor(self, step: int | None = None) -> float:
        """lr multiplier at ``step`` (default: the current step)."""
        step = self.last_step if step is None else step
        return lr_factor(step, self.kind, self.total_steps, self.warmup_steps, self.min_lr_ratio)

    def _apply(self) -> None:
        f = self.factor()
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * g["lr_scale"] * f

    def step(self) -> None:
        """Advance one optimizer step and set the lrs for the next one."""
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        """Current lr of every group (the torch.optim.lr_scheduler spelling, for loggers)."""
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return dict(last_step=self.last_step, kind=self.kind, total_steps=self.total_steps,
                    warmup_steps=self.warmup_steps, min_lr_ratio=self.min_lr_ratio)

    def load_state_dict(self, state: dict) -> None:
        """Resume at the saved step; the schedule shape (kind, lengths) comes from the current config."""
        if "last_step" not in state:
            raise KeyError(f"scheduler state has no 'last_step' (keys: {sorted(state)})")
        self.last_step = int(state["last_step"])
        self._apply()
