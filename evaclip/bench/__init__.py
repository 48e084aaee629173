"""Benchmarks (never tests): training-step throughput / memory / MFU vs open_clip, the MIM step, attention kernels,
optimizer, data.

Entry points: ``python -m evaclip.bench {train,attention,optimizer,data,mim,all,gpu-check}`` and ``evaclip bench ...``
(both end in ``evaclip.bench.__main__.main``); ``make bench`` runs ``all``. Results go to JSON + Markdown
(``evaclip.bench.report``); docs/BENCHMARKS.md holds the latest figures with their commands and machine.
"""
from __future__ import annotations

from evaclip.bench.flops import count_flops, matmul_peak_flops, mfu

__all__ = ["cli", "count_flops", "matmul_peak_flops", "mfu"]


def cli(argv: list[str] | None = None) -> int:
    """``evaclip bench ...`` (evaclip.cli's entry point): run the benchmark; exit code 1 when a section of the report
    failed (``gpu-check`` records it and goes on), else 0 (other errors raise)."""
    # lazy: importing it at the top would make `python -m evaclip.bench` warn
    from evaclip.bench.__main__ import exit_code, main

    return exit_code(main(argv))
