"""The training engine: what every objective shares (see ``evaclip.engine.task`` for what a task provides).

``train(cfg, task_cls)`` runs a task to the end; ``evaclip.train`` is the command line around it. Submodules:
``task`` (what a task provides), ``loop`` (the step loop), ``step`` (one optimizer step), ``state`` (trainer state),
``rng`` (RNG discipline), ``run_dir`` (run folder), ``signals`` (preemption).
"""
from __future__ import annotations

__all__ = ["TrainResult", "TrainingStopped", "train"]


def __getattr__(name: str):
    # the loop pulls in the optimizer, checkpointing and logging: import it only when asked for
    if name in __all__:
        from evaclip.engine import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'evaclip.engine' has no attribute {name!r}")
