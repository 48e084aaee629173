"""Shared evaluation plumbing: rank/world, gathering results from every rank, autocast, feature encoding.

Shapes: see the legend in docs/ARCHITECTURE.md (B batch, E embedding dim, L context length).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Optional, Sequence

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


# ----------------------------------------------------------------------------------------------------------------------
# checkpoints -> model, preprocess, tokenizer (shared with evaclip.export)
# ----------------------------------------------------------------------------------------------------------------------
_WEIGHT_FILES = ("model.pt", "model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin")


def find_run_config(path: Path) -> Optional[dict]:
    """The resolved training config (``config.yaml``) saved in a checkpoint folder, or beside a weights file."""
    import yaml

    f = (path if path.is_dir() else path.parent) / "config.yaml"
    if f.is_file():
        cfg = yaml.safe_load(f.read_text()) or {}
        if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict):
            return cfg
    return None


def _convert_loader():
    try:
        from evaclip.models.convert import load_pretrained
    except ImportError:
        return None
    return load_pretrained


def resolve_checkpoint(checkpoint) -> Path:
    """The checkpoint a path stands for: a run folder (one holding ``ckpt/``) -> its newest complete checkpoint
    (``RUN/ckpt/step_N``); anything else is returned as given. ``evaclip eval`` / ``export`` print the result."""
    path = Path(checkpoint)
    if path.is_dir() and (path / "ckpt").is_dir():  # a run folder: its newest complete checkpoint
        from evaclip.checkpoint import find_resume_checkpoint

        newest = find_resume_checkpoint(path / "ckpt")
        if newest is None:
            raise FileNotFoundError(f"run folder {path} has no complete checkpoint under {path / 'ckpt'}")
        return Path(newest)
    return path


def load_model(checkpoint: str, model_name: Optional[str] = None, device="cpu", attn_backend: str = "auto",
               amp: bool = True):
    """Build the model a checkpoint was trained as and load its weights strictly; returns ``(model, name)``.

    The model is built for ``device`` and for the precision ``autocast(device, amp)`` runs it in (bf16 on CUDA with
    ``amp``, else fp32), so ``attn_backend=auto`` picks flash-attn only for a bf16 CUDA evaluation.

    ``checkpoint`` is a run folder (its newest complete checkpoint is used), a training checkpoint folder (``model.pt``
    + the run's ``config.yaml``), or a state-dict file
    (safetensors / torch) with ``model_name`` naming the architecture (or a ``config.yaml`` beside it).
    """
    from evaclip.checkpoint_sharded import checkpoint_weights, load_full_state_dict
    from evaclip.models import create_model
    from evaclip.models.convert import load_state_dict_file

    path = resolve_checkpoint(checkpoint)
    sharded = checkpoint_weights(path) if path.is_dir() else None  # dist.strategy=fsdp checkpoints (DCP shards)
    if sharded is not None:
        weights = sharded
    elif path.is_dir():
        weights = next((path / f for f in _WEIGHT_FILES if (path / f).is_file()), None)
        if weights is None:
            raise FileNotFoundError(f"checkpoint folder {path} has none of {', '.join(_WEIGHT_FILES)}")
    elif path.is_file():
        weights = path
    else:
        raise FileNotFoundError(f"checkpoint not found: {path}")
    overrides = {}
    run_cfg = find_run_config(path)
    if run_cfg is not None:
        overrides = dict(run_cfg["model"].get("overrides") or {})
        if model_name is None:
            model_name = run_cfg["model"].get("name")
    if model_name is None:
        raise ValueError(f"cannot tell which architecture {path} is: pass --model NAME (see evaclip.list_models())")
    precision = "bf16" if amp and torch.device(device).type == "cuda" else "fp32"  # what autocast() runs
    model = create_model(model_name, attn_backend=attn_backend, device=device, precision=precision, **overrides)
    sd = load_full_state_dict(weights) if sharded is not None else load_state_dict_file(weights)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if (missing or unexpected) and sharded is None and _convert_loader() is not None:
        # not evaclip's own layout: an EVA-CLIP release / open_clip file, which convert.py maps (strictly)
        _convert_loader()(model, pretrained=str(weights))
    elif missing or unexpected:
        raise ValueError(f"{weights} does not match {model_name}: missing keys {sorted(missing)[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected keys {sorted(unexpected)[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
    return model.to(device).eval(), model_name
