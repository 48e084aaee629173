"""MIM training-step benchmark (``evaclip bench mim``): images/s, step time, MFU and the frozen teacher's share of the
step, timing the engine's own step (``build_step``) on ``MIMTask`` (teacher forward, student forward + backward, the
update).

The teacher is a randomly initialised CLIP of the named architecture saved to a temporary file (the speed does not
depend on its weights, and nothing is downloaded). CPU defaults: student EVA02-CLIP-S-16 (patch 16) from an
EVA02-CLIP-B-16 teacher, fp32; on a GPU: EVA-02-B/14 from EVA01-CLIP-g-14, bf16 (EVA-02's own pairing).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from evaclip.bench.flops import count_flops, matmul_peak_flops, mfu
from evaclip.bench.measure import median, time_calls
from evaclip.bench.report import section

__all__ = ["COLUMNS", "DESCRIPTION", "add_args", "run"]

DESCRIPTION = ("MIM training-step time of the engine's own step (build_step) on task=mim: images/s, step time, MFU "
               "and the frozen teacher's share of the step (a randomly initialised teacher, synthetic images and block "
               "masks).")
COLUMNS = [("student", "student"), ("teacher", "teacher"), ("precision", "precision"), ("batch", "B"),
           ("images_per_s", "images/s"), ("step_ms", "step ms"), ("teacher_ms", "teacher ms"),
           ("teacher_share_pct", "teacher % of step"), ("gflops_per_image", "GFLOP/image"), ("mfu_pct", "MFU %")]


def add_args(p: argparse.ArgumentParser) -> None:
    """The ``bench mim`` command-line options."""
    p.add_argument("--student", default=None, help="registered CLIP whose image tower is the student (default: "
                   "EVA02-CLIP-S-16 on CPU, EVA02-CLIP-B-16 with vision.patch_size=14 on CUDA)")
    p.add_argument("--teacher", default=None, help="registered CLIP used as teacher (default: EVA02-CLIP-B-16 on CPU, "
                   "EVA01-CLIP-g-14 on CUDA)")
    p.add_argument("--batch", type=int, default=None, help="images per step (default 8 on CPU, 128 on CUDA)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--steps", type=int, default=2, help="timed steps per round (default: 2)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds; the median is reported (default: 3)")


def _build(args, device: torch.device, precision: str, tmp: Path):
    from evaclip.config import load_config
    from evaclip.distributed import DistEnv
    from evaclip.models import create_model
    from evaclip.tasks.mim import MIMTask

    cuda = device.type == "cuda"
    teacher_name = args.teacher or ("EVA01-CLIP-g-14" if cuda else "EVA02-CLIP-B-16")
    student = args.student or ("EVA02-CLIP-B-16" if cuda else "EVA02-CLIP-S-16")
    torch.save(create_model(teacher_name, attn_backend="sdpa").state_dict(), tmp / "teacher.pt")
    overrides = {"model.overrides.vision.patch_size": 14} if cuda and args.student is None else {}
    cfg = load_config(None, {"task": "mim", "model.name": student, "data.synthetic": True, "precision": precision,
                             "data.batch_size": args.batch or (128 if cuda else 8),
                             "mim.teacher": str(tmp / "teacher.pt"),
                             "mim.teacher_model": teacher_name, "optim.name": "adamw", "optim.grad_clip_norm": 3.0,
                             **overrides})
    task = MIMTask(cfg, DistEnv(device=device))
    model = task.build_model().to(device)
    task.setup(model)
    return cfg, task, model, teacher_name


def run(args: argparse.Namespace) -> dict:
    """One row: the MIM step of ``args``' student / teacher pair on synthetic images and block masks."""
    from evaclip.bench.train import resolve_device, resolve_dtype
    from evaclip.engine.step import build_step
    from evaclip.optim import build_optimizer
    from evaclip.precision import precision_name

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.precision, device)
    precision = precision_name(dtype)
    with tempfile.TemporaryDirectory(prefix="evaclip_bench_mim_") as tmp:
        cfg, task, model, teacher_name = _build(args, device, precision, Path(tmp))
    train_step = build_step(cfg, task, model, build_optimizer(model, cfg.optim), device)  # the loop's own step
    micro = [task.to_device(next(iter(task.build_data(1).loader)))]
    images_BCHW = micro[0][0]

    def step():
        train_step(micro)

    def teacher():
        with train_step.ctx.autocast():
            task.teacher(images_BCHW, model.cfg.grid)

    step()  # warm-up: allocations, kernel selection
    steps, teachers = [], []
    for _ in range(args.rounds):
        steps.append(time_calls(step, args.steps, device))
        teachers.append(time_calls(teacher, args.steps, device))
    step_s, teacher_s = median(steps), median(teachers)
    flops = count_flops(step)
    batch = images_BCHW.shape[0]
    peak = matmul_peak_flops(device, dtype)
    row = {"student": cfg.model.name, "teacher": teacher_name, "precision": precision, "batch": batch,
           "images_per_s": batch / step_s, "step_ms": 1e3 * step_s, "teacher_ms": 1e3 * teacher_s,
           "teacher_share_pct": 100 * teacher_s / step_s, "gflops_per_image": flops / batch / 1e9,
           "mfu_pct": 100 * mfu(flops, step_s, peak)}
    notes = [f"engine step (build_step) of task=mim (teacher forward + student forward/backward + AdamW update, "
             f"grad clip {cfg.optim.grad_clip_norm}); {args.rounds} rounds of {args.steps} steps, median; teacher "
             "share = the teacher's forward alone over the whole step; MFU against a measured matmul peak"]
    return section(f"MIM step: {cfg.model.name} student from a {teacher_name} teacher", COLUMNS, [row], notes)
