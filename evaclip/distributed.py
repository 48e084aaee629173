"""Process group and device for one training process (torchrun or plain ``python``).

torchrun sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; without them the run is a single process and no process
group is created (every helper here then degrades to the identity). The backend is chosen once, here: NCCL on CUDA,
gloo on CPU (``dist.backend`` can force one).
"""
from __future__ import annotations

import datetime
import gc
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import nn

from evaclip.errors import ConfigError


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: its global / local rank, the world size and its device."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as e:
        raise RuntimeError(f"environment variable {name}={value!r} is not an integer (set by torchrun?)") from e


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``; ``cuda`` without CUDA is an error."""
    from evaclip.cuda_env import cuda_unavailable_reason, driver_cuda_version

    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
        if requested == "cpu" and driver_cuda_version() is not None:  # a GPU machine whose CUDA does not work
            warnings.warn(f"device=auto runs on the CPU: {cuda_unavailable_reason()}", stacklevel=2)
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"config key 'device' is 'cuda' but CUDA is not usable: {cuda_unavailable_reason()} (or "
                              "use device=cpu / auto)")
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are visible")
        return torch.device("cuda", local_rank)
    if requested == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"config key 'device' must be auto, cpu or cuda, got {requested!r}")


def backend_for(dist_cfg, device: torch.device) -> str:
    """The ``init_process_group`` backend of ``dist_cfg`` (the config's ``dist`` section) on ``device``.

    NCCL on CUDA, gloo on the CPU. FSDP2 with ``cpu_offload`` keeps parameters, gradients and optimizer state on the
    host, so the host-side collectives (gradient-norm and LAMB trust-ratio all_reduces) need gloo beside NCCL:
    ``"cpu:gloo,cuda:nccl"``.
    """
    if dist_cfg.backend == "nccl" and device.type != "cuda":
        raise ConfigError("config key 'dist.backend' is 'nccl' but the run is on the CPU; use gloo or auto")
    if device.type != "cuda" or dist_cfg.backend == "gloo":
        return "gloo"
    if dist_cfg.strategy == "fsdp" and dist_cfg.cpu_offload:
        return "cpu:gloo,cuda:nccl"
    return "nccl"


@dataclass(frozen=True)
class _DefaultDist:
    """The ``dist`` section's defaults, for callers without a training config (evaluation)."""

    strategy: str = "ddp"
    backend: str = "auto"
    cpu_offload: bool = False


def init_distributed(device: str, dist_cfg=None, timeout_s: float = 1800.0) -> DistEnv:
    """Read the torchrun environment, pick the device (the config's ``device``: auto | cpu | cuda), and create the
    process group (``dist_cfg`` = the config's ``dist`` section; None: DDP with the automatic backend) when
    ``WORLD_SIZE > 1``."""
    if dist_cfg is None:
        dist_cfg = _DefaultDist()
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    device = resolve_device(device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend_for(dist_cfg, device), timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    elif dist_cfg.strategy == "fsdp" and not dist.is_initialized():
        # FSDP2 needs a process group even for one process (a 1-rank mesh): make a local one.
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        dist.init_process_group(backend=backend_for(dist_cfg, device), rank=0, world_size=1)
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def cleanup() -> None:
    """Destroy the process group, if one was created."""
    if dist.is_available() and dist.is_initialized():
        # FSDP2 modules / DTensors sit in reference cycles that hold the process groups; free them while the groups
        # are alive, else their C++ teardown can run at interpreter exit and abort (seen with gloo, ~1 run in 10).
        gc.collect()
        dist.destroy_process_group()


def launched_by_torchrun() -> bool:
    """True in a process started by torchrun / torch.distributed.elastic."""
    return "TORCHELASTIC_RUN_ID" in os.environ or _env_int("WORLD_SIZE", 1) > 1


def exit_process(code: int) -> NoReturn:
    """End the process with ``code``; under torchrun via ``os._exit`` once output is flushed.

    Everything is on disk by then (checkpoints fsynced, loggers closed). What is left is interpreter teardown, where
    the C++ destructors of process groups / FSDP state can still abort ("terminate called without an active
    exception", seen with gloo): torchrun would count a finished run as failed and restart it. os._exit skips that
    teardown, so the exit code is the run's.
    """
    if launched_by_torchrun():
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (``sum`` | ``max`` | ``min``); identity without a process group."""
    if is_initialized() and dist.get_world_size() > 1:
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        dist.all_reduce(t, op=ops[op])
    return t


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s Python object on every rank (small objects: paths, flags)."""
    if not (is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model under DDP (``.module``) / ``torch.compile`` (``._orig_mod``) wrappers, however nested (FSDP2
    shards in place: nothing to unwrap)."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def get_rank() -> int:
    """Global rank (0 without a process group)."""
    return rank_world()[0]


def rank_world(group=None) -> tuple[int, int]:
    """(rank, world size) in ``group`` (default: the default process group); (0, 1) without a process group."""
    if is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1
