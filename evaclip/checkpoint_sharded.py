"""Sharded checkpoints of model + optimizer with ``torch.distributed.checkpoint`` (DCP).

Every rank writes its own shards (``__<rank>_0.distcp``) and the coordinator writes ``.metadata``, which records each
tensor's global shape and where every chunk lives. Loading plans reads against the *current* layout, so a checkpoint
written by N ranks loads into M ranks (or into one unsharded model) with no conversion step.

The state is ``{"model": ..., "optim": ...}`` in the fully-qualified-name form of
``torch.distributed.checkpoint.state_dict.get_state_dict``: parameter names are the model's own (FSDP2 keeps them),
optimizer state is keyed by parameter name instead of by position, so DDP, FSDP and single-process runs share one
format. Small run state (step, schedule, data position, RNG) stays with ``evaclip.checkpoint``, which calls in here.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

MODEL_KEY = "model"
OPTIM_KEY = "optim"
METADATA_FILE = ".metadata"  # written last by DCP's coordinator: its presence marks a complete checkpoint


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """True if ``path`` is a folder holding a complete DCP checkpoint."""
    return (Path(path) / METADATA_FILE).is_file()


def _dcp():
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import state_dict as dsd

    return dcp, dsd


def _check_dir(path: Path) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"sharded checkpoint folder not found: {path}")
    if not is_sharded_checkpoint(path):
        raise FileNotFoundError(
            f"{path} is not a complete sharded checkpoint (no {METADATA_FILE}: the save was interrupted, or it is a "
            "single-file checkpoint)"
        )


def _saved_keys(path: Path) -> set[str]:
    """Flattened keys (``model.<param name>``, ``optim.state.<param name>.exp_avg``, ...) stored in ``path``."""
    from torch.distributed.checkpoint import FileSystemReader

    return set(FileSystemReader(str(path)).read_metadata().state_dict_metadata)


def save_sharded(path: str | os.PathLike, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
    """Write ``model`` (and ``optimizer``) state to the folder ``path``; a collective: every rank must call it.

    Works for FSDP2-sharded, DDP-wrapped or plain models (with or without a process group). ``path`` is created;
    the caller makes the step folder atomic (write to a temporary name, rename on rank 0 after a barrier).
    """
    dcp, dsd = _dcp()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if optimizer is None:
        state = {MODEL_KEY: dsd.get_model_state_dict(model)}
    else:
        msd, osd = dsd.get_state_dict(model, optimizer)
        state = {MODEL_KEY: msd, OPTIM_KEY: osd}
    dcp.save(state, checkpoint_id=str(path))


def load_sharded(
    path: str | os.PathLike, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None
) -> None:
    """Load a ``save_sharded`` folder into ``model`` (and ``optimizer``) in their current layout; a collective.

    The world size may differ from the one that saved (N ranks -> M ranks, or sharded -> unsharded): DCP reads the
    chunks each rank's shards need. Loading is strict: a parameter missing from the checkpoint, or a checkpoint
    parameter the model lacks, is an error that names them; so is asking for optimizer state that was not saved.
    """
    dcp, dsd = _dcp()
    path = Path(path)
    _check_dir(path)
    saved = _saved_keys(path)
    if optimizer is None:
        msd, osd = dsd.get_model_state_dict(model), None
    else:
        if not any(k.startswith(OPTIM_KEY + ".") for k in saved):
            raise KeyError(f"{path} holds no optimizer state (it was saved without one); load the model only")
        msd, osd = dsd.get_state_dict(model, optimizer)
    _check_model_keys(path, saved, msd)
    state = {MODEL_KEY: msd} if osd is None else {MODEL_KEY: msd, OPTIM_KEY: osd}
    dcp.load(state, checkpoint_id=str(path))
    if osd is None:
        dsd.set_model_state_dict(model, state[MODEL_KEY])
    else:
        dsd.set_state_dict(model, optimizer, model_state_dict=state[MODEL_KEY], optim_state_dict=state[OPTIM_KEY])


def _check_model_keys(path: Path, saved: set[str], msd: dict) -> None:
    prefix = MODEL_KEY + "."
    in_ckpt = {k[len(prefix):] for k in saved if k.startswith(prefix)}
    in_model = set(msd)
    missing, unexpected = sorted(in_model - in_ckpt), sorted(in_ckpt - in_model)
    if missing or unexpected:
        raise KeyError(
            f"sharded checkpoint {path} does not match the model: missing {_preview(missing)}, "
            f"unexpected {_preview(unexpected)}"
        )


def _preview(keys: list[str], n: int = 8) -> str:
    if not keys:
        return "none"
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return "[" + ", ".join(keys[:n]) + "]" + more


def load_full_state_dict(path: str | os.PathLike, prefix: str = MODEL_KEY) -> dict[str, torch.Tensor]:
    """The full (unsharded) tensors under ``prefix`` of a sharded checkpoint, as a plain ``{name: tensor}`` on CPU.

    Needs no process group and any number of saving ranks (for ``evaclip export`` and inspection); reads only the
    requested part, so the optimizer state of a big run is not loaded to export its weights.
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    dcp, _ = _dcp()
    path = Path(path)
    _check_dir(path)
    meta = FileSystemReader(str(path)).read_metadata()
    head = prefix + "."
    inner: dict[str, torch.Tensor] = {}
    for key, info in meta.state_dict_metadata.items():
        if not key.startswith(head):
            continue
        if not isinstance(info, TensorStorageMetadata):
            raise TypeError(f"{path}: '{key}' is not a tensor; load_full_state_dict reads tensor sections only")
        inner[key[len(head):]] = torch.empty(info.size, dtype=info.properties.dtype)
    if not inner:
        sections = sorted({k.split(".", 1)[0] for k in meta.state_dict_metadata})
        raise KeyError(f"{path} has no '{prefix}' section; it has {sections}")
    with warnings.catch_warnings():  # DCP warns that it "assumes" single-process loading: that is the intent here
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
        dcp.load({prefix: inner}, checkpoint_id=str(path), no_dist=True)
    return inner


