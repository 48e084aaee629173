"""The trainer's own state: what a checkpoint needs beyond model, optimizer, schedule and RNG to resume exactly."""
from __future__ import annotations

from dataclasses import dataclass

from evaclip.logging import get_logger

log = get_logger(__name__)


@dataclass
class TrainerState:
    """Step counter and data position. The data position is a function of the step: epoch ``e`` holds the steps
    ``[e * steps_per_epoch, (e + 1) * steps_per_epoch)``, each of ``accum_freq`` micro-batches."""

    steps_per_epoch: int
    accum_freq: int = 1
    global_batch: int = 0
    step: int = 0
    bad_steps_total: int = 0
    bad_steps_in_a_row: int = 0  # consecutive skipped (non-finite) steps up to now

    def record_update(self, bad: bool) -> int:
        """Count one optimizer step as skipped (``bad``) or applied; returns the skipped steps in a row."""
        self.bad_steps_in_a_row = self.bad_steps_in_a_row + 1 if bad else 0
        self.bad_steps_total += int(bad)
        return self.bad_steps_in_a_row

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    @property
    def batch_in_epoch(self) -> int:
        """Index of the next micro-batch within its epoch."""
        return (self.step % self.steps_per_epoch) * self.accum_freq

    def state_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "steps_per_epoch": self.steps_per_epoch, "samples_seen": self.step * self.global_batch,
                "bad_steps_total": self.bad_steps_total, "bad_steps_in_a_row": self.bad_steps_in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.bad_steps_total = int(state.get("bad_steps_total", 0))
        self.bad_steps_in_a_row = int(state.get("bad_steps_in_a_row", 0))
        saved = state.get("steps_per_epoch")
        if saved not in (None, self.steps_per_epoch):
            log.warning("steps per epoch changed from %s to %d since the checkpoint (batch size, data or world size "
                        "changed): the data position is recomputed from the step", saved, self.steps_per_epoch)
