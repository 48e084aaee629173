"""The run folder: ``RUN/config.yaml`` (the resolved config), ``RUN/run_info.json`` (git revision, versions, launch),
``RUN/ckpt/``. Protects a folder's work: a new run never starts over another run's checkpoints, and a resumed run
keeps the config it was started with."""
from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from evaclip.config import ConfigError, TrainCfg, apply_overrides, flat_diff, from_yaml, to_yaml
from evaclip.logging import get_logger

log = get_logger(__name__)

# Keys a resumed run may change (with a warning that lists them): how long it runs, how often it logs, evaluates and
# checkpoints, where it runs, how many workers read. Everything else (model, data, optimizer, loss, batch, seed,
# precision) is the run: changing it on resume would silently make a different run, so it is refused.
RESUME_MUTABLE = ("max_steps", "epochs", "resume", "device", "max_bad_steps", "log.", "eval.", "ckpt.every",
                  "ckpt.keep_last", "data.workers", "dist.backend")


def run_dir_of(cfg: TrainCfg) -> Path:
    return Path(cfg.output_dir) / (cfg.name or "run")


def git_revision(short: bool = False) -> dict:
    """The evaclip source tree's commit and whether it has uncommitted changes (None outside a git checkout)."""
    repo = Path(__file__).resolve().parent.parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short" if short else "--verify", "HEAD"], cwd=repo,
                             capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return {"commit": None, "dirty": None}
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10)
        return {"commit": rev.stdout.strip(), "dirty": bool(dirty.stdout.strip()) if dirty.returncode == 0 else None}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def write_run_info(run_dir: Path, cfg: TrainCfg, world_size: int, device: torch.device) -> None:
    """``config.yaml`` and ``run_info.json`` in the run folder (call only once every check has passed)."""
    from evaclip import __version__
    from evaclip.checkpoint import atomic_write_text

    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(to_yaml(cfg), run_dir / "config.yaml")
    info = {"git": git_revision(), "evaclip": __version__, "torch": torch.__version__,
            "python": platform.python_version(), "world_size": world_size, "device": str(device),
            "argv": sys.argv, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_text(json.dumps(info, indent=1), run_dir / "run_info.json")


def refuse_foreign_checkpoints(cfg: TrainCfg) -> None:
    """A run that is not resuming must not start in a folder holding another run's checkpoints (keep-last-K pruning
    would delete the new run's checkpoints in favour of the old run's higher steps)."""
    from evaclip.checkpoint import list_checkpoints

    run_dir = run_dir_of(cfg)
    found = list_checkpoints(run_dir / "ckpt")
    if found:
        raise ConfigError(
            f"run folder {run_dir} already holds checkpoints of another run (newest: {found[0].name}); continue that "
            f"run with resume=auto, or start a new one with another name= (e.g. name={run_dir.name}_2)")


def clean_stale_tmp(ckpt_root: Path) -> None:
    """Remove ``.tmp_step_*`` folders left by a checkpoint write that was killed (they are never complete)."""
    if not ckpt_root.is_dir():
        return
    for tmp in sorted(ckpt_root.glob(".tmp_step_*")):
        log.info("removing %s, left by an interrupted checkpoint write", tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def stored_config(cfg: TrainCfg) -> Optional[TrainCfg]:
    """The config of the newest checkpoint in ``cfg``'s run folder (None if there is none)."""
    from evaclip.checkpoint import list_checkpoints

    for path in list_checkpoints(run_dir_of(cfg) / "ckpt"):
        if (path / "config.yaml").is_file():
            return from_yaml((path / "config.yaml").read_text(), source=str(path / "config.yaml"))
    return None


def _mutable(key: str) -> bool:
    return any(key == m or (m.endswith(".") and key.startswith(m)) for m in RESUME_MUTABLE)


def reconcile_resume(cfg: TrainCfg, overrides: dict[str, str]) -> TrainCfg:
    """On ``resume=auto`` into a run folder that holds checkpoints, the run's stored config is the config: the
    command-line ``overrides`` are applied onto it. Overrides of ``RESUME_MUTABLE`` keys are applied with a warning
    that lists them; any other key that would differ from the stored run is refused with the list of differences."""
    if cfg.resume != "auto":
        return cfg
    stored = stored_config(cfg)
    if stored is None:
        return cfg
    resumed = apply_overrides(stored, overrides)
    changed = {k: v for k, v in flat_diff(stored, resumed).items() if k != "resume"}
    fixed = {k: v for k, v in changed.items() if not _mutable(k)}
    if fixed:
        listed = ", ".join(f"{k} ({a!r} -> {b!r})" for k, (a, b) in fixed.items())
        raise ConfigError(f"resume=auto: the run in {run_dir_of(cfg)} was started with a different {listed}; a "
                          f"resumed run keeps its config (start a new run with another name= to change it)")
    if changed:
        log.warning("resume: changed from the stored config: %s",
                    ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
    return resumed
