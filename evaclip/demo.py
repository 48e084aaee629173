"""``make demo``: build the digits data, train ``recipes/demo_cpu.yaml`` on the CPU, evaluate zero-shot on the held-out
digits with held-out caption templates, export the encoders, and say where everything went.

    python -m evaclip.demo --data demo_data --run runs/demo_cpu [key=value ...]

Extra ``key=value`` arguments override the recipe (e.g. ``max_steps=100`` for a quick look). A second invocation
resumes the run (``resume=auto``): a finished run is evaluated and exported again without retraining.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

RECIPE = "demo_cpu"
TARGET_TOP1 = 0.90


def build_data(data_dir: Path, seed: int = 0) -> dict:
    """The demo dataset description (``demo.json``), building the data first if it is not there yet."""
    info_path = data_dir / "demo.json"
    if info_path.is_file():
        print(f"[demo] data: reusing {data_dir} (delete it to rebuild)")
        return json.loads(info_path.read_text())
    from data_tools.make_demo import make_demo

    print(f"[demo] data: building the digits dataset in {data_dir}")
    return make_demo(str(data_dir), seed=seed, show_progress=False)


def export_encoders(checkpoint: Path, out_dir: Path) -> list[str]:
    """Export the trained encoders with ``evaclip.export`` (safetensors + config); returns what was written."""
    from evaclip.export import export

    written = export(str(checkpoint), str(out_dir), "safetensors")
    if isinstance(written, dict):
        return [str(v) for v in written.values()]
    if isinstance(written, (list, tuple)):
        return [str(p) for p in written]
    return [str(p) for p in sorted(out_dir.rglob("*")) if p.is_file()]


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evaclip.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="demo_data", help="demo data folder (built if missing)")
    ap.add_argument("--run", default="runs/demo_cpu", help="run folder (checkpoints, logs, metrics, export)")
    ap.add_argument("--no-export", action="store_true", help="skip exporting the encoders")
    ap.add_argument("overrides", nargs="*", help="recipe overrides, key=value")
    args = ap.parse_args(argv)

    from evaclip.config import ConfigError, load_config
    from evaclip.train import TrainingStopped
    from evaclip.train import main as train

    t0 = time.time()
    data_dir, run_dir = Path(args.data), Path(args.run)
    overrides = [f"output_dir={run_dir.parent}", f"name={run_dir.name}", "resume=auto"]
    try:
        load_config(RECIPE, overrides + args.overrides)  # bad overrides fail before the data is built
    except ConfigError as e:
        print(f"[demo] {e}", file=sys.stderr)
        return 2
    info = build_data(data_dir)
    t_data = time.time() - t0
    zeroshot_dir = Path(info["zeroshot"])
    cfg = load_config(RECIPE, [f"data.train={info['train']}", f"eval.zeroshot={zeroshot_dir}"]
                      + overrides + args.overrides)
    print(f"[demo] train: {RECIPE} ({cfg.model.name}, {cfg.max_steps} steps of {cfg.data.batch_size}, LAMB, token drop "
          f"{cfg.model.token_drop} until step {cfg.model.token_drop_until}) -> {run_dir}")
    try:
        result = train(cfg)
    except TrainingStopped as e:
        print(f"[demo] training stopped: {e}", file=sys.stderr)
        return 1
    if result.status != "finished":
        print(f"[demo] training was interrupted at step {result.step}; run `make demo` again to resume")
        return 1
    t_train = time.time() - t0 - t_data
    top1 = result.eval.get("zeroshot/top1")

    exported: list[str] = []
    export_dir = run_dir / "export"
    if not args.no_export:
        exported = export_encoders(result.checkpoint, export_dir)
    total = time.time() - t0
    summary = {"zeroshot_top1": top1, "zeroshot_top5": result.eval.get("zeroshot/top5"),
               "steps": result.step, "checkpoint": str(result.checkpoint), "export": str(export_dir),
               "seconds": {"data": round(t_data, 1), "train_and_eval": round(t_train, 1), "total": round(total, 1)}}
    (run_dir / "demo_result.json").write_text(json.dumps(summary, indent=1))

    print("\n[demo] done in %.0f s (data %.0f s, train + eval %.0f s)" % (total, t_data, t_train))
    print(f"  data                {data_dir}/ (train shards, held-out zeroshot/ and retrieval/ splits)")
    print(f"  run                 {run_dir}/ (config.yaml, run_info.json, metrics.jsonl, tensorboard/)")
    print(f"  checkpoint          {result.checkpoint}")
    if exported:
        print(f"  exported encoders   {export_dir}/ ({len(exported)} files)")
    print(f"  summary             {run_dir / 'demo_result.json'}")
    if top1 is None:
        print("[demo] no zero-shot result", file=sys.stderr)
        return 1
    ok = top1 >= TARGET_TOP1
    print(f"  zero-shot top-1     {100 * top1:.1f}% on {zeroshot_dir} with held-out templates "
          f"({'>=' if ok else 'BELOW'} the {100 * TARGET_TOP1:.0f}% target)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
