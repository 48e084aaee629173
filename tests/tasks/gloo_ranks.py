"""Run a function on 2 (or more) real gloo processes forked from the test process (they reuse its imports), each
writing what it computed to ``out_dir/rank{r}.pt``. Not collected by pytest (no ``test_`` prefix)."""
from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # the processes share the cores
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(fn(rank), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_gloo(fn, out_dir, world: int = 2) -> list:
    """``fn(rank)`` on ``world`` gloo ranks; returns each rank's result (``torch.save``-able, read back with
    ``weights_only=True``)."""
    mp.start_processes(_entry, args=(fn, world, _free_port(), str(out_dir)), nprocs=world, join=True,
                       start_method="fork")
    return [torch.load(os.path.join(str(out_dir), f"rank{r}.pt"), weights_only=True) for r in range(world)]
