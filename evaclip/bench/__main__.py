"""``python -m evaclip.bench {train,attention,optimizer,data,all,gpu-check} [options] --out DIR``: run, print, write
JSON + MD.

``all`` is what ``make bench`` runs: defaults sized for this repository's 2-core CPU CI machine (a few minutes) and,
on a CUDA machine, for one GPU (bf16, EVA02-CLIP-B-16, largest batch that fits). Each subcommand's ``--help`` lists
its options; ``train`` options may also be given to ``all`` after ``--train``.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any, Callable, Optional

import torch

from evaclip.bench import attention as attn_bench
from evaclip.bench import train as train_bench
from evaclip.bench.report import machine_info, markdown, section, write_report

__all__ = ["main"]

# `make bench` on a CPU: a small EVA-02 CLIP at 224 px, image-dominated (a 2-layer narrow text tower), so the
# token-drop ratio is visible in the step time; alternating with open_clip's equivalent.
CPU_TRAIN_ARGS = ["--model", "EVA02-CLIP-S-16", "--batch", "8", "--token-drop", "0", "0.5", "--vs", "open_clip",
                  "--steps", "1", "--rounds", "3", "--warmup", "1"]
GPU_TRAIN_ARGS = ["--model", "EVA02-CLIP-B-16", "--batch", "auto", "--precision", "bf16", "--token-drop", "0", "0.5",
                  "--vs", "open_clip", "--steps", "10", "--rounds", "3", "--warmup", "3"]


def _generic_section(title: str, result: Any, notes: Optional[list[str]] = None) -> dict:
    """A section from another benchmark's return value (a dict of rows, a list of rows, or one row)."""
    if isinstance(result, dict) and all(isinstance(v, dict) for v in result.values()) and result:
        rows = list(result.values())
    elif isinstance(result, list):
        rows = [r for r in result if isinstance(r, dict)]
    elif isinstance(result, dict):
        rows = [result]
    else:
        rows = []
    keys: list[str] = []
    for r in rows:
        keys += [k for k, v in r.items() if k not in keys and not isinstance(v, (dict, list))]
    return section(title, [(k, k) for k in keys], rows, notes)


def _delegate(module: str, title: str, argv: list[str]) -> dict:
    """Run another engineer's benchmark module (``main(argv)``) and turn what it returns into a section."""
    import importlib

    try:
        mod = importlib.import_module(f"evaclip.bench.{module}")
    except ImportError as e:
        return section(title, [], [], [f"not run: evaclip.bench.{module} is not importable ({e})"])
    result = mod.main(argv, prog=f"evaclip bench {module}")
    return _generic_section(title, result, [f"python -m evaclip.bench.{module} {shlex.join(argv)}".strip()])


def _data_section(argv: list[str], out: Optional[str]) -> dict:
    """``evaclip.bench.data`` writes ``<out>/data.json``; its rows become a section (images/s per worker)."""
    import json
    import tempfile
    from pathlib import Path

    from evaclip.bench import data as data_bench

    if {"-h", "--help"} & set(argv):  # help only: no temporary folder
        data_bench.main(argv, prog="evaclip bench data")
    out_dir = out or tempfile.mkdtemp(prefix="evaclip_bench_")
    argv = [*argv, "--out", out_dir]
    data_bench.main(argv, prog="evaclip bench data")
    rows = []
    for r in json.loads((Path(out_dir) / "data.json").read_text()).get("rows", []):
        row = {"source": r.get("source"), "samples": r.get("samples"), "ratio": r.get("ratio")}
        for side in ("evaclip", "open_clip"):
            got = r.get(side, {})
            row[side] = got.get("images_per_s", got.get("error"))
        rows.append(row)
    cols = [("source", "source"), ("samples", "samples"), ("evaclip", "evaclip img/s per worker"),
            ("open_clip", "open_clip img/s per worker"), ("ratio", "ratio")]
    notes = [f"python -m evaclip.bench.data {shlex.join(argv)}", "one DataLoader worker (one core) per side, "
             "open_clip's train transform at 224 px and its tokenizer, resampled webdataset shards"]
    return section("Data pipeline (decode + augment + tokenize)", cols, rows, notes)


def _run_train(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="evaclip bench train", description="Training-step time, throughput, peak memory "
                                "and MFU of an evaclip model on synthetic batches (with --vs open_clip: open_clip's "
                                "equivalent model in the same run, alternating rounds).")
    train_bench.add_args(p)
    return train_bench.bench_train(train_bench.cfg_from_args(p.parse_args(argv)))


