"""Training checkpoints: atomic folder-per-step saves, keep-last-K, verified resume.

Layout (one folder per optimizer step, ``RUN/ckpt/step_00000100/``)::

    model.pt        model state dict (of the bare model; DDP / compile wrappers removed)
    optimizer.pt    optimizer state dict
    NAME.pt         one file per named stateful entry the caller passes (``states={"trainer": ..., "scheduler": ...,
                    "scaler": ..., "task": ..., "ema": ...}``): its ``state_dict()``; an entry whose state holds
                    sharded tensors (DTensors: FSDP2) is a DCP folder ``NAME/`` instead, written by every rank
    rng_rank{R}.pt  python / numpy / torch / cuda RNG states of rank R
    config.yaml     the resolved config, for people (also inside trainer.pt as ``config_yaml``)
    meta.json       written last: format version, step, world size, size and sha256 of every file above

A save writes into ``ckpt/.tmp_step_XXXXXXXX/``, fsyncs every file, writes ``meta.json``, then renames the folder to
``step_XXXXXXXX`` and fsyncs ``ckpt/``: a folder named ``step_*`` is complete by construction, and ``meta.json`` lets
resume detect a checkpoint damaged later (truncated copy, bad disk) before touching the model. Everything stored is
tensors and primitives, so every load uses ``torch.load(weights_only=True)``.

The model / optimizer state goes through ``get_state_io(strategy)``: DDP saves full state dicts on rank 0; the FSDP
strategy uses ``evaclip.checkpoint_sharded`` (DCP); other strategies plug in with ``register_state_io``. A named entry
is replicated (every rank holds the same state: rank 0 writes it) unless its state holds DTensors (sharded like the
model), which go through DCP the same way. A new engine feature (weight EMA) is one more named entry. Folders written
before named entries (``optim.pt`` with scheduler + scaler, the task state inside ``trainer.pt``) still load.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from torch import nn

from evaclip import distributed as du
from evaclip.errors import CheckpointError  # noqa: F401 (re-exported: one class for every checkpoint error)
from evaclip.logging import get_logger

FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")
log = get_logger(__name__)


# ----------------------------------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------------------------------
def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems (and Windows) do not open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path.tmp``, fsync, rename: a reader sees the old file or the whole new one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(text: str, path: Path) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def torch_load(path: Path) -> Any:
    """``torch.load`` on the CPU with ``weights_only=True`` (no pickled code runs)."""
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------------------------------------------------
# RNG state as tensors and primitives (weights_only-loadable)
# ----------------------------------------------------------------------------------------------------------------------
def get_rng_state() -> dict:
    """python, numpy, torch and (if initialised) CUDA generator states of this process."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Inverse of ``get_rng_state``."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            log.warning("checkpoint has CUDA RNG states of %d devices, this process sees %d: CUDA RNG not restored",
                        len(cuda_states), torch.cuda.device_count())


# ----------------------------------------------------------------------------------------------------------------------
# model / optimizer state: the seam for sharded (FSDP) checkpoints
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class StateIO:
    """How one parallelism strategy saves and loads model + optimizer state inside a checkpoint folder.

    ``save(folder, model, optimizer, rank)`` runs on every rank (collective strategies need all of them);
    ``load(folder, model, optimizer)`` runs on every rank after the folder has been verified.
    ``files(world_size)`` names the files it writes (checked by ``meta.json``).
    """

    save: Callable[[Path, nn.Module, torch.optim.Optimizer, int], None]
    load: Callable[[Path, nn.Module, Optional[torch.optim.Optimizer]], None]
    files: Callable[[int], list[str]]


def _full_save(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, rank: int) -> None:
    if rank == 0:
        atomic_torch_save(du.unwrap(model).state_dict(), folder / "model.pt")
        atomic_torch_save(optimizer.state_dict(), folder / "optimizer.pt")


def load_model_state(model: nn.Module, state_dict: dict, source: str) -> None:
    """Strict load that names the missing / unexpected keys."""
    missing, unexpected = du.unwrap(model).load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{source} does not match the model: missing keys {sorted(missing)[:10]}, "
                              f"unexpected keys {sorted(unexpected)[:10]}")


