"""RNG discipline for exact resume: the model's random stream (token-drop masks, dropout) is a function of the step.

The data pipeline may draw host random numbers when an iterator starts or a batch is made in-process (workers=0);
those draws are fenced off the model's stream. Checkpoints save / restore the streams themselves
(``evaclip.checkpoint.get_rng_state``).
"""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch


def seed_all(seed: int) -> None:
    """Seed python, numpy and torch (every device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def host_rng_untouched():
    """Run a block without moving the host RNG streams (torch CPU, python, numpy)."""
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        random.setstate(states[1])
        np.random.set_state(states[2])


def fresh_iter(loader):
    """``iter(loader)`` without touching the host RNG (a DataLoader draws its worker base seed from it)."""
    with host_rng_untouched():
        return iter(loader)


def next_batch(batches, epoch: int = 0):
    """``next(batches)`` without touching the host RNG (see the module docstring)."""
    with host_rng_untouched():
        try:
            return next(batches)
        except StopIteration as e:
            raise RuntimeError(f"the train loader ended early in epoch {epoch}: every rank must yield the "
                               "DataInfo's num_batches batches per epoch") from e


class DeviceRng:
    """Snapshot / restore of the torch RNG used by the model on ``device`` (replaying a micro-batch's random draws)."""

    def __init__(self, device: torch.device):
        self.device = device

    def get(self):
        cpu = torch.get_rng_state()
        return (cpu, torch.cuda.get_rng_state(self.device)) if self.device.type == "cuda" else (cpu, None)

    def set(self, state) -> None:
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], self.device)
