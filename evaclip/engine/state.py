"""The trainer's own state: what a checkpoint needs beyond model, optimizer, schedule and RNG to resume exactly."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

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
    # the train loss summed over the applied steps since the last log step (a device tensor: no host read per step);
    # checkpointed, so the first log after a resume averages the same steps as an uninterrupted run's
    loss_sum: Optional[torch.Tensor] = None
    loss_n: int = 0

    def add_loss(self, loss: torch.Tensor) -> None:
        loss = loss.detach().float()
        self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
        self.loss_n += 1

    def pop_mean_loss(self) -> float:
        """The mean train loss since the last log step (NaN when every step of the window was skipped); resets it."""
        mean = (self.loss_sum / self.loss_n).item() if self.loss_n else float("nan")
        self.loss_sum, self.loss_n = None, 0
        return mean

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
                "bad_steps_total": self.bad_steps_total, "bad_steps_in_a_row": self.bad_steps_in_a_row,
                "loss_window": [float(self.loss_sum) if self.loss_n else 0.0, self.loss_n]}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.bad_steps_total = int(state.get("bad_steps_total", 0))
        self.bad_steps_in_a_row = int(state.get("bad_steps_in_a_row", 0))
        loss_sum, loss_n = state.get("loss_window", (0.0, 0))  # absent in older checkpoints: a fresh window
        self.loss_n = int(loss_n)
        # a 0-d CPU tensor adds to a loss on any device; float32 holds the saved float32 sum exactly
        self.loss_sum = torch.tensor(loss_sum, dtype=torch.float32) if self.loss_n else None
        saved = state.get("steps_per_epoch")
        if saved not in (None, self.steps_per_epoch):
            log.warning("steps per epoch changed from %s to %d since the checkpoint (batch size, data or world size "
                        "changed): the data position is recomputed from the step", saved, self.steps_per_epoch)
