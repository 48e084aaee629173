"""Benchmark (not a test): one LAMB step on a real CLIP parameter set, evaclip's foreach Lamb vs torch_optimizer.Lamb.

Parameters and gradients are random tensors with the model's shapes, grouped exactly as a recipe's training run
groups them (``--recipe``, default the published EVA02-CLIP-B-16 one: per-tower lr, weight decay and layer decay 0.75,
57 groups), so the number of groups and of tensors per group is the real one. The kernels one step would launch on
CUDA are counted on the meta device (no GPU needed).

    evaclip bench optimizer --model EVA02-CLIP-B-16 [--recipe eva02_clip_b16] [--device cpu|cuda] [--steps 5]
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from evaclip.bench.measure import cuda_launches, median, release_host_memory, time_calls
from evaclip.bench.report import section
from evaclip.config import load_config
from evaclip.optim import Lamb, build_param_groups

__all__ = ["COLUMNS", "DESCRIPTION", "add_args", "bench_lamb", "launches_per_step", "run"]

DESCRIPTION = ("One LAMB step on a real CLIP parameter set, evaclip's foreach Lamb vs torch_optimizer.Lamb (random "
               "parameters and gradients with the model's shapes, grouped as the recipe's training run groups them).")
COLUMNS = [("model", "model"), ("source", "architecture from"), ("device_name", "device"), ("threads", "threads"),
           ("num_params", "params"), ("num_tensors", "tensors"), ("num_groups", "groups"),
           ("cuda_launches", "CUDA kernels/step (counted)"),
           ("foreach_ms", "foreach ms"), ("reference_ms", "torch_optimizer ms"), ("speedup", "speedup")]

RECIPE = "eva02_clip_b16"  # the published B/16 run: its optim section gives the grouping (57 groups)


def parameter_groups(model_name: str, recipe: str = RECIPE) -> tuple[list[dict], str]:
    """Param groups (names and shapes) of ``model_name`` on CPU, grouped as the ``recipe``'s training run groups
    them, and where the architecture came from."""
    from evaclip.models import create_model

    return build_param_groups(create_model(model_name), load_config(recipe, []).optim), "evaclip.models"


def launches_per_step(groups: list[dict], **lamb_kw) -> int:
    """Kernels one evaclip LAMB step over ``groups`` would launch on CUDA, counted from a profiler trace of a step
    on meta tensors (the CUDA branch; ``evaclip.bench.measure.cuda_launches``), after the step that creates the
    state."""
    from torch.profiler import ProfilerActivity, profile

    meta = [{**g, "params": [nn.Parameter(torch.empty(p.shape, device="meta")) for p in g["params"]]}
            for g in groups]
    for g in meta:
        for p in g["params"]:
            p.grad = torch.empty_like(p)
    opt = Lamb(meta, **lamb_kw)
    opt.step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        opt.step()
    return cuda_launches(prof)[0]


def _fresh_groups(groups: list[dict], device: torch.device, seed: int = 0) -> list[dict]:
    """Copies of the groups with new random parameters and gradients on ``device`` (same for every impl)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    for g in groups:
        params = []
        for p in g["params"]:
            q = nn.Parameter(torch.randn(p.shape, device=device, generator=gen) * 0.02)
            q.grad = torch.randn(p.shape, device=device, generator=gen) * 1e-3
            params.append(q)
        out.append({k: v for k, v in g.items() if k not in ("params", "param_names")} | {"params": params})
    return out


def time_interleaved(makers: dict, groups: list[dict], device: torch.device, steps: int) -> dict[str, float]:
    """Median seconds per optimizer step of each optimizer in ``makers`` (name -> factory of param groups).

    Steps of the optimizers alternate, so a load change on a shared machine hits them alike; one warmup step each
    allocates the state first.
    """
    opts = {name: make(_fresh_groups(groups, device)) for name, make in makers.items()}
    for opt in opts.values():
        opt.step()
    times: dict = {name: [] for name in opts}
    for _ in range(steps):
        for name, opt in opts.items():
            times[name].append(time_calls(opt.step, 1, device))
    del opts
    release_host_memory()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {name: median(ts) for name, ts in times.items()}


def bench_lamb(model_name: str = "EVA02-CLIP-B-16", device: str = "cpu", steps: int = 5, recipe: str = RECIPE) -> dict:
    """One row: median seconds of one LAMB step on ``device``, foreach vs torch_optimizer.Lamb, their ratio, and
    the kernels evaclip's step launches on CUDA (counted)."""
    import torch_optimizer

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but CUDA is not available")
    groups, source = parameter_groups(model_name, recipe)
    optim = load_config(recipe, []).optim
    # both compute torch_optimizer.Lamb's update (the reference has no DeepSpeed variant)
    kw = dict(lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay)
    secs = time_interleaved({"reference": lambda g: torch_optimizer.Lamb(g, **kw), "foreach": lambda g: Lamb(g, **kw)},
                            groups, dev, steps)
    ref_s, ours_s = secs["reference"], secs["foreach"]
    return dict(
        model=model_name, source=f"{source}, groups of recipe {recipe}", device=str(dev),
        device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        threads=torch.get_num_threads(), num_params=sum(p.numel() for g in groups for p in g["params"]),
        num_tensors=sum(len(g["params"]) for g in groups), num_groups=len(groups),
        cuda_launches=launches_per_step(groups, **kw), steps=steps,
        foreach_ms=round(ours_s * 1e3, 2), reference_ms=round(ref_s * 1e3, 2), speedup=round(ref_s / ours_s, 3),
    )


def add_args(p: argparse.ArgumentParser) -> None:
    """The ``bench optimizer`` command-line options."""
    p.add_argument("--model", default="EVA02-CLIP-B-16",
                   help="a registered evaclip architecture whose parameter set is used (default: EVA02-CLIP-B-16)")
    p.add_argument("--recipe", default=RECIPE, help=f"the recipe whose optim section groups the parameters (default: "
                   f"{RECIPE})")
    p.add_argument("--device", default=None, help="cpu | cuda (default: both where CUDA is available)")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps per implementation (default: 5)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def run(args: argparse.Namespace) -> dict:
    """Run from parsed ``bench optimizer`` options; returns the report section (one row per device)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [args.device] if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = [bench_lamb(args.model, d, args.steps, args.recipe) for d in devices]
    notes = [f"median of {args.steps} steps per implementation, steps alternating, one untimed step first; groups "
             f"as recipe {args.recipe}'s run builds them; CUDA kernels per step counted on the meta device"]
    return section("LAMB step: foreach vs torch_optimizer.Lamb", COLUMNS, rows, notes)
