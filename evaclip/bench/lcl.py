"""LCL training-step benchmark (``evaclip bench lcl``): images/s, step time, MFU and the language model's share of
the step, beside the CLIP step of the same image tower on as many images (issue 19).

Both steps are the engine's own (``build_step``) on their task: ``LCLTask`` (image tower + pooler, the causal LM over
whole rows with the image latents in them, LM head, ``LCLLoss``) and ``ClipTask`` (image and text towers, the
contrastive loss). The LCL batch is synthetic: ``--rows`` token rows of ``--images-per-row`` image blocks (the
image's kept patch latents at ``--token-drop``, as the loader writes them) between random text, so the rows fill the
context; the CLIP batch is the synthetic batch of ``data.synthetic`` with one image per LCL image (``N`` images and
``N`` captions at the CLIP text tower's own context length). The LM's share: the LM alone (its forward over the rows
with the image latents as fixed inputs, the LM head at the generation targets, the cross-entropy, the backward) timed
on its own, over the whole LCL step. Weights are random (the speed does not depend on them; nothing is downloaded).
CPU defaults: EVA02-CLIP-S-16 (224 px, patch 16), 4 rows of 2 images, fp32; on a GPU: EVA02-CLIP-B-16, 64 rows of 2
images, bf16.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from evaclip.bench.flops import count_flops, matmul_peak_flops, mfu
from evaclip.bench.measure import median, time_calls
from evaclip.bench.report import section

__all__ = ["COLUMNS", "DESCRIPTION", "add_args", "run", "synthetic_rows"]

DESCRIPTION = ("LCL training-step time of the engine's own step (build_step) on task=lcl beside task=clip on as many "
               "images: images/s, step time, MFU and the language model's share of the LCL step (random weights, "
               "synthetic rows).")
COLUMNS = [("task", "task"), ("model", "model"), ("precision", "precision"), ("rows", "rows"),
           ("images", "images"), ("context", "context L"), ("images_per_s", "images/s"), ("step_ms", "step ms"),
           ("lm_ms", "LM ms"), ("lm_share_pct", "LM % of step"), ("gflops_per_image", "GFLOP/image"),
           ("mfu_pct", "MFU %")]


def add_args(p: argparse.ArgumentParser) -> None:
    """The ``bench lcl`` command-line options."""
    p.add_argument("--model", default=None, help="registered CLIP architecture of both models (default: "
                   "EVA02-CLIP-S-16 on CPU, EVA02-CLIP-B-16 on CUDA)")
    p.add_argument("--rows", type=int, default=None, help="LCL token rows per step (default 4 on CPU, 64 on CUDA)")
    p.add_argument("--images-per-row", type=int, default=2, help="image blocks in each row (1: image-text pairs)")
    p.add_argument("--text-per-image", type=int, default=32, help="text tokens before each image block")
    p.add_argument("--token-drop", type=float, default=0.5, help="image-token drop ratio of both steps")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--steps", type=int, default=2, help="timed steps per round (default: 2)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds; the median is reported (default: 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic batch")


def synthetic_rows(rows: int, images_per_row: int, text_per_image: int, image_tokens: int, image_size: int,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(images_NCHW, tokens_BL, L)``: ``rows`` rows of ``[sot] (text x text_per_image, image block) x
    images_per_row, text x text_per_image [eot]`` with random BPE ids, exactly as ``RowBuilder`` writes them."""
    from evaclip.data.interleaved import RowBuilder

    g = torch.Generator().manual_seed(seed)
    L = 2 + images_per_row * (text_per_image + image_tokens + 2) + text_per_image
    builder = RowBuilder(None, L, image_tokens)
    token_rows = []
    for _ in range(rows):
        text = lambda: torch.randint(1, 49405, (text_per_image,), generator=g).tolist()  # noqa: E731
        pieces = [p for k in range(images_per_row) for p in (text(), k)] + [text()]
        ids, kept = builder.row(pieces)
        assert len(kept) == images_per_row and len(ids) == L
        token_rows.append(ids)
    images = torch.randn(rows * images_per_row, 3, image_size, image_size, generator=g)
    return images, builder.pad(token_rows), L


def _cfg(task: str, model: str, precision: str, token_drop: float, extra: dict):
    from evaclip.config import load_config

    return load_config(None, {"task": task, "model.name": model, "precision": precision,
                              "model.token_drop": token_drop, "optim.name": "lamb", **extra})


def _lcl(args, model_name: str, device, precision: str, rows: int):
    from evaclip.distributed import DistEnv
    from evaclip.engine.step import build_step
    from evaclip.models.lcl import image_latents_per_image, lcl_model_cfg
    from evaclip.optim import build_optimizer
    from evaclip.tasks.lcl import LCLTask

    n = image_latents_per_image(lcl_model_cfg(model_name, 16), args.token_drop)
    size = lcl_model_cfg(model_name, 16).vision.image_size
    images, tokens, L = synthetic_rows(rows, args.images_per_row, args.text_per_image, n, size, args.seed)
    # data.train names no file: the batch is built here, the task's loader is never asked for
    cfg = _cfg("lcl", model_name, precision, args.token_drop, {"lcl_data.context_length": L, "data.batch_size": rows,
                                                               "data.train": "synthetic"})
    task = LCLTask(cfg, DistEnv(device=device))
    model = task.build_model().to(device)
    task.setup(model)
    train_step = build_step(cfg, task, model, build_optimizer(model, cfg.optim), device)
    micro = [task.to_device((images, tokens))]
    return cfg, task, model, train_step, micro, L


