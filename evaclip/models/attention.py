"""Attention kernels behind one interface; the backend is chosen once, when the model is built.

Shapes: B batch, N tokens, H heads, D head dim. sdpa/eager take q/k/v as B H N D; flash_attn takes B N H D.
Each backend declares its ``layout`` so the caller arranges q/k/v once, without transposes around the kernel.
Masks are boolean, True where a query may attend a key, broadcastable to B H Nq Nk (SDPA's convention).
"""
from __future__ import annotations

import importlib
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "flash_attn", "sdpa", "eager")


class AttentionBackendError(RuntimeError):
    """The requested attention backend cannot run here."""


def _import_flash_attn() -> Optional[Callable]:
    """flash_attn_func from FlashAttention-2 (``flash_attn``) or FlashAttention-4 (``flash_attn.cute``), else None."""
    for module in ("flash_attn", "flash_attn.cute"):
        try:
            return importlib.import_module(module).flash_attn_func
        except (ImportError, AttributeError, OSError):
            continue
    return None


def flash_attn_usable(device: Optional[torch.device] = None) -> bool:
    """True if the flash-attn package imports and a CUDA device is there to run it."""
    if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
        return False
    return _import_flash_attn() is not None


def resolve_backend(name: str, device: Optional[torch.device] = None) -> str:
    """Map ``auto`` to a concrete backend and check that the requested one can run; raises AttentionBackendError."""
    if name not in BACKENDS:
        raise AttentionBackendError(f"unknown attention backend '{name}'; choose one of {list(BACKENDS)}")
    if name == "auto":
        return "flash_attn" if flash_attn_usable(device) else "sdpa"
    if name == "flash_attn":
        if _import_flash_attn() is None:
            raise AttentionBackendError(
                "attn_backend=flash_attn was requested but the flash-attn package is not installed "
                "(pip install 'evaclip[flash]'); use attn_backend=sdpa, which runs torch's flash kernels")
        if not torch.cuda.is_available():
            raise AttentionBackendError("attn_backend=flash_attn needs a CUDA device; use attn_backend=sdpa on CPU")
    return name


def _check_mask(mask: Optional[torch.Tensor], causal: bool) -> None:
    if mask is None:
        return
    if causal:
        raise ValueError("attention got both causal=True and a mask; fold the causal structure into the mask")
    if mask.dtype != torch.bool:
        raise TypeError(f"attention mask must be boolean (True = attend), got {mask.dtype}")


def eager_attention(q_BHND, k_BHND, v_BHND, causal: bool = False, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The reference: softmax(q k^T / sqrt(D)) v, with an explicit causal mask or a boolean ``mask``."""
    _check_mask(mask, causal)
    scale = 1.0 / math.sqrt(q_BHND.shape[-1])
    attn_BHNN = (q_BHND * scale) @ k_BHND.transpose(-2, -1)
    if causal:
        n = q_BHND.shape[-2]
        mask = ~torch.ones(n, n, dtype=torch.bool, device=q_BHND.device).triu_(1)
    if mask is not None:
        attn_BHNN = attn_BHNN.masked_fill(~mask, float("-inf"))
    attn_BHNN = attn_BHNN.float().softmax(dim=-1).to(v_BHND.dtype)
    return attn_BHNN @ v_BHND


def sdpa_attention(q_BHND, k_BHND, v_BHND, causal: bool = False, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """torch's fused kernels (flash / cuDNN / memory-efficient on CUDA). Without ``mask`` flash stays eligible; with one
    SDPA picks the memory-efficient or math kernel."""
    _check_mask(mask, causal)
    return F.scaled_dot_product_attention(q_BHND, k_BHND, v_BHND, attn_mask=mask, is_causal=causal)


class Attend(torch.nn.Module):
    """``attend(q, k, v, causal, mask)`` in the backend's layout; ``layout`` is ``"BHND"`` or ``"BNHD"``.

    ``mask`` (boolean, B H Nq Nk-broadcastable, True = attend) always runs through SDPA (eager for the eager backend):
    flash_attn has no arbitrary mask, and its causal mode with Nq != Nk aligns the mask bottom-right.
    """

    def __init__(self, backend: str = "sdpa"):
        super().__init__()
        self.backend = backend
        self.layout = "BNHD" if backend == "flash_attn" else "BHND"
        if backend == "flash_attn":
            self._flash = _import_flash_attn()

    def forward(self, q, k, v, causal: bool = False, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if mask is not None and self.backend == "flash_attn":  # BNHD views in and out; SDPA reads the strides
            return sdpa_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal, mask).transpose(1, 2)
        if self.backend == "flash_attn":
            dtype = q.dtype
            if dtype not in (torch.float16, torch.bfloat16):  # flash kernels run in half precision only
                q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
            out = self._flash(q, k, v, causal=causal)
            return (out[0] if isinstance(out, tuple) else out).to(dtype)
        if self.backend == "eager":
            return eager_attention(q, k, v, causal, mask)
        return sdpa_attention(q, k, v, causal, mask)

    def extra_repr(self) -> str:
        return f"backend={self.backend}"
