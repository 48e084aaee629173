"""Attention kernels behind one interface; the backend is chosen when the model is built, for the device it will
run on and the run's precision, and chosen again when an ``auto`` model moves to another device.

Shapes: see the legend in docs/ARCHITECTURE.md (B batch, N tokens, H heads, F per-head feature dim). sdpa/eager take
q/k/v as B H N F; flash_attn takes B N H F. Each backend declares its ``layout`` (the value strings ``"BHND"`` /
``"BNHD"`` are a public attribute and keep their historical spelling: read D there as F) so the caller arranges
q/k/v once, without transposes around the kernel.
Masks are boolean, True where a query may attend a key, broadcastable to B H Nq Nk (SDPA's convention).
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from evaclip.cuda_env import cuda_unavailable_reason
from evaclip.precision import PRECISIONS, precision_name  # noqa: F401  (PRECISIONS re-exported)

BACKENDS = ("auto", "flash_attn", "sdpa", "eager")
_HALF = (torch.float16, torch.bfloat16)

log = logging.getLogger(__name__)


class AttentionBackendError(RuntimeError):
    """The requested attention backend cannot run here."""


class FlashPrecisionError(AttentionBackendError, ValueError):
    """attn_backend=flash_attn was requested for an fp32 run (flash kernels compute in bf16 / fp16 only)."""


def normalize_precision(precision: Union[str, torch.dtype, None]) -> str:
    """``fp32`` | ``bf16`` | ``fp16`` from a name or a torch dtype (the engine's one precision table); a ValueError
    (``ConfigError``) for anything else."""
    return precision_name(precision)


@dataclass(frozen=True)
class FlashKernel:
    """A flash-attn ``flash_attn_func`` (B N H F in and out) and whether torch's dispatcher sees it as an op."""

    func: Callable
    name: str  # "FA4" (flash-attn-4, flash_attn.cute) or "FA2" (flash-attn 2.x)
    torch_op: bool  # FA2 >= 2.6 registers torch.ops.flash_attn.*; FA4 runs as evaclip::fa4_fwd (models/fa4_op.py)


# (module, name, minimum compute capability): FA4 first where it runs (its backward needs Hopper or newer), then
# FA2 (Ampere or newer). Both live under the ``flash_attn`` package name.
_FLASH_IMPLS = (("flash_attn.cute", "FA4", (9, 0)), ("flash_attn", "FA2", (8, 0)))


def _import_flash(module: str) -> tuple[Optional[Callable], str]:
    """(flash_attn_func, "") or (None, why): an optional import may raise anything (a RuntimeError from cutlass'
    DSL, an undefined CUDA symbol as OSError / ImportError), and any of it means "not usable", never a crash."""
    try:
        return importlib.import_module(module).flash_attn_func, ""
    except Exception as e:  # noqa: BLE001 - see the docstring
        return None, f"{type(e).__name__}: {e}"


def _fa2_is_torch_op() -> bool:
    try:
        return hasattr(torch.ops.flash_attn, "_flash_attn_forward")
    except Exception:  # noqa: BLE001 - no such namespace
        return False


def flash_kernel(device: Union[str, torch.device, None] = "cuda") -> tuple[Optional[FlashKernel], str]:
    """The flash-attn kernel that runs on ``device`` and why, or (None, why not).

    ``device`` None means the CPU (a model built without a device stays there). FA4 needs compute capability >= 9.0
    (Hopper, Blackwell), FA2 >= 8.0 (Ampere, Ada, Hopper).
    """
    if device is None:
        return None, "no device given (the model stays on the CPU); flash-attn runs on CUDA only"
    device = torch.device(device)
    if device.type != "cuda":
        return None, f"the model is on {device.type}; flash-attn runs on CUDA only"
    why = cuda_unavailable_reason()  # names a too-old driver or a CPU-only torch
    if why is not None:
        return None, why
    try:
        cap = tuple(torch.cuda.get_device_capability(device))
    except Exception as e:  # noqa: BLE001 - a broken driver reads as "no flash", not a crash
        return None, f"cannot read the GPU's compute capability ({type(e).__name__}: {e})"
    reasons = []
    for module, name, need in _FLASH_IMPLS:
        if cap < need:
            reasons.append(f"{name} needs compute capability >= {need[0]}.{need[1]}")
            continue
        func, err = _import_flash(module)
        if func is None:
            reasons.append(f"{name} ({module}) is not importable: {err}")
            continue
        if name == "FA4":  # its CuTe kernels through evaclip's torch.library ops (fa4_op: no graph break, counted)
            from .fa4_op import flash_attn_func

            kernel = FlashKernel(flash_attn_func, name, True)
        else:
            kernel = FlashKernel(func, name, _fa2_is_torch_op())
        return kernel, f"{name} runs on compute capability {cap[0]}.{cap[1]}"
    return None, f"compute capability {cap[0]}.{cap[1]}: " + "; ".join(reasons)


def flash_attn_usable(device: Union[str, torch.device, None] = "cuda") -> bool:
    """True if a flash-attn kernel (FA4 or FA2) imports and runs on ``device`` (default: the current CUDA device)."""
    return flash_kernel(device)[0] is not None


_LOGGED: set = set()


def _log_once(msg: str) -> None:
    if msg not in _LOGGED:
        _LOGGED.add(msg)
        log.info(msg)


def resolve_backend(name: str, device: Union[str, torch.device, None] = None,
                    precision: Union[str, torch.dtype, None] = "fp32") -> str:
    """Map ``auto`` to a concrete backend for a model on ``device`` running in ``precision``, and check that the
    requested one can run; raises AttentionBackendError (FlashPrecisionError, a ValueError too, for flash + fp32).

    ``device`` None is the CPU. ``auto`` is flash_attn only on a CUDA device where a flash kernel runs and in bf16 /
    fp16 (flash kernels have no fp32: an fp32 run would be silently rounded); SDPA otherwise.
    """
    if name not in BACKENDS:
        raise AttentionBackendError(f"unknown attention backend '{name}'; choose one of {list(BACKENDS)}")
    precision = normalize_precision(precision)
    where = "cpu" if device is None else str(device)
    if name == "auto":
        kernel, why = flash_kernel(device)
        if kernel is not None and precision == "fp32":
            choice, why = "sdpa", f"{kernel.name} is usable but the run is fp32 and flash kernels compute in bf16/fp16"
        else:
            choice = "flash_attn" if kernel is not None else "sdpa"
        _log_once(f"attention backend auto -> {choice} (device {where}, precision {precision}): {why}")
        return choice
    if name == "flash_attn":
        if precision == "fp32":
            raise FlashPrecisionError(
                "attn_backend=flash_attn with precision fp32: flash kernels compute in bf16/fp16 only, so fp32 "
                "q/k/v would be rounded to bf16 without a word; run in bf16 (precision=bf16 / autocast), or use "
                "attn_backend=sdpa (or auto, which picks SDPA for fp32)")
        kernel, why = flash_kernel(device)
        if kernel is None:
            hint = " (pip install 'evaclip[flash]', see README)" if "not importable" in why else ""
            raise AttentionBackendError(f"attn_backend=flash_attn cannot run on {where}: {why}{hint}; use "
                                        "attn_backend=sdpa (torch's fused kernels) or auto")
        _log_once(f"attention backend flash_attn (device {where}, precision {precision}): {why}")
    return name


# FLOPs of attention kernels that torch's dispatcher cannot see (FA2 < 2.6): open tallies, added to by Attend.
_FLOP_TALLIES: list = []


@contextlib.contextmanager
def untraced_attention_flops():
    """Tally the FLOPs of attention calls that FlopCounterMode cannot count (a flash kernel that is no torch op).

    Yields a one-element list whose item is the running total: forward FLOPs when the kernel runs, backward FLOPs
    when the gradient of its output is computed (SDPA's formulas, causal counted as full, as torch counts it).
    """
    tally = [0]
    _FLOP_TALLIES.append(tally)
    try:
        yield tally
    finally:
        _FLOP_TALLIES.remove(tally)


def _tally_flops(q_BNHF: torch.Tensor, k_BNHF: torch.Tensor, v_BNHF: torch.Tensor, out: torch.Tensor) -> None:
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    q, k, v = ((t.shape[0], t.shape[2], t.shape[1], t.shape[3]) for t in (q_BNHF, k_BNHF, v_BNHF))
    tallies = list(_FLOP_TALLIES)
    for t in tallies:
        t[0] += sdpa_flop_count(q, k, v)
    if out.requires_grad:
        bwd = sdpa_backward_flop_count(q, q, k, v)

        def on_backward(grad):
            for t in tallies:
                t[0] += bwd

        out.register_hook(on_backward)


def _check_mask(mask: Optional[torch.Tensor], causal: bool) -> None:
    if mask is None:
        return
    if causal:
        raise ValueError("attention got both causal=True and a mask; fold the causal structure into the mask")
    if mask.dtype != torch.bool:
        raise TypeError(f"attention mask must be boolean (True = attend), got {mask.dtype}")


def eager_attention(q_BHNF, k_BHNF, v_BHNF, causal: bool = False, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The reference: softmax(q k^T / sqrt(F)) v, with an explicit causal mask or a boolean ``mask``."""
    _check_mask(mask, causal)
    scale = 1.0 / math.sqrt(q_BHNF.shape[-1])
    attn_BHNN = (q_BHNF * scale) @ k_BHNF.transpose(-2, -1)
    if causal:
        n = q_BHNF.shape[-2]
        mask = ~torch.ones(n, n, dtype=torch.bool, device=q_BHNF.device).triu_(1)
    if mask is not None:
        attn_BHNN = attn_BHNN.masked_fill(~mask, float("-inf"))
    attn_BHNN = attn_BHNN.float().softmax(dim=-1).to(v_BHNF.dtype)
    return attn_BHNN @ v_BHNF


def sdpa_attention(q_BHNF, k_BHNF, v_BHNF, causal: bool = False, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """torch's fused kernels (flash / cuDNN / memory-efficient on CUDA). Without ``mask`` flash stays eligible; with one
    SDPA picks the memory-efficient or math kernel."""
    _check_mask(mask, causal)
    return F.scaled_dot_product_attention(q_BHNF, k_BHNF, v_BHNF, attn_mask=mask, is_causal=causal)


class Attend(torch.nn.Module):
    """``attend(q, k, v, causal, mask)`` in the backend's layout; ``layout`` is ``"BHND"`` (B H N F)
    or ``"BNHD"`` (B N H F).

    ``mask`` (boolean, B H Nq Nk-broadcastable, True = attend) always runs through SDPA (eager for the eager backend):
    flash_attn has no arbitrary mask, and its causal mode with Nq != Nk aligns the mask bottom-right.

    ``requested`` is what the user asked for (default: ``backend``). With ``auto`` the backend is resolved again
    whenever the module moves to another device (``model.to`` / ``cuda`` / ``cpu`` / ``to_empty``), for the run's
    ``precision``, so the layout the towers read follows it. flash_attn given fp32 inputs (no autocast) runs them
    through SDPA in fp32 with a warning, instead of rounding them to bf16.
    """

    def __init__(self, backend: str = "sdpa", *, requested: Optional[str] = None,
                 precision: Union[str, torch.dtype, None] = "fp32"):
        super().__init__()
        self.precision = normalize_precision(precision)
        if backend == "auto":
            requested, backend = "auto", resolve_backend("auto", None, self.precision)
        self.requested = requested or backend
        # Follows the module through _apply (a plain attribute, not a buffer: no state_dict / DDP / FSDP entry).
        self._probe = torch.empty(0)
        self._device = self._probe.device
        self._set_backend(backend)

    def _set_backend(self, backend: str) -> None:
        self.backend = backend
        self.layout = "BNHD" if backend == "flash_attn" else "BHND"
        self._kernel: Optional[FlashKernel] = None
        self._kernel_device: Optional[torch.device] = None

    def _apply(self, fn, recurse: bool = True):
        out = super()._apply(fn, recurse)
        try:
            self._probe = fn(self._probe)
        except Exception:  # noqa: BLE001 - an _apply fn meant for parameters only: keep the last known device
            return out
        device = self._probe.device
        if device != self._device:
            self._device = device
            if self.requested == "auto":
                self._set_backend(resolve_backend("auto", device, self.precision))
            self._kernel = None
        return out

    def _flash_kernel(self, device: torch.device) -> FlashKernel:
        if self._kernel is None or self._kernel_device != device:
            kernel, why = flash_kernel(device if device.type == "cuda" else "cuda")
            if kernel is None:
                raise AttentionBackendError(f"attn_backend=flash_attn cannot run: {why}")
            self._kernel, self._kernel_device = kernel, device
        return self._kernel

    def forward(self, q, k, v, causal: bool = False, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.backend == "flash_attn":
            if q.device.type == "cpu" and mask is None:
                raise AttentionBackendError("attn_backend=flash_attn runs on CUDA only and got CPU inputs; move the "
                                            "model to a CUDA device or build it with attn_backend=auto / sdpa")
            if q.dtype not in _HALF and mask is None:
                _warn_once("flash_attn got fp32 inputs (no bf16/fp16 autocast): computed by SDPA in fp32 instead "
                           "of rounding them to bf16")
            if mask is not None or q.dtype not in _HALF:  # B N H F views in and out; SDPA reads the strides
                out = sdpa_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal, mask)
                return out.transpose(1, 2)
            kernel = self._flash_kernel(q.device)
            out = kernel.func(q, k, v, causal=causal)
            out = out[0] if isinstance(out, tuple) else out
            if _FLOP_TALLIES and not kernel.torch_op:
                _tally_flops(q, k, v, out)
            return out
        if self.backend == "eager":
            return eager_attention(q, k, v, causal, mask)
        return sdpa_attention(q, k, v, causal, mask)

    def extra_repr(self) -> str:
        extra = f", requested={self.requested}" if self.requested != self.backend else ""
        return f"backend={self.backend}{extra}, precision={self.precision}"


def configure_attention(module: torch.nn.Module, backend: str, precision: Union[str, torch.dtype, None]) -> None:
    """Every ``Attend`` of ``module`` set to ``backend`` (as a run requests it: ``auto`` is resolved again when the
    module moves) and ``precision``, resolved now for the device each one is on. For a module loaded apart from the
    run's model, such as the MIM teacher, so it takes the same kernel as the student. AttentionBackendError (as
    ``resolve_backend``) when ``backend`` cannot run there."""
    precision = normalize_precision(precision)
    for m in module.modules():
        if isinstance(m, Attend):
            device = None if m._device.type == "cpu" else m._device
            m.precision, m.requested = precision, backend
            m._set_backend(resolve_backend(backend, device, precision))


_WARNED: set = set()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(msg, stacklevel=3)