def _lm_only(model, micro, ctx):
    """The LM's part of the LCL step: its forward over the rows (image latents as fixed inputs), the LM head at the
    generation targets, the cross-entropy, the backward."""
    t = model.tokens
    images_NCHW, tokens_BL = micro[0]
    with torch.no_grad(), ctx.autocast():
        _, latents_NKW = model.image_latents(images_NCHW)
    latents_NKW = latents_NKW.detach().requires_grad_(True)
    boi_BL = tokens_BL == t.boi
    counts_BL = boi_BL.clone()
    counts_BL[:, 0] = False
    next_BL = tokens_BL[:, 1:]
    target_BL = (next_BL != t.image) & (next_BL != t.eoi) & (next_BL != t.pad)

    def lm():
        with ctx.autocast():
            h_BLW, txt_ME = model.text(tokens_BL, latents_NKW, t.image, counts_BL)
            logits_TV = model.lm_head(h_BLW[:, :-1][target_BL])
            loss = F.cross_entropy(logits_TV.float(), next_BL[target_BL]) + 0.0 * txt_ME.float().sum()
        loss.backward()
        model.zero_grad(set_to_none=True)

    return lm


def _clip(args, model_name: str, device, precision: str, images: int):
    from evaclip.distributed import DistEnv
    from evaclip.engine.step import build_step
    from evaclip.optim import build_optimizer
    from evaclip.tasks.clip import ClipTask

    cfg = _cfg("clip", model_name, precision, args.token_drop, {"data.synthetic": True, "data.batch_size": images})
    task = ClipTask(cfg, DistEnv(device=device))
    model = task.build_model().to(device)
    task.setup(model)
    train_step = build_step(cfg, task, model, build_optimizer(model, cfg.optim), device)
    micro = [task.to_device(next(iter(task.build_data(1).loader)))]
    return cfg, model, train_step, micro


def _time(fn, args, device) -> float:
    fn()  # warm-up: allocations, kernel selection
    return median([time_calls(fn, args.steps, device) for _ in range(args.rounds)])


def _lcl_row(args, model_name: str, device, precision: str, rows: int, peak: float):
    """The LCL step's row, its config and the LM's share of the step's FLOPs: the whole step, then the language
    model's part alone."""
    cfg, task, model, train_step, micro, L = _lcl(args, model_name, device, precision, rows)
    n_images = micro[0][0].shape[0]

    def lcl_step():
        train_step(micro)

    lcl_s = _time(lcl_step, args, device)
    lm = _lm_only(model, micro, train_step.ctx)
    lm_s = _time(lm, args, device)
    lcl_flops, lm_flops = count_flops(lcl_step), count_flops(lm)
    row = {"task": "lcl", "model": model_name, "precision": precision, "rows": rows, "images": n_images,
           "context": L, "images_per_s": n_images / lcl_s, "step_ms": 1e3 * lcl_s, "lm_ms": 1e3 * lm_s,
           "lm_share_pct": 100 * lm_s / lcl_s, "gflops_per_image": lcl_flops / n_images / 1e9,
           "mfu_pct": 100 * mfu(lcl_flops, lcl_s, peak)}
    return cfg, row, lm_flops / lcl_flops


def run(args: argparse.Namespace) -> dict:
    """Two rows: the LCL step and the CLIP step of ``args.model`` on as many images."""
    from evaclip.bench.train import resolve_device, resolve_dtype
    from evaclip.precision import precision_name

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.precision, device)
    precision = precision_name(dtype)
    cuda = device.type == "cuda"
    model_name = args.model or ("EVA02-CLIP-B-16" if cuda else "EVA02-CLIP-S-16")
    rows = args.rows or (64 if cuda else 4)
    if rows < 1 or args.images_per_row < 1 or args.text_per_image < 1:
        raise ValueError("--rows, --images-per-row and --text-per-image must be >= 1")
    peak = matmul_peak_flops(device, dtype)

    cfg, row, lm_share = _lcl_row(args, model_name, device, precision, rows, peak)  # its model is freed on return
    out = [row]
    n_images = row["images"]

    ccfg, cmodel, ctrain_step, cmicro = _clip(args, model_name, device, precision, n_images)

    def clip_step():
        ctrain_step(cmicro)

    clip_s = _time(clip_step, args, device)
    clip_flops = count_flops(clip_step)
    out.append({"task": "clip", "model": model_name, "precision": precision, "rows": n_images, "images": n_images,
                "context": cmodel.cfg.text.context_length, "images_per_s": n_images / clip_s,
                "step_ms": 1e3 * clip_s, "lm_ms": None, "lm_share_pct": None,
                "gflops_per_image": clip_flops / n_images / 1e9, "mfu_pct": 100 * mfu(clip_flops, clip_s, peak)})
    notes = [f"engine step (build_step) of task=lcl ({rows} rows of {args.images_per_row} image(s) and "
             f"{args.text_per_image} text tokens before each image and at the end, context {row['context']}) and of "
             f"task=clip on the same {n_images} images, token drop {args.token_drop}, LAMB, grad clip "
             f"{cfg.optim.grad_clip_norm}; {args.rounds} rounds of {args.steps} steps, median; LM = the language "
             "model's forward over the rows (image latents fixed), its head at the generation targets, the "
             f"cross-entropy and its backward, timed alone ({100 * lm_share:.0f} % of the LCL step's FLOPs); MFU "
             "against a measured matmul peak"]
    return section(f"LCL step beside the CLIP step: {model_name}", COLUMNS, out, notes)
