"""``evaclip bench NAME [options] [--out DIR]`` (or ``python -m evaclip.bench``): run, print, write JSON + MD.

Every benchmark in ``BENCHMARKS`` is a module with a one-line ``DESCRIPTION``, ``add_args(parser)`` (its options) and
``run(args) -> section`` (a ``report.section`` table); ``evaclip bench NAME`` parses NAME's options with the parser
built from them and calls ``run``. ``all`` (what ``make bench`` runs) and ``gpu-check`` (``make gpu-check``) call
the same ``run`` functions with fixed command lines parsed by the same parsers: ``all`` sized for this repository's
2-core CPU CI machine (a few minutes) or, on a CUDA machine, for one GPU; ``gpu-check`` for one H100-class GPU.
"""
from __future__ import annotations

import argparse
import gc
import shlex
import sys
from pathlib import Path
from typing import Callable

import torch

from evaclip.bench import attention, data, lcl, mim, optimizer
from evaclip.bench import train as train_bench
from evaclip.bench.report import machine_info, markdown, section, write_report

__all__ = ["BENCHMARKS", "exit_code", "failed_section", "main", "parser", "run_sections"]

BENCHMARKS = {"train": train_bench, "attention": attention, "optimizer": optimizer, "data": data, "mim": mim,
              "lcl": lcl}

# `make bench` on a CPU: a small EVA-02 CLIP at 224 px, image-dominated (a 2-layer narrow text tower), so the
# token-drop ratio is visible in the step time; alternating with open_clip's equivalent.
CPU_TRAIN_ARGS = ["--model", "EVA02-CLIP-S-16", "--batch", "8", "--token-drop", "0", "0.5", "--vs", "open_clip",
                  "--steps", "1", "--rounds", "3", "--warmup", "1"]
GPU_TRAIN_ARGS = ["--model", "EVA02-CLIP-B-16", "--batch", "auto", "--precision", "bf16", "--token-drop", "0", "0.5",
                  "--vs", "open_clip", "--steps", "10", "--rounds", "3", "--warmup", "3"]
# `all`: each benchmark's command line on a CPU and on a CUDA machine, in report order. The optimizer runs on a real
# model's parameter set (the small CPU model on a CPU); MIM on a CPU: the small model as both student and teacher.
ALL_ARGS = {
    "train": (CPU_TRAIN_ARGS, GPU_TRAIN_ARGS),
    "attention": (["--device", "cpu"], ["--device", "cuda"]),
    "optimizer": (["--model", "EVA02-CLIP-S-16", "--device", "cpu"],
                  ["--model", "EVA02-CLIP-B-16", "--device", "cuda"]),
    "mim": (["--student", "EVA02-CLIP-S-16", "--teacher", "EVA02-CLIP-S-16", "--batch", "4", "--steps", "1",
             "--rounds", "2", "--device", "cpu"], ["--device", "cuda"]),
    "lcl": (["--device", "cpu", "--steps", "1", "--rounds", "3"], ["--device", "cuda"]),
    "data": ([], []),
}
# `make gpu-check`: B/16 in bf16 at token drop 0 and 0.5 vs open_clip, once per attention backend (train options
# given to `gpu-check` apply over these), the attention kernels at B/16's sequence length, and the MIM step of the
# default GPU pair; a few minutes on one H100.
GPU_CHECK_TRAIN_ARGS = ["--model", "EVA02-CLIP-B-16", "--device", "cuda", "--batch", "128", "--precision", "bf16",
                        "--token-drop", "0", "0.5", "--vs", "open_clip", "--steps", "5", "--rounds", "3", "--warmup",
                        "2"]
GPU_CHECK_ARGS = {"attention": ["--device", "cuda", "--precision", "bf16", "--seq", "197", "--head-dim", "64",
                                "--iters", "10"],
                  "mim": ["--device", "cuda", "--precision", "bf16"]}