def _run_attention(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="evaclip bench attention", description="Forward + backward time of each "
                                "attention backend (eager, sdpa, flash_attn where available) over sequence lengths and "
                                "head dimensions, with the error against eager.")
    attn_bench.add_args(p)
    return attn_bench.run(p.parse_args(argv))


H100_BF16_DENSE_PEAK = 989e12  # published: H100 SXM dense bf16 tensor-core peak, FLOP/s
H100_ASSUMED_MFU = 0.45  # the GPU target; an estimate, not a measurement


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


def _all(argv: list[str], device: torch.device, out: Optional[str]) -> list[dict]:
    on_gpu = device.type == "cuda"
    train_args = argv or (GPU_TRAIN_ARGS if on_gpu else CPU_TRAIN_ARGS)
    sections = [_run_train(train_args), _run_attention(["--device", str(device.type)])]
    # The optimizer benchmark runs on a real model's parameter set: B/16 on a GPU, the small CPU model on a CPU.
    sections.append(_delegate("optimizer", "LAMB step: foreach vs torch_optimizer.Lamb",
                              ["--model", "EVA02-CLIP-B-16" if on_gpu else "EVA02-CLIP-S-16", "--device",
                               device.type]))
    sections.append(_data_section([], out))
    sections.append(data_budget(sections[-1]))
    return sections


# `make gpu-check`: one report, B/16 in bf16 at token drop 0 and 0.5 vs open_clip, once per attention backend, plus
# the attention kernels at B/16's sequence length; a few minutes on one H100 (train options after `gpu-check`).
GPU_CHECK_TRAIN_ARGS = ["--model", "EVA02-CLIP-B-16", "--device", "cuda", "--batch", "128", "--precision", "bf16",
                        "--token-drop", "0", "0.5", "--vs", "open_clip", "--steps", "5", "--rounds", "3", "--warmup",
                        "2"]


def _gpu_check(argv: list[str]) -> list[dict]:
    from evaclip.models.attention import AttentionBackendError

    sections = []
    for backend in ("flash_attn", "sdpa"):
        try:
            sec = _run_train([*GPU_CHECK_TRAIN_ARGS, *argv, "--attn-backend", backend])
        except AttentionBackendError as e:  # no flash kernel on this GPU: the report says why
            sec = section("Training step: EVA02-CLIP-B-16", [], [], [f"not run: {e}"])
        sec["title"] += f", attention {backend}"
        sections.append(sec)
    sections.append(_run_attention(["--device", "cuda", "--precision", "bf16", "--seq", "197", "--head-dim", "64",
                                    "--iters", "10"]))
    return sections


SUBCOMMANDS: dict[str, Callable[[list[str], Optional[str]], list[dict]]] = {
    "gpu-check": lambda a, out: _gpu_check(a),
    "train": lambda a, out: [_run_train(a)],
    "attention": lambda a, out: [_run_attention(a)],
    "optimizer": lambda a, out: [_delegate("optimizer", "LAMB step: foreach vs torch_optimizer.Lamb", a)],
    "data": lambda a, out: [_data_section(a, out)],
}


def main(argv: list[str] | None = None) -> dict:
    """Parse ``argv`` (default: sys.argv[1:]), run the benchmark, print the table, write ``--out`` JSON + Markdown.

    Returns the report dict (``machine``, ``command``, ``sections``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    # No -h of its own once a subcommand is named: `bench train --help` must reach train's parser.
    top_help = not argv or argv[0] in ("-h", "--help") or (argv[0] == "all" and {"-h", "--help"} & set(argv))
    p = argparse.ArgumentParser(prog="evaclip bench", description=__doc__.splitlines()[0], add_help=top_help,
                                epilog="options after the subcommand go to it (see `evaclip bench train --help`)")
    p.add_argument("what", choices=[*SUBCOMMANDS, "all"])
    p.add_argument("--out", default=None, help="write <out>/<what>.json and .md (default: print only)")
    p.add_argument("--train", default=None, help="for `all`: the train options as one string")
    args, rest = p.parse_known_args(argv)
    device = train_bench.resolve_device("auto")
    if args.what == "all":
        if rest:
            p.error(f"`all` takes only --out and --train; got {rest}")
        sections = _all(shlex.split(args.train) if args.train else [], device, args.out)
    else:
        sections = SUBCOMMANDS[args.what](rest, args.out)
    report = {"title": f"evaclip bench {args.what}", "command": "python -m evaclip.bench " + shlex.join(argv),
              "machine": machine_info(device), "sections": sections}
    print(markdown(report))
    if args.out:
        json_path, md_path = write_report(report, args.out, args.what)
        print(f"wrote {json_path} and {md_path}")
    return report


if __name__ == "__main__":
    main()