def _full_load(folder: Path, model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> None:
    load_model_state(model, torch_load(folder / "model.pt"), str(folder / "model.pt"))
    if optimizer is not None:
        optimizer.load_state_dict(torch_load(folder / "optimizer.pt"))


_STATE_IO: dict[str, StateIO] = {
    "ddp": StateIO(_full_save, _full_load, lambda world_size: ["model.pt", "optimizer.pt"]),
}


def register_state_io(strategy: str, io: StateIO) -> None:
    """Plug in how ``strategy`` (e.g. ``fsdp``) saves / loads model and optimizer state."""
    _STATE_IO[strategy] = io


def get_state_io(strategy: str) -> StateIO:
    if strategy not in _STATE_IO and strategy == "fsdp":  # sharded (DCP) state, imported only by runs that use it
        from evaclip import checkpoint_sharded as cs

        register_state_io("fsdp", StateIO(cs.save_step_state, cs.load_step_state, cs.step_files))
    if strategy not in _STATE_IO:
        raise CheckpointError(f"no checkpoint format registered for dist.strategy={strategy!r}")
    return _STATE_IO[strategy]


# ----------------------------------------------------------------------------------------------------------------------
# save
# ----------------------------------------------------------------------------------------------------------------------
def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _is_sharded(state: Any) -> bool:
    """Whether a state dict holds DTensors (an entry sharded like an FSDP2 model: saved and loaded through DCP)."""
    if isinstance(state, dict):
        return any(_is_sharded(v) for v in state.values())
    return hasattr(state, "device_mesh") and hasattr(state, "to_local")


def _save_entry(folder: Path, name: str, state: dict, rank: int) -> None:
    if _is_sharded(state):  # collective: every rank writes its shards
        from evaclip.checkpoint_sharded import save_entry

        save_entry(folder / name, state)
    elif rank == 0:
        atomic_torch_save(state, folder / f"{name}.pt")


def _is_write_failure(e: RuntimeError) -> bool:
    """torch.save's zip writer reports a failed write (a full disk, a file size limit) as a RuntimeError."""
    return any(k in str(e) for k in ("PytorchStreamWriter", "inline_container", "file write failed"))


def _save_failed(root: Path, tmp: Path, step: int, e: BaseException) -> CheckpointError:
    """The one line for a save that could not write (a full disk most often): the partial folder is removed (the space
    it took is given back; the complete checkpoints are untouched) and the line says what is left to resume from."""
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(e, OSError) and e.strerror:
        reason = e.strerror
    else:  # torch's writer: "[enforce fail at inline_container.cc:672] . unexpected pos 1472 vs 1372"
        reason = f"a file write failed: torch.save: {str(e).strip().splitlines()[-1].split('] ')[-1].strip(' .')[:160]}"
    try:
        free = f"{shutil.disk_usage(root).free / 2**30:.2f} GiB free there"
    except OSError:
        free = "free space unknown"
    newest = list_checkpoints(root)
    left = (f"the newest complete checkpoint, {newest[0].name}, is intact: free some space, then resume=auto continues "
            f"from it" if newest else "no earlier checkpoint exists")
    return CheckpointError(f"checkpoint save of step {step} under {root} failed ({reason}; {free}); {left}")


def _write_meta(tmp: Path, step: int, expected: list[str], world_size: int, strategy: str, states: dict,
                checksum: bool) -> None:
    """Check that every file of the step is there, fsync each, and write ``meta.json`` (their sizes and sha256)."""
    names = _written_files(tmp)
    expected = expected + ["config.yaml"] + [f"rng_rank{r}.pt" for r in range(world_size)]
    for name in expected:
        if name not in names:
            raise CheckpointError(f"checkpoint save of step {step}: {name} was not written")
    files = {}
    for name in names:
        p = tmp / name
        _fsync_file(p)
        files[name] = {"size": p.stat().st_size, "sha256": sha256_file(p) if checksum else None}
    meta = {"format": FORMAT_VERSION, "step": step, "world_size": world_size, "strategy": strategy,
            "entries": sorted(n for n, o in states.items() if o is not None), "files": files}
    atomic_write_text(json.dumps(meta, indent=1), tmp / "meta.json")
    _fsync_dir(tmp)


def _written_files(tmp: Path) -> list[str]:
    return sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())


