"""``make demo``: the EVA bootstrap on the digits, on the CPU. Builds the digits data, then three runs, each named after
its recipe (``--runs`` holds them):

1. ``demo_cpu``: a tiny EVA-02 CLIP trained from scratch (it stands in for a released CLIP), zero-shot top-1 on the
   held-out digits every ``TEACHER_EVAL_EVERY`` steps: the from-scratch curve;
2. ``demo_mim_cpu``: masked image modeling of an EVA-02 student (the same image-tower shape) from that CLIP's image
   tower, on the images alone; its monitors: the masked loss on held-out digits and k-NN top-1;
3. ``demo_eva_clip_cpu``: EVA-CLIP: image tower from the MIM student, text tower from the stage-1 CLIP, LAMB, 50 %
   token dropping, zero-shot on the held-out digits with held-out caption templates; the encoders are exported.

It ends with the zero-shot top-1 of stages 1 and 3 at the same numbers of CLIP steps, what each stage saw (steps,
samples, seconds) and ``RUNS/demo_eva_clip_cpu/demo_result.json``. Exit status 0 when the EVA-initialised CLIP reaches
stage 1's final zero-shot top-1 within its (three times fewer) steps, 1 when it does not, 2 on a bad override.

    python -m evaclip.demo --data demo_data --runs runs [key=value ...] [--teacher k=v ...] [--mim k=v ...]
                           [--eva-clip k=v ...]
    python -m evaclip.demo --data demo_data --runs runs/seeds --seeds 0 1 2 3 4 --table docs/DEMO.md

``key=value`` overrides apply to every stage (``seed=3``), ``--teacher`` / ``--mim`` / ``--eva-clip`` to one stage
(``--mim max_steps=50``). A second invocation resumes each run (``resume=auto``): finished stages are not retrained.

``--seeds`` runs the bootstrap once per seed (each seed its own teacher, student and EVA-CLIP, in ``RUNS/seed<N>/``)
plus two controls per seed: the EVA-CLIP recipe for 300 steps (as long as the teacher) and the EVA-CLIP recipe from
scratch (no inits); the table goes to stdout and, with ``--table FILE``, between the ``demo-seeds`` markers of FILE.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

TEACHER, MIM, EVA_CLIP = "demo_cpu", "demo_mim_cpu", "demo_eva_clip_cpu"  # stage recipes = run folder names
TEACHER_EVAL_EVERY = 50
TOP1 = "eval/zeroshot/top1"
KNN = "eval/knn/top1"
# --seeds: the controls, run with the EVA-CLIP recipe. Long: as long as the teacher, its unmasked phase at the
# teacher's (the last 40 steps); scratch: no init, the same 100 steps
LONG_STEPS, LONG_DROP_UNTIL = 300, 260
TABLE_BEGIN, TABLE_END = "<!-- demo-seeds:begin -->", "<!-- demo-seeds:end -->"


def build_data(data_dir: Path, seed: int = 0) -> dict:
    """The demo dataset description (``demo.json``), building the data first if it is not there yet."""
    info_path = data_dir / "demo.json"
    if info_path.is_file():
        print(f"[demo] data: reusing {data_dir} (delete it to rebuild)")
        return json.loads(info_path.read_text())
    from data_tools.make_demo import make_demo

    print(f"[demo] data: building the digits dataset in {data_dir}")
    return make_demo(str(data_dir), seed=seed, show_progress=False)


def stage_overrides(stage: str, info: dict, runs: Path) -> list[str]:
    """The demo's own overrides of a stage's recipe: where its data, its inputs and its run folder are."""
    out = [f"output_dir={runs}", f"name={stage}", "resume=auto", f"data.train={info['train']}"]
    if stage == TEACHER:
        return out + [f"eval.zeroshot={info['zeroshot']}", f"eval.every={TEACHER_EVAL_EVERY}"]
    if stage == MIM:
        return out + [f"mim.teacher={runs / TEACHER}", f"mim.val={info['zeroshot']}",
                      f"mim.knn_train={info['knn_train']}", f"mim.knn_val={info['knn_val']}"]
    return out + [f"eval.zeroshot={info['zeroshot']}", f"model.image_init={runs / MIM}",
                  f"model.text_init={runs / TEACHER}"]


def stage_config(recipe: str, overrides: list[str]):
    """The config a stage trains with: the recipe with ``overrides``, or the stored config of a run being resumed."""
    from evaclip.config import load_config, parse_overrides
    from evaclip.engine.run_dir import reconcile_resume

    return reconcile_resume(load_config(recipe, overrides), parse_overrides(overrides))


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def curve(run_dir: Path, key: str = TOP1) -> dict[int, float]:
    """``{step: value}`` of a logged metric (the last record of each step: a resumed run may repeat one)."""
    return {r["step"]: r[key] for r in read_metrics(run_dir) if key in r and "step" in r}


def run_stage(recipe: str, overrides: list[str]) -> dict:
    """Train (or resume, or find finished) one stage; returns its summary, also written to ``RUN/demo_stage.json``."""
    from evaclip.train import main as train

    cfg = stage_config(recipe, overrides)
    run_dir = Path(cfg.output_dir) / cfg.name
    done = run_dir / "demo_stage.json"
    load0, t0 = os.getloadavg()[0], time.time()
    result = train(cfg)
    if result.status != "finished":
        raise SystemExit(f"[demo] {recipe} was interrupted at step {result.step}; run the demo again to resume")
    global_batch = cfg.data.batch_size * cfg.accum_freq
    summary = {"recipe": recipe, "run": str(run_dir), "task": cfg.task, "steps": result.step,
               "samples": result.step * global_batch, "checkpoint": str(result.checkpoint),
               "seconds": round(time.time() - t0, 1), "load_avg_1min": [round(load0, 2), round(os.getloadavg()[0], 2)]}
    if done.is_file() and json.loads(done.read_text()).get("steps") == result.step:
        summary = {**json.loads(done.read_text()), "checkpoint": str(result.checkpoint)}  # finished before: its time
    done.write_text(json.dumps(summary, indent=1))
    return summary


def crossing(curve_: dict[int, float], level: float) -> Optional[int]:
    """The first evaluated step whose value is at least ``level``."""
    return next((s for s in sorted(curve_) if curve_[s] >= level - 1e-9), None)


def _pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def comparison_table(teacher_run: Path, eva_run: Path) -> str:
    """Zero-shot top-1 (%) of the from-scratch CLIP (stage 1) and the EVA-initialised CLIP (stage 3) at each step
    where either was evaluated."""
    scratch, eva = curve(teacher_run), curve(eva_run)
    lines = ["| CLIP steps | from scratch (`demo_cpu`, stage 1) | EVA-initialised (`demo_eva_clip_cpu`, stage 3) |",
             "|---:|---:|---:|"]
    for s in sorted(set(scratch) | set(eva)):
        lines.append(f"| {s} | {_pct(scratch.get(s))} | {_pct(eva.get(s))} |")
    return "\n".join(lines)


def stages_table(summaries: list[dict], train_samples: int) -> str:
    lines = ["| stage | recipe | steps | samples seen | passes over the training images | seconds (1-min load) |",
             "|---|---|---:|---:|---:|---:|"]
    what = {TEACHER: "1 CLIP from scratch (image-text)", MIM: "2 MIM from stage 1 (images only)",
            EVA_CLIP: "3 EVA-CLIP from stages 1 + 2 (image-text)"}
    for s in summaries:
        load = "-".join(f"{x:.1f}" for x in s["load_avg_1min"])
        lines.append(f"| {what.get(s['recipe'], s['recipe'])} | `{s['recipe']}` | {s['steps']} | {s['samples']:,} | "
                     f"{s['samples'] / train_samples:.1f} | {s['seconds']:.0f} ({load}) |")
    return "\n".join(lines)


def export_encoders(checkpoint: str, out_dir: Path, fmt: str = "safetensors") -> list[str]:
    """Export with ``evaclip.export`` (CLIP encoders as safetensors + config, or a MIM student as ``eva_mim``)."""
    from evaclip.export import export

    written = export(checkpoint, str(out_dir), fmt)
    if isinstance(written, dict):
        return [str(v) for v in written.values()]
    if isinstance(written, (list, tuple)):
        return [str(p) for p in written]
    return [str(p) for p in sorted(out_dir.rglob("*")) if p.is_file()]


def init_report(recipe: str, overrides: list[str]) -> str:
    """What the EVA-CLIP stage's tower inits load, drop and leave fresh (the load report of ``model.image_init`` /
    ``model.text_init``, which training itself does not print)."""
    from evaclip.models import create_model
    from evaclip.models.convert import load_pretrained

    m = stage_config(recipe, overrides).model
    report = load_pretrained(create_model(m.name, attn_backend="sdpa", **m.overrides), image_init=m.image_init,
                             text_init=m.text_init)
    return (f"image tower <- {m.image_init} ({report.formats.get('image_init')}), text tower <- {m.text_init} "
            f"({report.formats.get('text_init')}); dropped: {', '.join(report.ignored) or 'nothing'}; fresh: "
            f"{', '.join(report.fresh) or 'nothing'}"
            + "".join(f"; {k}: {v}" for k, v in report.reinit.items()))


def bootstrap(info: dict, runs: Path, common: list[str], per_stage: dict[str, list[str]]) -> list[dict]:
    """Stages 1-3 into ``runs``; returns their summaries."""
    summaries = []
    for stage in (TEACHER, MIM, EVA_CLIP):
        overrides = stage_overrides(stage, info, runs) + common + per_stage[stage]
        print(f"\n[demo] stage {len(summaries) + 1}: {stage} -> {runs / stage}")
        if stage == EVA_CLIP:
            print(f"[demo] {init_report(stage, overrides)}")
        summaries.append(run_stage(stage, overrides))
    return summaries


def check_overrides(info_stub: dict, runs: Path, common: list[str], per_stage: dict[str, list[str]]) -> None:
    """Bad overrides fail before any data is built or any stage trains."""
    from evaclip.config import load_config

    for stage in (TEACHER, MIM, EVA_CLIP):
        load_config(stage, stage_overrides(stage, info_stub, runs) + common + per_stage[stage])


def demo(info: dict, runs: Path, common: list[str], per_stage: dict[str, list[str]], export: bool = True,
         t_data: float = 0.0) -> int:
    t0 = time.time()
    summaries = bootstrap(info, runs, common, per_stage)
    teacher_run, mim_run, eva_run = (runs / s for s in (TEACHER, MIM, EVA_CLIP))
    exported: list[str] = []
    if export:
        exported = export_encoders(summaries[2]["checkpoint"], eva_run / "export")
        exported += export_encoders(summaries[1]["checkpoint"], mim_run / "export", "eva_mim")
    scratch, eva, knn = curve(teacher_run), curve(eva_run), curve(mim_run, KNN)
    t_scratch, t_eva = scratch.get(max(scratch)) if scratch else None, eva.get(max(eva)) if eva else None
    reach = crossing(eva, t_scratch) if t_scratch is not None else None
    summary = {
        "zeroshot_top1": t_eva, "zeroshot_top5": curve(eva_run, "eval/zeroshot/top5").get(max(eva)) if eva else None,
        "teacher_zeroshot_top1": t_scratch, "mim_knn_top1": knn.get(max(knn)) if knn else None,
        "eva_reaches_teacher_final_at_step": reach, "curves": {"from_scratch": scratch, "eva_init": eva},
        "stages": summaries, "export": str(eva_run / "export"),
        "seconds": {"data": round(t_data, 1), "stages": round(time.time() - t0, 1),
                    "total": round(time.time() - t0 + t_data, 1)}}
    (eva_run / "demo_result.json").write_text(json.dumps(summary, indent=1))

    print(f"\n[demo] done in {summary['seconds']['total']:.0f} s (data {t_data:.0f} s)\n")
    print("Zero-shot top-1 (%) on the held-out digits, held-out caption templates:\n")
    print(comparison_table(teacher_run, eva_run))
    print("\nWhat each stage saw (training set: %d image-text pairs):\n" % info["train_num_samples"])
    print(stages_table(summaries, info["train_num_samples"]))
    print(f"\n  MIM student k-NN top-1   {_pct(summary['mim_knn_top1'])} % (held-out digits, training digits as bank)")
    if t_eva is None or t_scratch is None:
        print("[demo] no zero-shot result", file=sys.stderr)
        return 1
    steps_eva = max(eva)
    verdict = (f"reaches it at step {reach} of {steps_eva}" if reach is not None
               else f"does not reach it in {steps_eva} steps")
    print(f"  from scratch, {max(scratch)} steps   {_pct(t_scratch)} %; the EVA-initialised CLIP {verdict} "
          f"({_pct(t_eva)} % at step {steps_eva})")
    print(f"  runs                     {teacher_run}/, {mim_run}/, {eva_run}/")
    if exported:
        print(f"  exported                 {eva_run / 'export'}/ (CLIP encoders), {mim_run / 'export'}/ (student, "
              "EVA-02 MIM layout)")
    print(f"  summary                  {eva_run / 'demo_result.json'}")
    return 0 if reach is not None else 1


# ----------------------------------------------------------------------------------------------------------------------
# --seeds: the 5-seed table
# ----------------------------------------------------------------------------------------------------------------------
def seed_runs(info: dict, runs: Path, seed: int, common: list[str], per_stage: dict[str, list[str]]) -> dict:
    """One seed: the bootstrap, then the EVA-CLIP recipe for ``LONG_STEPS`` (as long as the teacher) and from
    scratch."""
    base = runs / f"seed{seed}"
    common = common + [f"seed={seed}"]
    stages = bootstrap(info, base, common, per_stage)
    eva = stage_overrides(EVA_CLIP, info, base) + common + per_stage[EVA_CLIP]
    print(f"\n[demo] seed {seed}: {EVA_CLIP} for {LONG_STEPS} steps")
    long = run_stage(EVA_CLIP, eva + [f"name={EVA_CLIP}_{LONG_STEPS}", f"max_steps={LONG_STEPS}",
                                      f"model.token_drop_until={LONG_DROP_UNTIL}"])
    print(f"\n[demo] seed {seed}: {EVA_CLIP} from scratch")
    scratch = run_stage(EVA_CLIP, eva + [f"name={EVA_CLIP}_scratch", "model.image_init=null", "model.text_init=null"])
    return {"seed": seed, "stages": stages + [long, scratch],
            "teacher": curve(base / TEACHER), "knn": curve(base / MIM, KNN), "eva": curve(base / EVA_CLIP),
            "eva_long": curve(Path(long["run"])), "scratch_same_recipe": curve(Path(scratch["run"]))}


def seeds_table(rows: list[dict]) -> str:
    """The markdown of the 5-seed table and its verdict lines."""
    def final(c: dict) -> Optional[float]:
        return c[max(c)] if c else None

    head = ["| seed | from scratch 100 / 300 steps (stage 1) | MIM k-NN | EVA-init 25 / 50 / 100 steps | first step >= "
            "stage 1's 300-step top-1 | EVA recipe from scratch, 100 steps | EVA-init, 300 steps | beats its teacher |",
            "|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        t300, e300 = final(r["teacher"]), final(r["eva_long"])
        reach = crossing(r["eva"], t300) if t300 is not None else None
        beats = "-" if None in (t300, e300) else ("yes" if e300 > t300 else "no")
        head.append(f"| {r['seed']} | {_pct(r['teacher'].get(100))} / {_pct(t300)} | {_pct(final(r['knn']))} | "
                    + " / ".join(_pct(r["eva"].get(s)) for s in (25, 50, 100))
                    + f" | {reach if reach is not None else 'not reached'} | {_pct(final(r['scratch_same_recipe']))} | "
                    f"{_pct(e300)} | {beats} |")
    lines = head + [""]

    def stats(values: list) -> str:
        values = [v for v in values if v is not None]
        return f"worst {_pct(min(values))} %, mean {_pct(sum(values) / len(values))} %" if values else "-"

    n = len(rows)
    pairs = [(final(r["teacher"]), final(r["eva_long"])) for r in rows]
    reached = sum(1 for r in rows if r["teacher"] and crossing(r["eva"], final(r["teacher"])) is not None)
    beats = sum(1 for t, e in pairs if None not in (t, e) and e > t)
    gains = [e - t for t, e in pairs if None not in (t, e)]
    lines += [f"- EVA-initialised CLIP, 100 steps: {stats([final(r['eva']) for r in rows])} ({n} seeds).",
              f"- From scratch (stage 1, the teacher), 300 steps: {stats([t for t, _ in pairs])}; the EVA-CLIP recipe "
              f"from scratch, 100 steps: {stats([final(r['scratch_same_recipe']) for r in rows])}.",
              f"- The EVA-initialised CLIP reaches its teacher's 300-step top-1 within 100 CLIP steps in {reached} of "
              f"{n} seeds.",
              f"- Trained as long as its teacher (300 steps), it beats its teacher in {beats} of {n} seeds"
              + (f" (by {100 * min(gains):+.1f} to {100 * max(gains):+.1f} points)." if gains else ".")]
    return "\n".join(lines)


def seconds_table(rows: list[dict]) -> str:
    lines = ["| seed | " + " | ".join(f"`{Path(s['run']).name}` steps / s (load)" for s in rows[0]["stages"]) + " |",
             "|---:|" + "---:|" * len(rows[0]["stages"])]
    for r in rows:
        lines.append(f"| {r['seed']} | " + " | ".join(
            f"{s['steps']} / {s['seconds']:.0f} ({s['load_avg_1min'][0]:.1f})" for s in r["stages"]) + " |")
    return "\n".join(lines)


def write_table(path: Path, text: str) -> None:
    """Replace what lies between the markers in ``path`` (append the marked block when there are none)."""
    block = f"{TABLE_BEGIN}\n{text}\n{TABLE_END}"
    old = path.read_text() if path.is_file() else ""
    if TABLE_BEGIN in old and TABLE_END in old:
        head, rest = old.split(TABLE_BEGIN, 1)
        new = head + block + rest.split(TABLE_END, 1)[1]
    else:
        new = old + ("\n" if old and not old.endswith("\n") else "") + block + "\n"
    path.write_text(new)


# ----------------------------------------------------------------------------------------------------------------------
def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evaclip.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="demo_data", help="demo data folder (built if missing)")
    ap.add_argument("--runs", default="runs", help="folder of the stage runs (one sub-folder per recipe)")
    ap.add_argument("--no-export", action="store_true", help="skip exporting the encoders")
    ap.add_argument("--seeds", type=int, nargs="+", help="run the bootstrap and its controls once per seed, print the "
                    "table (RUNS/seed<N>/)")
    ap.add_argument("--table", help="with --seeds: also write the table into this markdown file")
    for stage, flag in ((TEACHER, "--teacher"), (MIM, "--mim"), (EVA_CLIP, "--eva-clip")):
        ap.add_argument(flag, dest=stage, nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help=f"overrides of {stage} only")
    ap.add_argument("overrides", nargs="*", help="overrides of every stage, key=value")
    args = ap.parse_args(argv)
    per_stage = {s: getattr(args, s) for s in (TEACHER, MIM, EVA_CLIP)}

    from evaclip.config import ConfigError
    from evaclip.train import TrainingStopped

    t0 = time.time()
    data_dir, runs = Path(args.data), Path(args.runs)
    stub = {"train": str(data_dir / "train"), "zeroshot": str(data_dir / "zeroshot"),
            "knn_train": str(data_dir / "knn_train"), "knn_val": str(data_dir / "zeroshot")}
    try:
        check_overrides(stub, runs, args.overrides, per_stage)
        info = build_data(data_dir)
        t_data = time.time() - t0
        if not args.seeds:
            return demo(info, runs, args.overrides, per_stage, export=not args.no_export, t_data=t_data)
        rows = [seed_runs(info, runs, s, args.overrides, per_stage) for s in args.seeds]
    except ConfigError as e:
        print(f"[demo] {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"[demo] training stopped: {e}", file=sys.stderr)
        return 1

    text = seeds_table(rows) + "\n\nSteps and seconds per run:\n\n" + seconds_table(rows)
    print("\n" + text)
    if args.table:
        write_table(Path(args.table), text)
        print(f"\n[demo] table written into {args.table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
