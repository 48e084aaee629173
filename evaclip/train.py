"""``evaclip train`` / ``python -m evaclip.train`` / ``torchrun ... -m evaclip.train``: the command line of a run.

Everything is checked before anything is written: the config (keys, types, choices, ranges), a resume's stored
config, the task's files. Exit codes: 0 finished, 2 bad config or input, 1 stopped (diverged, bad checkpoint),
143 preempted by SIGTERM and 130 stopped by Ctrl-C (both after saving a checkpoint).
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Optional

from evaclip import checkpoint as ckpt
from evaclip import distributed as du
from evaclip.config import ConfigError, get_task, load_config, parse_overrides
from evaclip.engine import TrainingStopped, train
from evaclip.engine.run_dir import reconcile_resume, run_dir_of
from evaclip.models.convert import CheckpointError as WeightsError  # a teacher / init file of the wrong kind

USAGE = """usage: evaclip train RECIPE [key=value ...]
       python -m evaclip.train RECIPE [key=value ...]
       torchrun --nproc_per_node=N -m evaclip.train RECIPE [key=value ...]

RECIPE is a YAML file or the name of one in recipes/ (e.g. demo_cpu); its `task` picks the objective (clip:
contrastive image-text; mim: EVA's masked image modeling from a CLIP teacher, e.g. eva02_mim_b14). Overrides are
dotted config keys (optim.lr=1e-3 data.batch_size=64 resume=auto); `evaclip config RECIPE` prints every key.
A run holds its folder while it runs (RUN/run.lock names the process); a second run into it is refused, and so is
a new run into a folder that already holds checkpoints (use another name= or resume=auto).
resume=auto continues a run from its newest checkpoint with the config it was started with. The recipe must be
that config: RUN/config.yaml (the stored config, always accepted), or the recipe and overrides it was started with;
any other recipe or task is refused with the keys that differ. Keys that may change on resume: max_steps, epochs,
resume, device, max_bad_steps, log.*, eval.*, ckpt.every, ckpt.keep_last, data.workers, dist.backend, optim.extend.
Running past a finished run's lr schedule (a larger max_steps) needs optim.extend=segment (a new warmup + schedule
over the added steps) or optim.extend=tail (the added steps at the schedule's final lr); the resume line says which."""


def main(cfg):
    """Train ``cfg`` (a validated ``TrainCfg``) with the task it names; returns the engine's ``TrainResult``."""
    return train(cfg, get_task(cfg.task))


def cli(argv: Optional[list[str]] = None) -> int:
    """Parse ``RECIPE [key=value ...]``, validate the whole config (before any work), train. Returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    try:
        cfg = load_config(argv[0], argv[1:])
        cfg = reconcile_resume(cfg, parse_overrides(argv[1:]), recipe=argv[0])
    except ConfigError as e:
        print(f"evaclip train: {e}", file=sys.stderr)
        return 2
    resume_hint = f"continue with: evaclip train {run_dir_of(cfg) / 'config.yaml'} resume=auto"
    try:
        result = main(cfg)
    except (ConfigError, TrainingStopped, ckpt.CheckpointError, WeightsError) as e:  # one line: what to fix
        print(f"evaclip train: {type(e).__name__}: {e}", file=sys.stderr)
        return 2 if isinstance(e, (ConfigError, WeightsError)) else 1
    except KeyboardInterrupt:
        print(f"evaclip train: interrupted; {resume_hint} (from its newest checkpoint)", file=sys.stderr)
        return 128 + signal.SIGINT
    if result.status == "preempted":  # not finished: a wrapper must not go on to evaluation / export
        print(f"evaclip train: stopped by {signal.Signals(result.signal).name} at step {result.step} after saving "
              f"{result.checkpoint}; {resume_hint}", file=sys.stderr)
        return 128 + (result.signal or signal.SIGTERM)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    du.exit_process(cli())
