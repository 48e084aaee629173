"""What the engine drives: the ``Task`` interface one training objective (CLIP, MIM, ...) implements, the
``StepContext`` a task's step gets, and the ``TrainData`` a task's ``build_data`` returns.

The engine (``evaclip.engine``) owns everything objectives share: the step loop, accumulation helpers, the finite
check and bad-step skipping, the optimizer step, cadence of log / checkpoint / eval, preemption, exact resume and the
run folder. A task owns one objective: its model, its data, how a batch reaches the device, the forward + backward of
one optimizer step, what happens around a step, its evaluation and its metrics. The engine never imports a task; the
command line looks the task up by name (``evaclip.config.get_task(cfg.task)``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterable, Protocol

import torch
from torch import nn

from evaclip.config import TrainCfg


class TrainData(Protocol):
    """This rank's training stream, as ``Task.build_data`` returns it (``evaclip.data.DataInfo`` is one)."""

    loader: Iterable  # the batches of the current epoch
    num_batches: int  # batches per epoch on this rank; every rank yields exactly that many

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Position the stream at batch ``start_step`` of ``epoch`` (exact resume)."""

    def skipped(self) -> int:
        """Samples skipped so far (corrupt or missing); logged by the engine."""


@dataclass
class StepContext:
    """What a task's ``forward_backward`` needs from the engine for one optimizer step.

    ``autocast()`` opens the run's autocast context (a no-op for fp32); ``backward(loss)`` runs backward through the
    loss scaler (fp16) or plainly; ``grad_sync(model, enabled)`` is a context that switches the data-parallel
    gradient all-reduce on (the last micro-batch) or off (the earlier ones); ``device`` is this rank's device.
    """

    autocast: Callable[[], ContextManager]
    backward: Callable[[torch.Tensor], None]
    grad_sync: Callable[[nn.Module, bool], ContextManager]
    device: torch.device


class Task:
    """Base class of a training objective. Subclasses set ``name`` and implement the methods marked as required.

    ``cfg`` is the whole validated ``TrainCfg`` (the task reads its own section and the shared ``model`` / ``data``
    sections); ``env`` is the process's ``DistEnv`` (rank, world size, device).
    """

    name: str = "task"
    Cfg: type = TrainCfg  # the task's config schema: ``TrainCfg`` or a subclass with the task's own sections

    def __init__(self, cfg, env):
        self.cfg = cfg
        self.env = env

    # -- building ------------------------------------------------------------------------------------------------
    @classmethod
    def check(cls, cfg) -> None:
        """Checks of ``cfg`` that need the registries or the filesystem (files named in the task's config exist, the
        model name is known); raise ``ConfigError`` naming the key. Runs before any process group or file exists."""

    def build_data(self, steps_hint: int) -> TrainData:
        """This rank's training data (a ``TrainData``). Required."""
        raise NotImplementedError

    def build_model(self) -> nn.Module:
        """The trainable model, on the CPU, with the same initial weights on every rank (the engine seeds first). It
        exposes the optimizer hooks ``no_weight_decay``, ``param_tower``, ``layer_id``, ``num_layers``. Required."""
        raise NotImplementedError

    def setup(self, model: nn.Module) -> None:
        """Called once after the model is wrapped (DDP / FSDP2) and on its device: move or shard the task's extra
        modules (e.g. a frozen teacher). ``model`` is the bare (unwrapped) model."""

    # -- one step ------------------------------------------------------------------------------------------------
    def to_device(self, batch: Any) -> Any:
        """One micro-batch from the loader, moved to ``self.env.device`` (host-side work such as trimming first; no
        device sync). Required."""
        raise NotImplementedError

    def loss(self, model: nn.Module, micro_batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of one device micro-batch (run under autocast) and extras to log: ``(loss, {name: tensor})``.
        The default ``forward_backward`` calls it; a task that overrides ``forward_backward`` need not."""
        raise NotImplementedError(f"{type(self).__name__} implements neither loss() nor forward_backward()")

    def forward_backward(self, model: nn.Module, micro: list, ctx: StepContext) -> dict[str, torch.Tensor]:
        """Forward + backward of one optimizer step over ``micro`` (K device micro-batches). Returns detached
        tensors: ``"loss"`` (the step's loss, 0-d) and extras; the engine logs every 0-d extra as ``train/<name>`` at
        log steps. Gradients must equal those of the whole K x B batch at once. Default: plain accumulation of
        ``loss`` (``evaclip.engine.step.accumulate``: loss / K per micro-batch, gradient sync on the last), exact for
        losses that are means over independent samples; a loss over the whole batch (CLIP's) overrides it."""
        from evaclip.engine.step import accumulate

        return accumulate(model, micro, ctx, self.loss)

    def before_step(self, model: nn.Module, step: int, logger) -> None:
        """Called before the micro-batches of ``step`` are drawn (e.g. switch a token-drop phase)."""

    def after_update(self, model: nn.Module) -> None:
        """Called after a successful (not skipped) optimizer update (e.g. clamp a logit scale)."""

    # -- reporting -----------------------------------------------------------------------------------------------
    def evaluate(self, model: nn.Module, step: int) -> dict[str, Any]:
        """The task's evaluation (every rank takes part); returns ``{name: value}``, logged under ``eval/``. The
        engine keeps the training RNG stream untouched around it and restores train mode."""
        return {}

    def state_dict(self) -> dict:
        """Task state that must survive a resume beyond model / optimizer / RNG (usually none)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned."""