def full_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU state dict of a live (possibly FSDP2) model; a collective: rank 0 gets it, other ranks ``{}``.

    A snapshot: tensors that would alias live CPU parameters (replicated ones, or every one of an unsharded CPU
    model) are copied, so training on does not change what was returned.
    """
    _, dsd = _dcp()
    opts = dsd.StateDictOptions(full_state_dict=True, cpu_offload=True)
    sd = dsd.get_model_state_dict(model, options=opts)
    if dist.is_initialized() and dist.get_rank() != 0:
        return {}
    live = {t.data_ptr() for t in list(model.parameters()) + list(model.buffers()) if not hasattr(t, "to_local")}
    return {k: v.clone() if v.data_ptr() in live else v for k, v in sd.items()}


# ----------------------------------------------------------------------------------------------------------------------
# the dist.strategy=fsdp format of evaclip.checkpoint: DCP files in a "dcp/" subfolder of the step folder
# ----------------------------------------------------------------------------------------------------------------------
SUBDIR = "dcp"


def save_step_state(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, rank: int) -> None:
    """The ``dist.strategy=fsdp`` model + optimizer state of a training checkpoint folder (collective)."""
    save_sharded(Path(folder) / SUBDIR, model, optimizer)


def load_step_state(folder: Path, model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> None:
    """Load what ``save_step_state`` wrote (collective; any number of ranks)."""
    load_sharded(Path(folder) / SUBDIR, model, optimizer)


def step_files(world_size: int) -> list[str]:
    """The files ``save_step_state`` writes: DCP's FileSystemWriter writes one file per rank and the coordinator's
    ``.metadata``."""
    return [f"{SUBDIR}/{METADATA_FILE}"] + [f"{SUBDIR}/__{r}_0.distcp" for r in range(world_size)]


def checkpoint_weights(folder: str | os.PathLike) -> Optional[Path]:
    """The DCP folder holding the weights of a training checkpoint folder, or None if it is not a sharded one."""
    for cand in (Path(folder) / SUBDIR, Path(folder)):
        if is_sharded_checkpoint(cand):
            return cand
    return None


def save_entry(path: Path, state: dict) -> None:
    """A named checkpoint entry whose state holds DTensors (sharded like the model, e.g. weight EMA) as a DCP folder
    (collective)."""
    dcp, _ = _dcp()
    Path(path).mkdir(parents=True, exist_ok=True)
    dcp.save({"state": state}, checkpoint_id=str(path))


def load_entry(path: Path, template: dict) -> dict:
    """Read a ``save_entry`` folder into ``template`` (the live entry's state dict, in this run's sharding); strict
    on the keys (collective)."""
    dcp, _ = _dcp()
    _check_dir(Path(path))
    saved = {k[len("state."):] for k in _saved_keys(Path(path))}
    want = set(_flat_keys(template))
    if saved != want:
        raise KeyError(f"sharded entry {path} does not match: missing {_preview(sorted(want - saved))}, unexpected "
                       f"{_preview(sorted(saved - want))}")
    state = {"state": template}
    dcp.load(state, checkpoint_id=str(path))
    return state["state"]


def _flat_keys(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        out += _flat_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return out

