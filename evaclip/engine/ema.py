"""Weight EMA: an exponential moving average of the model's weights, kept in fp32 beside the training weights, updated
after every N applied optimizer updates, saved as one named checkpoint entry (``ema``) and evaluated beside the raw
weights (``eval/ema/*``); ``evaclip export --ema`` exports it.

The decay follows timm's ``ModelEmaV3`` (the reference the tests compare with): the first update copies the weights,
then ``decay``, or with ``ema.warmup`` ``min(decay, 1 - (1 + n / gamma) ** -power)`` at the n-th update after it.
Under FSDP2 the averages are DTensors sharded like the parameters (each rank averages its own shards; the checkpoint
entry goes through DCP); under DDP every rank holds the same full copy (rank 0 writes it). Skipped (non-finite) steps
do not update it, so it follows the applied updates exactly and resumes bitwise.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from evaclip.distributed import unwrap


class WeightEMA:
    """The EMA of ``model``'s floating-point parameters and persistent buffers (the names of ``model.state_dict()``;
    the bare model, after FSDP2 sharding). ``cfg`` is the ``ema`` config section."""

    def __init__(self, model: nn.Module, cfg):
        self.cfg = cfg
        self.updates = 0  # applied updates seen (every one counts; every ``cfg.every``-th changes the average)
        self._names = set(model.state_dict().keys())  # recomputed tables (non-persistent buffers) are not averaged
        self.shadow: dict[str, torch.Tensor] = {
            name: t.detach().float().clone() for name, t in self._tracked(model)}

    def _tracked(self, model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.is_floating_point() and name in self._names:
                yield name, t

    def decay(self, n: int) -> float:
        """The decay of the ``n``-th average (1-based; timm ``ModelEmaV3.get_decay(n)``): 0 for the first (a copy)."""
        k = max(0, n - 1)
        if k == 0:
            return 0.0
        if self.cfg.warmup:
            return min(self.cfg.decay, 1.0 - (1.0 + k / self.cfg.warmup_gamma) ** -self.cfg.warmup_power)
        return self.cfg.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Called after each applied optimizer update (the engine's step hook; ``model`` may be wrapped)."""
        self.updates += 1
        if self.updates % self.cfg.every:
            return
        weight = 1.0 - self.decay(self.updates // self.cfg.every)
        for name, t in self._tracked(unwrap(model)):
            self.shadow[name].lerp_(t.detach().float(), weight)

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module):
        """Context: ``model`` (bare) holds the averaged weights; the training weights come back bitwise after."""
        tracked = dict(self._tracked(model))
        backup = {name: t.detach().clone() for name, t in tracked.items()}
        with torch.no_grad():
            for name, t in tracked.items():
                t.copy_(self.shadow[name].to(t.dtype))
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, t in tracked.items():
                    t.copy_(backup[name])

    def state_dict(self) -> dict:
        return {"updates": torch.tensor(self.updates), "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        shadow = state["shadow"]
        if shadow.keys() != self.shadow.keys():
            from evaclip.checkpoint import CheckpointError

            missing, unexpected = sorted(self.shadow.keys() - shadow.keys()), sorted(shadow.keys() - self.shadow.keys())
            raise CheckpointError(f"weight EMA state does not match the model: missing {missing[:8]}, unexpected "
                                  f"{unexpected[:8]}")
        with torch.no_grad():
            for name, t in self.shadow.items():
                t.copy_(shadow[name])
        self.updates = int(state["updates"])
