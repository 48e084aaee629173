"""Learning-rate schedules by optimizer step: linear warmup, then cosine decay to a floor, or constant.

The scheduler multiplies each group's own peak lr (``base_lr * lr_scale``) by one factor, so the tower lrs and the
layer-wise decay hold at every step. A schedule is a list of segments ``(start, end, warmup)``: one for a run as
started, one more each time a finished schedule is extended with ``optim.extend=segment``.
"""
from __future__ import annotations

import math
from typing import Optional

from torch.optim import Optimizer

KINDS = ("cosine", "const")
EXTEND = ("tail", "segment")  # optim.extend: a resumed run that goes past its schedule's end


def plan_resume(saved: dict, total_steps: int, extend: Optional[str], kind: str, warmup_steps: int,
                min_lr_ratio: float) -> tuple[list[tuple[int, int, int]], str]:
    """The segments of a resumed run's schedule and a line saying what happens to it.

    ``saved`` is the checkpoint's scheduler state. A run that stops at or before its saved schedule's end keeps that
    schedule exactly. A run that goes past it needs ``extend``: ``tail`` keeps the schedule (the added steps run at
    its final lr), ``segment`` appends a new segment (``warmup_steps`` of warmup, then ``kind`` to the floor) over the
    added steps. Raises ValueError naming both choices when ``extend`` is None.
    """
    segments = [tuple(int(v) for v in seg) for seg in saved.get("segments") or
                [(0, saved.get("total_steps", total_steps), saved.get("warmup_steps", warmup_steps))]]
    end = segments[-1][1]
    if total_steps <= end:
        note = f"the lr schedule continues as saved ({kind}, ends at step {end})"
        return segments, note + (f"; this run stops before it, at step {total_steps}" if total_steps < end else "")
    final = "its peak lr" if kind == "const" else f"its floor, min_lr_ratio {min_lr_ratio:g} x peak lr"
    if extend is None:
        raise ValueError(f"optim.extend: this run goes to step {total_steps}, past its lr schedule's end at step {end}"
                         "; "
                         f"choose optim.extend=tail (steps {end}..{total_steps} at {final}) or optim.extend=segment "
                         f"(a new {warmup_steps}-step warmup, then {kind} over steps {end}..{total_steps})")
    if extend == "tail":
        idle = " (lr 0: these steps leave the weights unchanged)" if kind == "cosine" and min_lr_ratio == 0 else ""
        return segments, (f"optim.extend=tail: the lr schedule ended at step {end}; steps {end}..{total_steps} run at "
                          f"{final}{idle}")
    if extend != "segment":
        raise ValueError(f"optim.extend must be one of {list(EXTEND)}, got {extend!r}")
    if kind == "cosine" and warmup_steps >= total_steps - end:
        raise ValueError(f"optim.extend=segment: the new segment's {total_steps - end} steps ({end}..{total_steps}) "
                         f"must be more than optim.warmup_steps ({warmup_steps})")
    return segments + [(end, total_steps, warmup_steps)], (
        f"optim.extend=segment: the lr schedule ended at step {end}; a new segment over steps {end}..{total_steps}: "
        f"{warmup_steps}-step warmup, then {kind} to min_lr_ratio {min_lr_ratio:g}")


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
                 min_lr_ratio: float = 0.0, extend: Optional[str] = None) -> None:
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
        self.warmup_steps, self.min_lr_ratio, self.extend = warmup_steps, min_lr_ratio, extend
        self.segments: list[tuple[int, int, int]] = [(0, total_steps, warmup_steps)]
        self.resume_note = ""
        self.last_step = 0
        self._apply()

    def factor(self, step: int | None = None) -> float:
        """lr multiplier at ``step`` (default: the current step); past the last segment's end: its final value."""
        step = self.last_step if step is None else step
        start, end, warmup = next(seg for seg in reversed(self.segments) if seg[0] <= step)
        return lr_factor(step - start, self.kind, end - start, warmup, self.min_lr_ratio)

    def plan_resume(self, saved: dict) -> tuple[list[tuple[int, int, int]], str]:
        """What resuming from the scheduler state ``saved`` does to this run's schedule (see ``plan_resume``)."""
        return plan_resume(saved, self.total_steps, self.extend, self.kind, self.warmup_steps, self.min_lr_ratio)

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
                    warmup_steps=self.warmup_steps, min_lr_ratio=self.min_lr_ratio,
                    segments=[list(seg) for seg in self.segments])

    def load_state_dict(self, state: dict) -> None:
        """Resume at the saved step with the saved segments (extended as ``plan_resume`` says; its line is
        ``resume_note``); kind and floor come from the current config."""
        if "last_step" not in state:
            raise KeyError(f"scheduler state has no 'last_step' (keys: {sorted(state)})")
        self.segments, self.resume_note = self.plan_resume(state)
        self.last_step = int(state["last_step"])
        self._apply()
