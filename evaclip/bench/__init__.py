"""Benchmarks (never tests): training-step throughput / memory / MFU vs open_clip, attention kernels, optimizer, data.

Entry point: ``python -m evaclip.bench {train,attention,optimizer,data,all}`` (see ``evaclip.bench.__main__``);
``make bench`` runs ``all``. Results go to JSON + Markdown (``evaclip.bench.report``); docs/BENCHMARKS.md holds the
latest figures with their commands and machine.
"""
from evaclip.bench.flops import count_flops, matmul_peak_flops, mfu

__all__ = ["count_flops", "matmul_peak_flops", "mfu"]
