"""FLOPs of a training step (counted with torch's FlopCounterMode) and the device's measured matmul peak, for MFU.

Shapes: N the side of the square matmul used to measure the peak.

MFU here follows the PaLM definition: counted model FLOPs of one full step / step time / peak FLOP/s of the device.
The peak is measured in the same process and precision by a large matmul (so a throttled GPU or a CPU with fewer
threads is judged against what it can actually do), not taken from a datasheet.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from evaclip.bench.measure import synchronize

__all__ = ["count_flops", "matmul_peak_flops", "mfu"]


def _cpu_sdpa_fwd(query, key, value, *args, out_val=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_bwd(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def _bnhd_to_bhnd(shape) -> tuple:
    b, n, h, d = shape
    return (b, h, n, d)


def _flash_attn_fwd(q, k, v, *args, out_val=None, **kwargs) -> int:  # flash-attn's layout: B N H D
    return sdpa_flop_count(_bnhd_to_bhnd(q), _bnhd_to_bhnd(k), _bnhd_to_bhnd(v))


def _flash_attn_bwd(dout, q, k, v, *args, out_val=None, **kwargs) -> int:
    return sdpa_backward_flop_count(*(_bnhd_to_bhnd(t) for t in (dout, q, k, v)))


def _extra_formulas() -> dict:
    """Attention kernels torch's counter misses: SDPA's CPU flash kernel, and the flash-attn package's custom ops.

    Without them attention counts zero on CPU (the counter only knows the CUDA SDPA kernels), and MFU is too low.
    """
    aten = torch.ops.aten
    out = {}
    for name, fn in (("_scaled_dot_product_flash_attention_for_cpu", _cpu_sdpa_fwd),
                     ("_scaled_dot_product_flash_attention_for_cpu_backward", _cpu_sdpa_bwd)):
        if hasattr(aten, name):
            out[getattr(aten, name)] = fn
    fa = getattr(torch.ops, "flash_attn", None)  # registered only once flash_attn has been imported
    for name, fn in (("_flash_attn_forward", _flash_attn_fwd), ("_flash_attn_backward", _flash_attn_bwd)):
        try:
            out[getattr(fa, name)] = fn
        except (AttributeError, RuntimeError):
            pass
    return out


def count_flops(fn: Callable[[], Any]) -> int:
    """Run ``fn()`` once under FlopCounterMode; returns the total FLOPs (forward and backward).

    FlopCounterMode counts matmuls, convolutions and attention (forward and backward; with the CPU SDPA and
    flash-attn 2 kernels added here, and FlashAttention-4's, which are no torch op, tallied by the model's attention
    module); elementwise work (norms, activations, the optimizer update) is not counted, as
    is usual for MFU. Causal attention is counted as full (as torch and the FlashAttention papers' MFU do).
    """
    # Per-module totals are not returned: the counter's module tracker attributes backward ops to the wrong
    # modules (a 2-layer text tower "costs" as much as the image tower), so only the global total is trustworthy.
    # fa4_op registers FA4's flop formulas: FlopCounterMode copies the registry when it is built, so an op module
    # first imported inside fn() (the model's first FA4 call) would count 0 (the test passed only after another)
    from evaclip.models import fa4_op  # noqa: F401
    from evaclip.models.attention import untraced_attention_flops

    counter = FlopCounterMode(display=False, custom_mapping=_extra_formulas())
    # a flash kernel that is no torch op (FA2 < 2.6) is invisible to the counter: Attend tallies it (FA4 is an op,
    # evaclip::fa4_fwd / fa4_bwd, with SDPA's formulas registered)
    with untraced_attention_flops() as attention, counter:
        fn()
    return int(counter.get_total_flops()) + attention[0]


def _default_matmul_size(device: torch.device) -> int:
    # Big enough to saturate the device, small enough to measure in well under a second.
    return 8192 if device.type == "cuda" else 2048


def matmul_peak_flops(device: torch.device | str, dtype: torch.dtype, *, size: int | None = None,
                      min_seconds: float = 0.3, rounds: int = 3) -> float:
    """Best sustained FLOP/s of an ``N x N @ N x N`` matmul on ``device`` in ``dtype`` (best of ``rounds``)."""
    device = torch.device(device)
    n = size or _default_matmul_size(device)
    if n < 64:
        raise ValueError(f"matmul peak size must be >= 64, got {n}")
    g = torch.Generator(device="cpu").manual_seed(0)
    a_NN = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b_NN = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    out_NN = torch.empty(n, n, device=device, dtype=dtype)
    torch.mm(a_NN, b_NN, out=out_NN)  # warm-up: kernel selection, thread pool start
    synchronize(device)
    # Calibrate the iteration count so one round lasts about min_seconds.
    t0 = time.perf_counter()
    torch.mm(a_NN, b_NN, out=out_NN)
    synchronize(device)
    iters = max(1, int(min_seconds / max(time.perf_counter() - t0, 1e-6)))
    best = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(iters):
            torch.mm(a_NN, b_NN, out=out_NN)
        synchronize(device)
        best = max(best, 2.0 * n ** 3 * iters / (time.perf_counter() - t0))
    return best


def mfu(flops_per_step: float, step_seconds: float, peak_flops: float) -> float:
    """Model FLOPs utilisation in [0, 1+): counted FLOPs per step / step time / peak FLOP/s."""
    if step_seconds <= 0 or peak_flops <= 0:
        raise ValueError(f"mfu needs positive step time and peak, got {step_seconds}, {peak_flops}")
    return flops_per_step / step_seconds / peak_flops
