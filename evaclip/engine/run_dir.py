"""The run folder: ``RUN/config.yaml`` (the resolved config), ``RUN/run_info.json`` (git revision, versions, launch),
``RUN/ckpt/``, ``RUN/run.lock`` while a run holds it. Protects a folder's work: one run at a time writes it, a new
run never starts over another run's checkpoints, and a resumed run keeps the config it was started with."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import platform
import shutil
import socket
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
                  "ckpt.keep_last", "data.workers", "dist.backend", "optim.extend")


LOCK_NAME = "run.lock"


def run_dir_of(cfg: TrainCfg) -> Path:
    return Path(cfg.output_dir) / (cfg.name or "run")


class RunFolderInUse(ConfigError):
    """Another live process holds the run folder (its lock file names it)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _holder_text(holder: dict) -> str:
    if not holder:
        return "another process (its lock file is being written)"
    job = f", torchrun job {holder['job']} of {holder['world_size']} processes" if holder.get("job") else ""
    return f"process {holder.get('pid')} on {holder.get('host')} (started {holder.get('started')}{job})"


_HELD: "set[RunLock]" = set()  # the locks this process holds (until ``release``)


def _drop_held_locks_in_child() -> None:
    """After a fork without exec (DataLoader workers, multiprocessing): close the child's copy of every held lock's
    descriptor. An ``flock`` belongs to the open file, which a forked child shares, so otherwise a data worker that
    outlives its killed parent for a few seconds would keep the run folder locked and refuse the resume."""
    for lock in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(lock._fd)
        lock._fd = None
    _HELD.clear()


os.register_at_fork(after_in_child=_drop_held_locks_in_child)


class RunLock:
    """An advisory lock on a run folder: ``RUN/run.lock`` holds the holder's host, pid, start time and torchrun job,
    and an ``flock`` on it lasts as long as the holding process (the kernel drops it when the process dies, however it
    dies, so a lock file left by a killed run is recognised as stale and taken over with a line saying so; forked
    children such as data workers drop their copy at the fork, so they never hold it past the holder). On a file
    system without ``flock`` the pid is checked instead (on this host; a holder on another host is trusted).

    One process per run takes it (rank 0, see ``hold_run_folder``); a second one gets ``RunFolderInUse`` naming the
    holder. ``release`` removes the file, and the folder too if the run left nothing else in it."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: Optional[int] = None
        self._created_dir = False

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def _refuse(self, holder: dict) -> RunFolderInUse:
        return RunFolderInUse(f"run folder {self.run_dir} is in use by {_holder_text(holder)}; wait for that run to "
                              f"end, or use another name= (lock file: {self.path})")

    def _try_flock(self, fd: int) -> Optional[bool]:
        """True: locked; False: held by a live process; None: this file system has no flock."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError as e:
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return None
            raise

    def acquire(self) -> None:
        """Take the folder or raise ``RunFolderInUse``; a stale lock of a dead process is taken over (logged)."""
        self._created_dir = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            locked = self._try_flock(fd)
            holder = self._read()
            if locked is False or (locked is None and holder and not self._stale(holder)):
                os.close(fd)
                raise self._refuse(holder)
            try:  # the holder may have removed the file between our open and our flock: lock the file in place
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        if holder:
            log.warning("run folder %s: taking over the lock left by %s, which is no longer running", self.run_dir,
                        _holder_text(holder))
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "job": os.environ.get("TORCHELASTIC_RUN_ID"), "world_size": int(os.environ.get("WORLD_SIZE", "1")),
              "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(me).encode())
        os.fsync(fd)
        self._fd = fd
        _HELD.add(self)

    @staticmethod
    def _stale(holder: dict) -> bool:
        """Without flock: a holder on this host whose pid is gone is stale; one on another host cannot be checked."""
        return holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", -1)))

    def release(self) -> None:
        """Remove the lock file (the folder too if it is otherwise empty and this run created it)."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # before the unlock: a process that opened the old file sees it is gone and retries
        os.close(self._fd)
        self._fd = None
        _HELD.discard(self)
        if self._created_dir:
            with contextlib.suppress(OSError):
                self.run_dir.rmdir()  # only if empty: a run that failed before writing leaves no folder


@contextlib.contextmanager
def hold_run_folder(run_dir: Path, env):
    """Hold ``run_dir`` for the duration of a run: rank 0 takes the lock and every rank learns whether it did (one
    collective), so all ranks of a torchrun job refuse together with the holder's name, and share one lock."""
    from evaclip import distributed as du

    lock, refusal = RunLock(run_dir), None
    if env.is_main:
        try:
            lock.acquire()
        except RunFolderInUse as e:
            refusal = str(e)
    refusal = du.broadcast_object(refusal)
    if refusal is not None:
        raise RunFolderInUse(refusal)
    try:
        yield lock
    finally:
        lock.release()


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


def _listed(diff: dict, limit: int = 6) -> str:
    items = [f"{k} ({a!r} -> {b!r})" for k, (a, b) in diff.items()]
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _names_stored_config(recipe, run_dir: Path) -> bool:
    """True when the recipe given is one of the run's own stored configs (``RUN/config.yaml``, a checkpoint's)."""
    try:
        return Path(recipe).resolve().is_relative_to(run_dir.resolve())
    except (OSError, TypeError):
        return False


def reconcile_resume(cfg: TrainCfg, overrides: dict[str, str], recipe=None) -> TrainCfg:
    """On ``resume=auto`` into a run folder that holds checkpoints, the run's stored config is the config: the
    command-line ``overrides`` are applied onto it. Overrides of ``RESUME_MUTABLE`` keys are applied with a warning
    that lists them; any other key that would differ from the stored run is refused with the list of differences.

    ``recipe`` is the recipe the command named (``cfg`` = recipe + overrides): unless it is the run's own stored
    config (``RUN/config.yaml``), a recipe that differs from the stored run in a key a resume may not change (the task
    first) is refused naming both, so a resume never silently ignores the recipe it was given."""
    if cfg.resume != "auto":
        return cfg
    stored = stored_config(cfg)
    if stored is None:
        return cfg
    run_dir = run_dir_of(cfg)
    resumed = apply_overrides(stored, overrides)
    changed = {k: v for k, v in flat_diff(stored, resumed).items() if k != "resume"}
    fixed = {k: v for k, v in changed.items() if not _mutable(k)}
    if fixed:
        raise ConfigError(f"resume=auto: the run in {run_dir} was started with a different {_listed(fixed)}; a "
                          f"resumed run keeps its config (start a new run with another name= to change it)")
    if recipe is not None and not _names_stored_config(recipe, run_dir):
        # the task first: another task's config differs in whole sections, which would hide it
        differs = {k: v for k, v in sorted(flat_diff(resumed, cfg).items(), key=lambda kv: kv[0] != "task")
                   if not _mutable(k)}
        if differs:
            raise ConfigError(
                f"resume=auto: recipe {recipe} (task {cfg.task}) is not the config of the run in {run_dir} (task "
                f"{stored.task}): {_listed(differs)}; continue the run with its stored config: evaclip train "
                f"{run_dir / 'config.yaml'} resume=auto ..., or start a new run with another name=")
    if changed:
        log.warning("resume: changed from the stored config: %s",
                    ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
    return resumed
