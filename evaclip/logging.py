"""Run logging: console progress, ``metrics.jsonl``, TensorBoard and wandb, all from rank 0.

This module is ``evaclip.logging``; the standard library's ``logging`` is imported as ``_logging`` (absolute imports
keep ``import logging`` elsewhere in the package pointing at the stdlib). wandb and TensorBoard are imported only
when enabled.
"""
from __future__ import annotations

import json
import logging as _logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional

_ROOT = "evaclip"


def get_logger(name: str = _ROOT) -> _logging.Logger:
    """A logger under the ``evaclip`` hierarchy (configured by ``setup_console``)."""
    return _logging.getLogger(name if name.startswith(_ROOT) else f"{_ROOT}.{name}")


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of ``RUN/metrics.jsonl`` in order (``[]`` without one); a line that does not parse (the partial
    last line of a writer killed mid-line) is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def setup_console(rank: int = 0, level: int = _logging.INFO) -> None:
    """Console handler for the ``evaclip`` loggers: rank 0 logs at ``level``, other ranks only warnings and errors."""
    logger = _logging.getLogger(_ROOT)
    for h in list(logger.handlers):
        if getattr(h, "_evaclip", False):
            logger.removeHandler(h)
    handler = _logging.StreamHandler(sys.stdout)
    prefix = "" if rank == 0 else f"[rank {rank}] "
    handler.setFormatter(_logging.Formatter(f"%(asctime)s {prefix}%(message)s", datefmt="%H:%M:%S"))
    handler._evaclip = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level if rank == 0 else _logging.WARNING)
    logger.propagate = False


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Throughput:
    """Samples/s over the last log window and an ETA from the mean step time since the (re)start."""

    def __init__(self, start_step: int, total_steps: int):
        self.total_steps = total_steps
        self.start_step = start_step
        self.t0 = self.t_last = time.perf_counter()
        self.step_last = start_step

    def update(self, step: int, samples_per_step: int) -> dict[str, float]:
        """Call at a log step (``step`` optimizer steps done); returns samples/s, step time and ETA seconds."""
        now = time.perf_counter()
        steps = max(1, step - self.step_last)
        window = max(1e-9, now - self.t_last)
        mean_step = (now - self.t0) / max(1, step - self.start_step)
        self.t_last, self.step_last = now, step
        return {"samples_per_s": samples_per_step * steps / window, "step_time_s": window / steps,
                "eta_s": mean_step * (self.total_steps - step)}


class MetricLogger:
    """Writes the same numbers to the console, ``metrics.jsonl``, TensorBoard and wandb (rank 0; no-op elsewhere)."""

    def __init__(self, run_dir: Path, log_cfg, *, rank: int = 0, total_steps: int = 0, run_name: str = "run",
                 config: Optional[dict] = None):
        self.enabled = rank == 0
        self.total_steps = total_steps
        self.log = get_logger("evaclip.train")
        self._jsonl = None
        self._tb = None
        self._wandb = None
        if not self.enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if log_cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise RuntimeError(f"log.tensorboard=true needs the tensorboard package ({e}); "
                                   "install it or set log.tensorboard=false") from e
            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if log_cfg.wandb and log_cfg.wandb_mode != "disabled":
            try:
                import wandb
            except ImportError as e:
                raise RuntimeError(f"log.wandb=true needs the wandb package ({e}); install it or set log.wandb=false") \
                    from e
            self._wandb = wandb.init(project=log_cfg.wandb_project, name=run_name, id=_wandb_id(run_dir),
                                     dir=str(run_dir), mode=log_cfg.wandb_mode, config=config, resume="allow")

    def event(self, kind: str, **fields: Any) -> None:
        """A non-metric record in ``metrics.jsonl`` (start, resume, skipped step, stop)."""
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"event": kind, **fields}) + "\n")

    def log_metrics(self, step: int, metrics: dict[str, float], prefix: str = "train") -> None:
        """Record ``metrics`` at optimizer step ``step`` everywhere (no console line)."""
        if not self.enabled:
            return
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": step, **{f"{prefix}/{k}": v for k, v in metrics.items()}}) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(f"{prefix}/{k}", v, step)
        if self._wandb is not None:
            self._wandb.log({f"{prefix}/{k}": v for k, v in metrics.items()}, step=step)

    def progress(self, step: int, metrics: dict[str, float]) -> None:
        """Console line: step, samples/s, ETA, loss, lr per group, logit scale, skipped samples / steps."""
        if not self.enabled:
            return
        width = len(str(self.total_steps))
        parts = [f"step {step:>{width}}/{self.total_steps}"]
        if "samples_per_s" in metrics:
            parts.append(f"{metrics['samples_per_s']:,.1f} samples/s")
        if "eta_s" in metrics:
            parts.append(f"eta {format_duration(metrics['eta_s'])}")
        if "loss" in metrics:
            parts.append(f"loss {metrics['loss']:.4f}")
        lrs = [f"{k[3:]} {v:.2e}" for k, v in metrics.items() if k.startswith("lr/")]
        if lrs:
            parts.append("lr " + " ".join(lrs))
        if "logit_scale" in metrics:
            parts.append(f"scale {metrics['logit_scale']:.1f}")
        if metrics.get("skipped_samples"):
            parts.append(f"skipped samples {int(metrics['skipped_samples'])}")
        if metrics.get("bad_steps"):
            parts.append(f"bad steps {int(metrics['bad_steps'])}")
        self.log.info(" | ".join(parts))

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _wandb_id(run_dir: Path) -> str:
    """A stable wandb run id per run folder, so a resumed run continues the same wandb run."""
    id_file = run_dir / "wandb_id.txt"
    if id_file.is_file():
        return id_file.read_text().strip()
    run_id = f"{run_dir.name[:40]}-{int(time.time())}"
    id_file.write_text(run_id)
    return run_id
