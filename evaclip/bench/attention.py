"""Attention kernel benchmark: flash_attn / SDPA / eager, forward + backward, at ViT sequence lengths and head dims.

Shapes: B batch, H heads, N sequence length (tokens incl. the class token), D head dim.

The kernels are evaclip's own ``Attend`` modules (evaclip.models.attention), each fed the layout it declares
(flash-attn: B N H D, SDPA and eager: B H N D), so no transpose is timed.
FLOPs are the usual attention count: forward 4·B·H·N²·D (two matmuls), backward 2.5x forward.
"""
from __future__ import annotations

import argparse
from typing import Callable

import torch

from evaclip.bench.measure import median, time_calls
from evaclip.bench.report import section

__all__ = ["ATTN_COLUMNS", "DESCRIPTION", "add_args", "available_backends", "bench_attention", "run"]

DESCRIPTION = ("Forward + backward time of each attention backend (eager, sdpa, flash_attn where available) over "
               "sequence lengths and head dimensions, with the error against eager.")

SEQ_LENS = (197, 257, 577)  # ViT-B/16 @224, ViT-L/14 @224, ViT-L/14 @336 (with class token)
HEAD_DIMS = (64, 80, 88, 128)  # ViT-B/L (768/12, 1024/16), ViT-H (1280/16), EVA01-g (1408/16), wide heads
ATTN_COLUMNS = [("backend", "backend"), ("seq", "N"), ("head_dim", "D"), ("batch", "B"), ("heads", "H"),
                ("dtype", "dtype"), ("ms", "fwd+bwd ms"), ("gflops", "GFLOP/s"), ("speedup_vs_eager", "x eager"),
                ("max_err", "max |out - eager|")]


def available_backends(device: torch.device, dtype: torch.dtype) -> tuple[list[str], list[str]]:
    """(backends to run, notes on the ones skipped and why)."""
    from evaclip.models.attention import flash_kernel

    run, notes = ["eager", "sdpa"], []
    kernel, why = flash_kernel(device)
    if dtype not in (torch.float16, torch.bfloat16):
        notes.append("flash_attn skipped: its kernels run fp16 / bf16 only (the model runs SDPA for fp32)")
    elif kernel is None:
        notes.append(f"flash_attn skipped: {why} (pip install 'evaclip[flash]', see README)")
    else:
        run.append("flash_attn")
        notes.append(f"flash_attn: {why}")
    return run, notes


def _inputs(backend: str, b: int, h: int, n: int, d: int, device, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    qkv = [torch.randn(b, h, n, d, generator=g).to(device=device, dtype=dtype) for _ in range(3)]
    if backend == "flash_attn":
        qkv = [t.transpose(1, 2).contiguous() for t in qkv]  # B N H D, flash-attn's native layout
    return [t.requires_grad_() for t in qkv]


def _kernel(backend: str) -> Callable:
    """The model's own attention module for ``backend`` (what training runs, not a re-implementation)."""
    from evaclip.models.attention import Attend

    return Attend(backend)


def _train_call(fn: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Callable[[], None]:
    """One forward + backward of ``fn`` on leaf inputs (gradients dropped after each call, as a training step would)."""
    grad_out = torch.ones_like(q)  # every backend's output has its input layout

    def call() -> None:
        fn(q, k, v).backward(grad_out)
        q.grad = k.grad = v.grad = None

    return call


def bench_attention(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, batch: int | None = None,
                    heads: int | None = None, seq_lens=SEQ_LENS, head_dims=HEAD_DIMS, iters: int | None = None,
                    rounds: int = 3) -> dict:
    """Time forward + backward of every available backend at each (N, D); returns a report section."""
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    b = batch or (32 if on_gpu else 2)
    h = heads or (16 if on_gpu else 4)
    iters = iters or (20 if on_gpu else 4)
    backends, notes = available_backends(device, dtype)
    rows = []
    for n in seq_lens:
        for d in head_dims:
            ref_out, eager_ms = None, None
            for backend in backends:
                q, k, v = _inputs(backend, b, h, n, d, device, dtype)
                fn = _kernel(backend)
                step = _train_call(fn, q, k, v)
                with torch.no_grad():
                    out = fn(q, k, v).float()
                    out = out.transpose(1, 2) if backend == "flash_attn" else out  # compare in B H N D
                step()  # warm-up
                ms = 1e3 * median([time_calls(step, iters, device) for _ in range(rounds)])
                flops = 4 * b * h * n * n * d * 3.5
                if backend == "eager":
                    ref_out, eager_ms = out, ms
                rows.append({"backend": backend, "seq": n, "head_dim": d, "batch": b, "heads": h,
                             "dtype": str(dtype).replace("torch.", ""), "ms": ms, "gflops": flops / ms / 1e6,
                             "speedup_vs_eager": eager_ms / ms if eager_ms else None,
                             "max_err": (out - ref_out).abs().max().item() if ref_out is not None else None})
    notes.append(f"forward + backward per call, median of {rounds} rounds of {iters} calls; "
                 "FLOPs = 4·B·H·N²·D x 3.5 (forward + backward)")
    return section("Attention kernels", ATTN_COLUMNS, rows, notes)


def add_args(p: argparse.ArgumentParser) -> None:
    """The ``bench attention`` command-line options."""
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--batch", type=int, default=None, help="default 32 on CUDA, 2 on CPU")
    p.add_argument("--heads", type=int, default=None, help="default 16 on CUDA, 4 on CPU")
    p.add_argument("--seq", type=int, nargs="+", default=list(SEQ_LENS),
                   help=f"sequence lengths (tokens) to time (default: {' '.join(map(str, SEQ_LENS))})")
    p.add_argument("--head-dim", type=int, nargs="+", default=list(HEAD_DIMS),
                   help=f"head dimensions to time (default: {' '.join(map(str, HEAD_DIMS))})")
    p.add_argument("--iters", type=int, default=None, help="calls per timing round (default: sized to the device)")


def run(args: argparse.Namespace) -> dict:
    """Run from parsed ``bench attention`` options; returns the report section."""
    from evaclip.bench.train import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.precision, device)
    return bench_attention(device, dtype, batch=args.batch, heads=args.heads, seq_lens=args.seq,
                           head_dims=args.head_dim, iters=args.iters)