H100_BF16_DENSE_PEAK = 989e12  # published: H100 SXM dense bf16 tensor-core peak, FLOP/s
H100_ASSUMED_MFU = 0.45  # the GPU target; an estimate, not a measurement


def parser() -> argparse.ArgumentParser:
    """``evaclip bench``'s parser: one subcommand per benchmark (its ``add_args``), plus ``all`` and ``gpu-check``."""
    p = argparse.ArgumentParser(prog="evaclip bench", description=__doc__.splitlines()[0].replace("``", ""),
                                epilog="`evaclip bench NAME --help` lists NAME's options")
    sub = p.add_subparsers(dest="what", required=True, metavar="NAME")
    for name, mod in BENCHMARKS.items():
        mod.add_args(sub.add_parser(name, help=mod.DESCRIPTION, description=mod.DESCRIPTION))
    every = sub.add_parser("all", help="every benchmark, sized for this machine (make bench)",
                           description="Every benchmark in one report, sized for this machine (CPU or one GPU), and "
                           "the data loading budget of a 16-core host against one H100.")
    every.add_argument("--train", default="", metavar="OPTIONS", help="train options as one string, applied over the "
                       "defaults, e.g. --train '--model EVA02-CLIP-L-14 --batch 64'")
    check = sub.add_parser("gpu-check", help="the GPU report of make gpu-check",
                           description="One GPU report: the training step once per attention backend, the attention "
                           "kernels at B/16's sequence length, the MIM step. The options are bench train's, applied "
                           f"over: {shlex.join(GPU_CHECK_TRAIN_ARGS)}.")
    train_bench.add_args(check)
    check.set_defaults(**vars(check.parse_args(GPU_CHECK_TRAIN_ARGS)))
    for s in sub.choices.values():
        s.add_argument("--out", default=None, metavar="DIR", help="write DIR/NAME.json and .md (default: print only)")
    return p


def _run(argv: list[str]) -> dict:
    """The section of one benchmark's command line (``[NAME, *options]``), parsed as ``evaclip bench`` parses it."""
    args = parser().parse_args(argv)
    return BENCHMARKS[args.what].run(args)


def data_budget(data_sec: dict, model: str = "EVA02-CLIP-B-16", token_drop: float = 0.5, cores: int = 16) -> dict:
    """Does a ``cores``-core host decode fast enough for one H100 training ``model`` at ``token_drop``?

    The H100 rate is ESTIMATED: FLOPs per sample counted here (FlopCounterMode on the meta device) / (the
    published dense bf16 peak x an assumed MFU). The per-core decode rate is the one ``bench data`` measured.
    """
    flops_per_sample = train_bench.flops_per_sample(model, token_drop)
    h100_samples_s = H100_BF16_DENSE_PEAK * H100_ASSUMED_MFU / flops_per_sample
    need_per_core = h100_samples_s / cores
    rows = []
    for r in data_sec["rows"]:
        per_core = r.get("evaclip") if isinstance(r.get("evaclip"), (int, float)) else None
        rows.append({"source": r["source"], "decode_per_core": per_core, "need_per_core": need_per_core,
                     "host_samples_s": per_core * cores if per_core else None,
                     "keeps_up": per_core >= need_per_core if per_core else None})
    notes = [f"{model} at token drop {token_drop}: {flops_per_sample / 1e9:.1f} GFLOP per sample per training step "
             f"(counted); one H100 at an assumed {H100_ASSUMED_MFU:.0%} MFU of {H100_BF16_DENSE_PEAK / 1e12:.0f} "
             f"TFLOP/s dense bf16 -> ESTIMATED {h100_samples_s:,.0f} samples/s, i.e. {need_per_core:,.0f} per core "
             f"on a {cores}-core host (all cores decoding, none left for the main process)"]
    return section(f"Data loading budget: {cores} cores vs one H100 (estimated)",
                   [("source", "source"), ("decode_per_core", "measured img/s per core"),
                    ("need_per_core", "needed img/s per core"), ("host_samples_s", f"{cores}-core img/s"),
                    ("keeps_up", "keeps up")], rows, notes)


