"""One optimizer step, shared by every task: gradient sync per micro-batch, plain accumulation, the finite check with
bad-step skipping, clipping and the optimizer / loss-scaler step.

Host syncs: the hot path reads the device once per step, a 3-float tensor (non-finite loss, non-finite gradient norm,
stop request) max-reduced over ranks. Skipping a NaN/Inf step *without* any sync would mean always running the
optimizer with masked gradients, which still decays LAMB's moments and applies weight decay: not a skipped step. One
small read per step costs far less than a step (the fp16 loss scaler reads its overflow flag every step anyway), and
it lets every rank agree on skipping and on stopping (SIGTERM) at the same step.
With bf16 / fp32 that read is the step's only host sync (``evaclip bench train`` counts it: 1 per step); fp16
adds the loss scaler's read of its inf flag.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from evaclip import distributed as du
from evaclip.engine.task import StepContext
from evaclip.optim import clip_grad_norm_
from evaclip.precision import autocast_for, make_grad_scaler


def grad_sync(model: nn.Module, enabled: bool):
    """Context: gradient all-reduce on (last micro-batch) or off (earlier ones) for DDP / FSDP2 / plain models."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if enabled else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def step_context(autocast, scaler, device: torch.device) -> StepContext:
    """The ``StepContext`` handed to a task: autocast factory, backward through the loss scaler, gradient sync."""

    def backward(loss: torch.Tensor) -> None:
        (scaler.scale(loss) if scaler is not None and scaler.is_enabled() else loss).backward()

    return StepContext(autocast=autocast, backward=backward, grad_sync=grad_sync, device=device)


def accumulate(model: nn.Module, micro: list, ctx: StepContext,
               loss_of: Callable[[nn.Module, Any], tuple[torch.Tensor, dict]]) -> dict[str, torch.Tensor]:
    """Plain gradient accumulation over K micro-batches: backward of ``loss / K`` for each, gradient sync on the last
    only. ``loss_of(model, micro_batch) -> (loss, extras)`` runs under autocast. Exact for losses that are means over
    independent samples (equal micro-batch sizes). Returns the mean loss and the extras averaged over micro-batches,
    detached (no host sync)."""
    k = len(micro)
    total: dict[str, torch.Tensor] = {}
    for j, mb in enumerate(micro):
        with ctx.grad_sync(model, j == k - 1):
            with ctx.autocast():
                loss, extras = loss_of(model, mb)
            ctx.backward(loss / k)
        for name, value in {"loss": loss, **extras}.items():
            value = value.detach().float() / k
            total[name] = total[name] + value if name in total else value
    return total


@dataclass
class Update:
    """Outcome of one optimizer step (host values, agreed by all ranks)."""

    bad_loss: bool
    bad_grad: bool
    stop: bool
    bad: bool
    grad_norm: torch.Tensor


def apply_update(model: nn.Module, optimizer, scaler, grad_clip_norm, loss: torch.Tensor,
                 stop_requested: bool) -> Update:
    """Unscale (fp16), clip, and step the optimizer, unless the loss or the gradient norm is non-finite on any rank.

    A skipped step zeroes the gradients and leaves parameters and optimizer state untouched. With fp16, overflowing
    gradients are the loss scaler's business (it skips the step and lowers the scale); only a non-finite loss counts
    as a bad step there.
    """
    if scaler.is_enabled():
        scaler.unscale_(optimizer)
    grad_norm = clip_grad_norm_(model, grad_clip_norm)
    dev = loss.device
    # the stop flag is filled on the device (torch.tensor(x, device=cuda) is a blocking copy: a second host sync)
    flags = torch.stack([(~torch.isfinite(loss)).float(), (~torch.isfinite(grad_norm.to(dev))).float(),
                         torch.full((), float(stop_requested), device=dev)])
    bad_loss, bad_grad, stop = (v > 0 for v in du.all_reduce_(flags, "max").tolist())
    bad = bad_loss or (bad_grad and not scaler.is_enabled())
    if bad:
        if scaler.is_enabled():
            scaler.update()  # consumes the inf check recorded by unscale_, lowers the scale
    elif scaler.is_enabled():
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return Update(bad_loss=bad_loss, bad_grad=bad_grad, stop=stop, bad=bad, grad_norm=grad_norm)


@dataclass
class Step:
    """One optimizer step of a task, assembled once (``build_step``): ``step(micro, stop_requested)`` runs the
    task's ``forward_backward`` over the K micro-batches, ``apply_update``, then, when the update was not skipped,
    the task's ``after_update`` and ``after_update`` hooks of the engine's features (weight EMA). The training loop
    and both benchmarks (``evaclip bench train`` / ``mim``) call this same object."""

    task: Any
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: Any
    ctx: StepContext
    grad_clip_norm: Optional[float]
    hooks: list = field(default_factory=list)  # callables(model) after each applied update

    def __call__(self, micro: list, stop_requested: bool = False) -> tuple[dict[str, torch.Tensor], Update]:
        out = self.task.forward_backward(self.model, micro, self.ctx)
        upd = apply_update(self.model, self.optimizer, self.scaler, self.grad_clip_norm, out["loss"], stop_requested)
        if not upd.bad:
            self.task.after_update(self.model)
            for hook in self.hooks:
                hook(self.model)
        return out, upd


def build_step(cfg, task, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> Step:
    """The step of a run: the loss scaler and autocast of ``cfg.precision`` (FSDP2 runs get the sharded scaler),
    gradient clipping at ``cfg.optim.grad_clip_norm``; ``model`` is the wrapped (DDP / FSDP2) model."""
    scaler = make_grad_scaler(cfg.precision, cfg.dist.strategy, device)
    ctx = step_context(autocast_for(cfg.precision, device), scaler, device)
    return Step(task, model, optimizer, scaler, ctx, cfg.optim.grad_clip_norm)


def lr_by_tower(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The highest lr of each tower's groups (the top layer's, with layer-wise decay)."""
    out: dict[str, float] = {}
    for g in optimizer.param_groups:
        tower = g.get("tower", "all")
        out[tower] = max(out.get(tower, 0.0), g["lr"])
    return out