def save_checkpoint(
    root: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    states: dict[str, Any],
    config_yaml: str,
    rank: int = 0,
    world_size: int = 1,
    strategy: str = "ddp",
    keep_last: int = 2,
    checksum: bool = True,
) -> Path:
    """Write the checkpoint of ``step`` atomically under ``root`` and prune to the newest ``keep_last``.

    ``states`` are the named stateful entries besides model and optimizer (objects with ``state_dict()`` /
    ``load_state_dict()``); ``trainer``'s state also carries ``step`` and ``config_yaml``. Collective: every rank must
    call it (each writes its own RNG state and its shards). Returns the final folder.
    """
    root = Path(root)
    final = root / step_dir_name(step)
    tmp = root / f".tmp_{step_dir_name(step)}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    du.barrier()
    io = get_state_io(strategy)
    try:  # a write the disk refuses, in any file or in meta.json, is one line (the partial folder removed)
        io.save(tmp, model, optimizer, rank)
        for name, obj in states.items():
            state = obj.state_dict() if obj is not None else None
            if name == "trainer":
                state = dict(state or {}, step=step, config_yaml=config_yaml)
            if state is not None:
                _save_entry(tmp, name, state, rank)
        atomic_torch_save(get_rng_state(), tmp / f"rng_rank{rank}.pt")
        if rank == 0:
            atomic_write_text(config_yaml, tmp / "config.yaml")
        du.barrier()
        if rank == 0:
            _write_meta(tmp, step, io.files(world_size), world_size, strategy, states, checksum)
    except (OSError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not _is_write_failure(e):
            raise
        raise _save_failed(root, tmp, step, e) from e
    if rank == 0:
        if final.exists():  # a re-save of the same step (e.g. SIGTERM right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        prune_checkpoints(root, keep_last)
    du.barrier()
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete-by-name checkpoint folders under ``root``, newest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found, reverse=True)]