def _all(args: argparse.Namespace, device: torch.device) -> list[dict]:
    on_gpu = device.type == "cuda"
    extra = {"train": shlex.split(args.train)}
    sections = [_run([name, *argvs[on_gpu], *extra.get(name, [])]) for name, argvs in ALL_ARGS.items()]
    return [*sections, data_budget(sections[list(ALL_ARGS).index("data")])]


def failed_section(title: str, error: BaseException, status: str = "failed") -> dict:
    """A report section that records why it has no figures: one row, the error in one line."""
    lines = str(error).strip().splitlines()
    msg = f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return section(title, [("status", "status"), ("error", "error")], [{"status": status, "error": msg[:300]}])


def run_sections(plan: list[tuple[str, Callable[[], dict]]], on_section: Callable[[list[dict]], None]) -> list[dict]:
    """Run each ``(title, make_section)`` of ``plan`` in order; a section that raises becomes a row with its one-line
    error (``AttentionBackendError``, no flash kernel on this machine: "not run"), and the next section still runs.
    ``on_section(sections so far)`` is called after each one, so the report on disk never loses a finished section."""
    from evaclip.models.attention import AttentionBackendError

    sections: list[dict] = []
    for title, make in plan:
        try:
            sec = make()
        except Exception as e:  # noqa: BLE001 - any failure (a kernel's first compile, OOM) is this section's row
            sec = failed_section(title, e, "not run" if isinstance(e, AttentionBackendError) else "failed")
            print(f"gpu-check: section '{title}' {sec['rows'][0]['status']}: {sec['rows'][0]['error']}",
                  file=sys.stderr)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        sections.append(sec)
        on_section(sections)
    return sections


def _gpu_check_plan(args: argparse.Namespace) -> list[tuple[str, Callable[[], dict]]]:
    """The sections of ``gpu-check``: the training step once per attention backend, then ``GPU_CHECK_ARGS``."""
    def train(backend: str) -> dict:
        sec = train_bench.run(argparse.Namespace(**{**vars(args), "attn_backend": backend}))
        sec["title"] += f", attention {backend}"
        return sec

    plan = [(f"Training step: {args.model}, attention {b}", lambda b=b: train(b)) for b in ("flash_attn", "sdpa")]
    return plan + [(f"bench {name}", lambda n=name, a=argv: _run([n, *a])) for name, argv in GPU_CHECK_ARGS.items()]


def main(argv: list[str] | None = None) -> dict:
    """Parse ``argv`` (default: sys.argv[1:]), run the benchmark, print the table, write ``--out`` JSON + Markdown.

    Returns the report dict (``machine``, ``command``, ``sections``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    device = train_bench.resolve_device(getattr(args, "device", None) or "auto")
    report = {"title": f"evaclip bench {args.what}", "command": "python -m evaclip.bench " + shlex.join(argv),
              "machine": machine_info(device), "sections": []}

    def write(sections: list[dict]) -> None:
        report["sections"] = sections
        if args.out:
            write_report(report, args.out, args.what)

    if args.what == "all":
        write(_all(args, device))
    elif args.what == "gpu-check":  # written section by section: a late failure keeps the earlier figures
        run_sections(_gpu_check_plan(args), write)
    else:
        write([BENCHMARKS[args.what].run(args)])
    print(markdown(report))
    if args.out:
        print(f"wrote {Path(args.out) / args.what}.json and .md")
    return report


def exit_code(report: dict) -> int:
    """1 when a section of ``report`` failed (its row says why; the other sections' figures are in the report), else
    0. A section "not run" (no flash kernel here) is not a failure."""
    failed = any(r.get("status") == "failed" for sec in report["sections"] for r in sec["rows"])
    return int(failed)


if __name__ == "__main__":
    sys.exit(exit_code(main()))
