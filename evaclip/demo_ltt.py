"""ViTamin with Locked-Text Tuning on the digits, against the tiny EVA-02 at equal training FLOPs (docs/DEMO.md).

The demo's stage-1 CLIP (``demo_cpu`` with ``seed=--teacher-seed``, found finished or trained as ``make demo`` trains
it) gives the text tower. Per seed, the ``demo_vitamin_ltt_cpu`` recipe runs twice with that text tower locked
(``model.text_init``, ``optim.lock_text``): with the ViTamin-demo image tower (conv stages + 4 TFB blocks) and with the
EVA02-CLIP-demo image tower (stage 1's shape), both from scratch, same data order, optimizer and steps. One training
step costs the same FLOPs in both (``--flops`` counts them), so zero-shot top-1 at the same step is at the same
training compute. Not part of ``make demo``.

    python -m evaclip.demo_ltt --data demo_data --runs runs/ltt --seeds 0 1 2 --table docs/DEMO.md
    python -m evaclip.demo_ltt --flops          # training FLOPs per sample of both image towers (text locked)

Runs land in ``RUNS/seed<T>/demo_cpu`` (the text source) and ``RUNS/seed<N>/{ltt_vitamin, ltt_eva02}``; a second
invocation finds finished runs.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

from evaclip.demo import TEACHER, build_data, curve, run_stage, stage_overrides, write_table

RECIPE = "demo_vitamin_ltt_cpu"
ARMS = {"ltt_vitamin": "ViTamin-demo", "ltt_eva02": "EVA02-CLIP-demo"}  # run name -> image tower
STEPS = (25, 50, 75, 100)
TABLE_BEGIN, TABLE_END = "<!-- ltt-seeds:begin -->", "<!-- ltt-seeds:end -->"


def train_flops_per_sample(model_name: str, batch: int = 8) -> float:
    """FLOPs of one training step per sample (forward and backward, text tower locked so it runs forward only, no
    token dropping), counted with torch's FlopCounterMode at the recipe's input shapes."""
    import torch

    from evaclip.bench.flops import count_flops
    from evaclip.models import create_model

    model = create_model(model_name, attn_backend="sdpa").train()
    for p in model.text.parameters():
        p.requires_grad_(False)
    s, L = model.cfg.vision.image_size, model.cfg.text.context_length
    images_BCHW = torch.randn(batch, 3, s, s)
    tokens_BL = torch.randint(1, model.cfg.text.vocab_size - 1, (batch, L))
    tokens_BL[:, -1] = model.cfg.text.vocab_size - 1

    def step():
        out = model(images_BCHW, tokens_BL)
        (out.image_features @ out.text_features.T).sum().backward()

    return count_flops(step) / batch


def text_source(info: dict, runs: Path, seed: int) -> dict:
    """The demo's stage-1 CLIP of ``seed`` (``RUNS/seed<N>/demo_cpu``): trained, or found finished (then only read,
    so invocations running side by side, one per seed, do not contend for its run folder's lock)."""
    d = runs / f"seed{seed}"
    done = d / TEACHER / "demo_stage.json"
    if done.is_file():
        return json.loads(done.read_text())
    return run_stage(TEACHER, stage_overrides(TEACHER, info, d) + [f"seed={seed}", "log.tensorboard=false"])


def seed_runs(info: dict, runs: Path, seed: int, teacher_run: Path) -> dict:
    """Both LTT arms of one seed, text tower from ``teacher_run``; returns their zero-shot curves and seconds."""
    d = runs / f"seed{seed}"
    row = {"seed": seed, "seconds": {}}
    for name, model in ARMS.items():
        s = run_stage(RECIPE, [f"output_dir={d}", f"name={name}", "resume=auto", f"data.train={info['train']}",
                               f"eval.zeroshot={info['zeroshot']}", f"model.text_init={teacher_run}",
                               f"model.name={model}", f"seed={seed}"])
        row[name], row["seconds"][name] = curve(Path(s["run"])), s["seconds"]
    return row


def _pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def ltt_table(rows: list[dict], teacher: dict, flops: Optional[dict] = None) -> str:
    """Markdown: per seed, ViTamin-LTT / EVA-02-LTT zero-shot top-1 at the same steps and seconds; then the means
    and the text source's own zero-shot curve (``teacher``: ``{step: top1}``)."""
    head = " | ".join(f"{s} steps" for s in STEPS)
    out = [f"| seed | image tower (text locked) | {head} | seconds |", "|---:|---|" + "---:|" * (len(STEPS) + 1)]
    for r in rows:
        for name, model in ARMS.items():
            c = r[name]
            out.append(f"| {r['seed']} | {model} | " + " | ".join(_pct(c.get(s)) for s in STEPS)
                       + f" | {r['seconds'][name]:.0f} |")
    out.append("")
    for name, model in ARMS.items():
        finals = [r[name].get(STEPS[-1]) for r in rows if r[name].get(STEPS[-1]) is not None]
        if finals:
            out.append(f"- {model} + LTT, {STEPS[-1]} steps: mean {_pct(sum(finals) / len(finals))} %, worst "
                       f"{_pct(min(finals))} % ({len(finals)} seeds).")
    if teacher:
        steps = sorted(teacher)
        out.append("- The text tower's source, stage 1 (EVA02-CLIP-demo, both towers from scratch, token drop 0.5): "
                   + " / ".join(_pct(teacher[s]) for s in steps) + f" % at {' / '.join(map(str, steps))} steps.")
    if flops:
        out.append("- Training FLOPs per sample (text locked, counted by `python -m evaclip.demo_ltt --flops`): "
                   + ", ".join(f"{m} {f / 1e6:.1f} M" for m, f in flops.items()) + ".")
    return "\n".join(out)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m evaclip.demo_ltt", description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=Path("demo_data"), help="the digits data (built if missing)")
    p.add_argument("--runs", type=Path, default=Path("runs/ltt"), help="run folders: RUNS/seed<N>/...")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the LTT runs")
    p.add_argument("--teacher-seed", type=int, default=0, help="seed of the stage-1 CLIP that gives the text tower")
    p.add_argument("--table", type=Path, default=None, help="write the table between the ltt-seeds markers")
    p.add_argument("--flops", action="store_true", help="only print the training FLOPs per sample of both arms")
    args = p.parse_args(argv)
    flops = {m: train_flops_per_sample(m) for m in ARMS.values()}
    if args.flops:
        for m, f in flops.items():
            print(f"{m}: {f / 1e6:.1f} MFLOPs per training sample (text tower locked, no token drop)")
        return 0
    info = build_data(args.data)
    teacher = Path(text_source(info, args.runs, args.teacher_seed)["run"])
    rows = [seed_runs(info, args.runs, s, teacher) for s in args.seeds]
    table = ltt_table(rows, curve(teacher), flops)
    print(table)
    if args.table is not None:
        write_table(args.table, table, TABLE_BEGIN, TABLE_END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
