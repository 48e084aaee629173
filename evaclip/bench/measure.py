"""Timing and memory primitives shared by the benchmarks: device sync, wall-clock timing of a callable, peak memory.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` (all tensors: weights, gradients, optimizer state,
activations). On CPU there is no allocator counter, so the resident set size (RSS, from /proc/self/statm) is sampled
by a background thread while the measured code runs; the figure is the peak RSS minus the RSS before the model was
built. glibc keeps freed memory in its free lists, which would hide the second model's growth when two models are
measured in one process, so ``release_host_memory()`` hands it back to the OS between measurements.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import resource
import statistics
import threading
import time
from typing import Callable

import torch

__all__ = ["PeakMemory", "cuda_launches", "memory_in_use", "release_host_memory", "rss_bytes", "median", "synchronize",
           "time_calls"]


def synchronize(device: torch.device | str) -> None:
    """Wait for queued device work (timing a CUDA step without this measures only the launch)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_bytes() -> int:
    """Current resident set size of this process in bytes (Linux /proc; elsewhere the lifetime peak from getrusage)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        scale = 1 if os.uname().sysname == "Darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


_LIBC = None


def release_host_memory() -> None:
    """Collect garbage and return glibc's free heap pages to the OS (best effort; a no-op off glibc)."""
    global _LIBC
    gc.collect()
    if _LIBC is None:
        name = ctypes.util.find_library("c")
        _LIBC = ctypes.CDLL(name) if name else False
    if _LIBC and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def memory_in_use(device: torch.device | str) -> int:
    """Bytes in use now: allocated tensors on CUDA, RSS on CPU (the baseline for ``PeakMemory``)."""
    device = torch.device(device)
    if device.type == "cuda":
        synchronize(device)
        return torch.cuda.memory_allocated(device)
    return rss_bytes()


class PeakMemory:
    """Context manager measuring peak memory in bytes of the code it wraps, relative to ``baseline``.

    CUDA: peak ``max_memory_allocated``; CPU: peak sampled RSS. Both minus ``baseline`` (default: what
    ``memory_in_use`` reports on entry). Read ``.peak_bytes`` after the block.
    """

    def __init__(self, device: torch.device | str, baseline: int | None = None, interval_s: float = 0.002):
        self.device = torch.device(device)
        self.baseline = baseline
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._max_rss = 0

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max_rss = max(self._max_rss, rss_bytes())
            time.sleep(self.interval_s)

    def __enter__(self) -> "PeakMemory":
        if self.baseline is None:
            self.baseline = memory_in_use(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self._max_rss = rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak_bytes = max(0, torch.cuda.max_memory_allocated(self.device) - self.baseline)
            return
        self._stop.set()
        self._thread.join()
        self._max_rss = max(self._max_rss, rss_bytes())
        self.peak_bytes = max(0, self._max_rss - self.baseline)


def time_calls(fn: Callable[[], object], n: int, device: torch.device | str) -> float:
    """Mean seconds per call of ``fn`` over ``n`` back-to-back calls.

    The device is synchronised only before the first and after the last call, so the host may queue step k+1
    while the GPU runs step k, as in training (a step that syncs the host inside shows up as slower, as it should).
    """
    if n < 1:
        raise ValueError(f"time_calls needs n >= 1, got {n}")
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    synchronize(device)
    return (time.perf_counter() - t0) / n


def median(xs: list[float]) -> float:
    """Median of a non-empty list (robust to one slow step on a shared machine)."""
    if not xs:
        raise ValueError("median of no measurements")
    return statistics.median(xs)


# Ops that launch no kernel (views, allocations, no-op conversions), for ``cuda_launches``.
_NO_KERNEL = {"view", "_unsafe_view", "reshape", "_reshape_alias", "flatten", "split", "split_with_sizes", "unbind",
              "select", "slice", "as_strided", "detach", "detach_", "alias", "t", "transpose", "expand", "unsqueeze",
              "squeeze", "permute", "empty", "empty_like", "empty_strided", "empty_permuted", "new_empty", "lift_fresh",
              "resolve_conj", "resolve_neg", "to", "_to_copy", "item", "_local_scalar_dense"}


def _foreach_per_tensor(event) -> bool:
    """A foreach call runs one kernel per tensor on CUDA when the leading tensor arguments of some per-tensor call
    (one from each list) differ in shape: CUDA's multi-tensor route needs equal sizes at each index."""
    for child in event.cpu_children:
        shapes = []
        for shape, value in zip(child.input_shapes, child.concrete_inputs):
            if value not in (None, ""):  # a Python scalar: the tensor arguments are over
                break
            shapes.append(tuple(shape))
        if len(set(shapes)) > 1:
            return True
    return False


def cuda_launches(prof) -> tuple[int, dict]:
    """Kernels a step would launch on CUDA, read from a ``torch.profiler`` CPU trace taken with ``record_shapes=True``
    (tensors on the CPU or the meta device: every op is recorded, no GPU needed).

    A foreach op counts 1 on CUDA's multi-tensor route and one per tensor off it (on the CPU every foreach op is a
    per-tensor loop, so its per-tensor children are not launches); other ops count their leaf compute ops. Returns
    (total, {foreach op: launches, for the calls off the multi-tensor route}).
    """
    def count(e) -> int:
        kids = [c for c in e.cpu_children if c.name.startswith("aten::")]
        if e.name.startswith("aten::_foreach_"):
            return len(kids) if _foreach_per_tensor(e) else 1
        if kids:
            return sum(count(c) for c in kids)
        name = e.name.removeprefix("aten::")
        return int(name == "copy_" or name not in _NO_KERNEL)

    total, per_tensor = 0, {}
    for e in prof.events():
        parent = e.cpu_parent
        if not e.name.startswith("aten::") or (parent is not None and parent.name.startswith("aten::")):
            continue
        n = count(e)
        total += n
        if n > 1 and e.name.startswith("aten::_foreach_"):
            per_tensor[e.name] = per_tensor.get(e.name, 0) + n
    return total, per_tensor
