"""Shared evaluation plumbing: rank/world, gathering results from every rank, autocast, feature encoding.

Shapes: see the legend in docs/ARCHITECTURE.md (B batch, E embedding dim, L context length).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from evaclip.data.transforms import trim_padding
from evaclip.distributed import rank_world, unwrap  # noqa: F401  (re-exported for the eval modules)


def gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a per-rank tensor (any first-dim size, also 0) over all ranks, on CPU, in rank order."""
    rank, world = rank_world()
    t = t.detach().cpu()
    if world == 1:
        return t
    parts: list = [None] * world
    # object gather: ranks hold different sample counts and eval tensors are small next to the forward passes
    dist.all_gather_object(parts, t)
    return torch.cat(parts)


def gather_list(items: list) -> list:
    """Concatenate per-rank Python lists over all ranks, in rank order."""
    rank, world = rank_world()
    if world == 1:
        return list(items)
    parts: list = [None] * world
    dist.all_gather_object(parts, list(items))
    return [x for p in parts for x in p]


def autocast(device: torch.device | str, amp: bool):
    """bf16 autocast on CUDA when ``amp`` (fp16 would overflow some EVA activations); a no-op on CPU."""
    device = torch.device(device)
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def encode_texts(model, tokenizer: Callable, texts: Sequence[str], device, batch_size: int = 256,
                 amp: bool = True) -> torch.Tensor:
    """Texts -> L2-normalised float32 features ``(len(texts), E)`` on ``device``, encoded in batches of
    ``batch_size``."""
    out = []
    for s in range(0, len(texts), batch_size):
        tokens_BL = trim_padding(tokenizer(list(texts[s:s + batch_size]))).to(device)  # exact: causal, EOT-pooled
        with autocast(device, amp):
            f_BE = model.encode_text(tokens_BL)
        out.append(F.normalize(f_BE.float(), dim=-1))
    if not out:
        return torch.zeros(0, device=device)  # 1-D empty: torch.cat skips it when gathering
    return torch.cat(out)


@torch.no_grad()
def encode_images(model, images_BCHW: torch.Tensor, device, amp: bool = True) -> torch.Tensor:
    """Images -> L2-normalised float32 features ``(B, E)``."""
    with autocast(device, amp):
        f_BE = model.encode_image(images_BCHW.to(device, non_blocking=True))
    return F.normalize(f_BE.float(), dim=-1)


def progress(iterable, desc: str, enabled: bool = True, total=None):
    """tqdm on rank 0 only (other ranks would interleave their bars)."""
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=not enabled or rank_world()[0] != 0, leave=False)