def prune_checkpoints(root: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (``keep_last <= 0`` keeps everything)."""
    if keep_last <= 0:
        return
    for old in list_checkpoints(root)[keep_last:]:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------------
# verify / find / load
# ----------------------------------------------------------------------------------------------------------------------
def verify_checkpoint(path: Path, checksum: bool = True) -> dict:
    """Check ``meta.json`` and every file it lists (size, sha256); returns the meta. Raises CheckpointError."""
    path = Path(path)
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{path} has no meta.json (incomplete save)")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_path} is not valid JSON: {e}") from e
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format')!r}, this evaclip reads {FORMAT_VERSION}")
    for name, info in meta["files"].items():
        p = path / name
        if not p.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        size = p.stat().st_size
        if size != info["size"]:
            raise CheckpointError(f"{path}: {name} is {size} bytes, expected {info['size']} (truncated?)")
        if checksum and info.get("sha256") and sha256_file(p) != info["sha256"]:
            raise CheckpointError(f"{path}: {name} fails its sha256 check (corrupt)")
    return meta


def find_resume_checkpoint(root: Path, checksum: bool = True) -> Optional[Path]:
    """The newest checkpoint under ``root`` that verifies; damaged newer ones are reported and skipped."""
    for path in list_checkpoints(root):
        try:
            verify_checkpoint(path, checksum)
            return path
        except CheckpointError as e:
            log.warning("skipping checkpoint %s: %s; trying the previous one", path.name, e)
    return None


def resolve_checkpoint(path: Union[str, Path]) -> Path:
    """The checkpoint a path stands for: a run folder (one holding ``ckpt/``) -> its newest complete checkpoint
    (``RUN/ckpt/step_N``); any other path as it is. FileNotFoundError when a run folder has none. Every loader of
    weights goes through it (``evaclip eval`` / ``export`` print the result)."""
    path = Path(path)
    if path.is_dir() and (path / "ckpt").is_dir():
        newest = find_resume_checkpoint(path / "ckpt")
        if newest is None:
            raise FileNotFoundError(f"run folder {path} has no complete checkpoint under {path / 'ckpt'}")
        return newest
    return path


def resolve_resume(resume: Optional[str], ckpt_root: Path, checksum: bool = True) -> Optional[Path]:
    """``resume`` of the config -> a verified checkpoint folder, or None to start fresh.

    ``auto``: newest good checkpoint of this run (None if there is none yet). A path: that folder, or the newest good
    checkpoint of a run folder / ``ckpt`` folder it names. Decided on rank 0 and broadcast.
    """
    if not resume:
        return None
    decision: tuple[str, Optional[str]] = ("none", None)
    if du.get_rank() == 0:
        try:
            chosen = _choose(resume, Path(ckpt_root), checksum)
            decision = ("path", str(chosen)) if chosen is not None else ("none", None)
        except CheckpointError as e:
            decision = ("error", str(e))
    kind, value = du.broadcast_object(decision)
    if kind == "error":
        raise CheckpointError(value)
    return Path(value) if kind == "path" else None


def _choose(resume: str, ckpt_root: Path, checksum: bool) -> Optional[Path]:
    if resume == "auto":
        chosen = find_resume_checkpoint(ckpt_root, checksum)
        if chosen is None:
            log.info("resume=auto: no checkpoint in %s yet, starting from scratch", ckpt_root)
        return chosen
    p = Path(resume)
    if (p / "meta.json").is_file():
        verify_checkpoint(p, checksum)
        return p
    if p.is_dir():
        chosen = find_resume_checkpoint(p / "ckpt" if (p / "ckpt").is_dir() else p, checksum)
        if chosen is None:
            raise CheckpointError(f"resume={resume}: no valid checkpoint found there")
        return chosen
    raise CheckpointError(f"resume={resume}: no such checkpoint folder")


# entries of folders written before named entries: (file, key)
_LEGACY = {"scheduler": ("optim.pt", "scheduler"), "scaler": ("optim.pt", "scaler"), "task": ("trainer.pt", "task")}


def read_entry(path: Path, name: str, template: Optional[dict] = None) -> Optional[dict]:
    """The saved state of entry ``name`` in checkpoint folder ``path`` (None if it holds none). A sharded entry (DCP
    folder) is read into ``template`` (the live entry's ``state_dict()``, in this run's sharding; collective)."""
    path = Path(path)
    if (path / f"{name}.pt").is_file():
        return torch_load(path / f"{name}.pt")
    if (path / name).is_dir():
        from evaclip.checkpoint_sharded import load_entry

        if template is None:
            raise CheckpointError(f"{path}: entry {name!r} is sharded; it loads into a live object only")
        return load_entry(path / name, template)
    if name in _LEGACY and (path / _LEGACY[name][0]).is_file():
        file, key = _LEGACY[name]
        return torch_load(path / file).get(key)
    return None


def saved_schedule(path: Path) -> Optional[dict]:
    """The scheduler state saved in checkpoint folder ``path`` (None if it holds none): read before anything is
    built or written, to check what a resume does to the schedule."""
    return read_entry(path, "scheduler")


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    *,
    states: Optional[dict[str, Any]] = None,
    rank: int = 0,
    world_size: int = 1,
    strategy: str = "ddp",
    restore_rng: bool = True,
) -> dict:
    """Restore model / optimizer, every named entry of ``states`` and the RNG from a verified folder; returns the
    saved trainer state (``step``, ``config_yaml``, ...). An entry the folder lacks keeps its fresh state (logged);
    a loss scaler saved disabled (or not at all) starts fresh."""
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    if meta.get("strategy", "ddp") != strategy:
        raise CheckpointError(f"{path} was saved with dist.strategy={meta.get('strategy')}, this run uses {strategy}")
    get_state_io(strategy).load(path, model, optimizer)
    trainer = read_entry(path, "trainer") or {}
    for name, obj in (states or {}).items():
        if obj is None:
            continue
        state = trainer if name == "trainer" else read_entry(path, name, obj.state_dict())
        if not state:
            if name not in ("scaler", "task"):
                log.warning("%s has no %r state: it starts fresh", path.name, name)
            continue
        obj.load_state_dict(state)
    if meta["world_size"] != world_size:
        log.warning("%s was written by %d processes, this run has %d: RNG streams and the data order restart "
                    "from the saved step, not exactly where they stopped", path.name, meta["world_size"], world_size)
    if restore_rng:
        rng_file = path / f"rng_rank{rank}.pt"
        if rng_file.is_file():
            set_rng_state(torch_load(rng_file))
    return trainer
