"""FlashAttention-4 (``flash_attn.cute``, the pinned 4.0.0b36) as the torch custom ops ``evaclip::fa4_fwd`` /
``evaclip::fa4_bwd``.

FA4 launches CuTe-DSL kernels from Python: torch's dispatcher sees no op, and ``torch.compile``, tracing into that
Python, breaks the graph at every attention call (a compiled block splits around it, FA4 runs between the pieces).
Registered through ``torch.library``, the call is one opaque op with a shape-only (fake) implementation and an autograd
formula: a compiled block stays one graph, and FlopCounterMode counts the op with SDPA's formulas. The ops call FA4's
own forward / backward entry points, the functions its ``FlashAttnFunc`` calls
(``flash_attn.cute.interface._flash_attn_fwd`` / ``_flash_attn_bwd``, with 4.0.0b36's signatures).

Shapes (FA4's layout): q, k, v, out B x N x H x F; lse B x H x N in fp32.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

__all__ = ["flash_attn_func"]


@torch.library.custom_op("evaclip::fa4_fwd", mutates_args=())
def _fa4_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from flash_attn.cute.interface import _flash_attn_fwd

    # return_lse: inside the op autograd is below us (no input requires grad), and the backward needs the lse
    out, lse = _flash_attn_fwd(q, k, v, causal=causal, return_lse=True)[:2]
    return out.contiguous(), lse.contiguous()  # the layout the fake implementation promises (no-ops for FA4's own)


@_fa4_fwd.register_fake
def _fa4_fwd_fake(q, k, v, causal):
    B, N, H, _ = q.shape
    return q.new_empty(B, N, H, v.shape[-1]), q.new_empty(B, H, N, dtype=torch.float32)


@torch.library.custom_op("evaclip::fa4_bwd", mutates_args=())
def _fa4_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from flash_attn.cute.interface import _flash_attn_bwd

    dq, dk, dv = _flash_attn_bwd(q, k, v, out, dout, lse, None, causal)[:3]
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_fa4_bwd.register_fake
def _fa4_bwd_fake(dout, q, k, v, out, lse, causal):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # contiguous, as the real op's


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, causal = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.causal = causal


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.evaclip.fa4_bwd(dout.contiguous(), q, k, v, out, lse, ctx.causal)
    return dq, dk, dv, None


_fa4_fwd.register_autograd(_backward, setup_context=_setup_context)


def _bhnf(shape) -> tuple[int, int, int, int]:
    return shape[0], shape[2], shape[1], shape[3]


@register_flop_formula(torch.ops.evaclip.fa4_fwd)
def _fa4_fwd_flops(q_shape, k_shape, v_shape, *args, **kwargs) -> int:
    """SDPA's count (causal counted as full, as torch counts it)."""
    return sdpa_flop_count(_bhnf(q_shape), _bhnf(k_shape), _bhnf(v_shape))


@register_flop_formula(torch.ops.evaclip.fa4_bwd)
def _fa4_bwd_flops(dout_shape, q_shape, k_shape, v_shape, *args, **kwargs) -> int:
    return sdpa_backward_flop_count(_bhnf(dout_shape), _bhnf(q_shape), _bhnf(k_shape), _bhnf(v_shape))


def flash_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """FA4 attention of B x N x H x F q / k / v (bf16 / fp16, CUDA) through the custom op; returns B x N x H x F."""
    return torch.ops.evaclip.fa4_fwd(q, k, v, causal)[0]
