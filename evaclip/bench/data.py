"""Data pipeline benchmark (not a test): images/s per worker, evaclip vs open_clip_train's webdataset pipeline.

    evaclip bench data --out bench_results

Both pipelines read the same shards with the same transforms (``open_clip.image_transform(224, is_train=True)``) and
the same tokenizer, one DataLoader worker, resampled mode, in separate processes. Sources: the demo dataset (32x32
PNG) and generated 1500x1000 JPEGs. open_clip_train 3.x needs webdataset<=0.2.86, so its side runs from a separate
venv (default ``.venv-openclip``; ``OPEN_CLIP_VENV`` is how to create it).

Top-level imports are stdlib only: each side runs this same file as a script (``_measure``), the open_clip side with
the open_clip venv's python.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DESCRIPTION = ("Images/s per DataLoader worker (one core), evaclip vs open_clip_train's webdataset pipeline: the same "
               "shards, train transform (open_clip.image_transform(224, is_train=True)) and tokenizer, resampled, each "
               "side in its own process; sources: the demo dataset (32x32 PNG) and generated 1500x1000 JPEGs.")
OPEN_CLIP_VENV = ("python3 -m venv .venv-openclip && .venv-openclip/bin/pip install torch==2.14.1 torchvision==0.29.1 "
                  "open_clip_torch 'webdataset<=0.2.86' pandas braceexpand (the open_clip_torch 3.3 wheel ships the "
                  "open_clip_train package; add open_clip_train where the index has it)")
COLUMNS = [("source", "source"), ("samples", "samples"), ("evaclip", "evaclip img/s per worker"),
           ("open_clip", "open_clip img/s per worker"), ("ratio", "ratio")]


def _time_loader(loader, batch_size: int, warmup: int = 2) -> dict:
    # the first batches include worker start-up and tar opening: time the steady state after them
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    n = 0
    for images, tokens in it:
        assert images.shape[0] == tokens.shape[0]
        n += images.shape[0]
    dt = time.perf_counter() - t0
    return {"images": n, "seconds": round(dt, 3), "images_per_s": round(n / dt, 1)}


def run_evaclip(spec: str, num_samples: int, batch_size: int, image_size: int, workers: int) -> dict:
    import open_clip

    from evaclip.config import DataCfg
    from evaclip.data import build_train_loader

    cfg = DataCfg(train=spec, resampled=True, train_num_samples=num_samples, batch_size=batch_size, workers=workers,
                  shuffle_buffer=100)
    pre = open_clip.image_transform(image_size, is_train=True)
    info = build_train_loader(cfg, pre, open_clip.get_tokenizer("ViT-B-16"), pin_memory=False)
    return _time_loader(info.loader, batch_size)


def run_open_clip(spec: str, num_samples: int, batch_size: int, image_size: int, workers: int) -> dict:
    from types import SimpleNamespace

    import open_clip
    from open_clip_train.data import get_wds_dataset

    args = SimpleNamespace(train_data=spec, train_data_upsampling_factors=None, dataset_resampled=True,
                           train_num_samples=num_samples, batch_size=batch_size, workers=workers, world_size=1,
                           seed=0, distributed=False, val_data=None, val_num_samples=None)
    pre = open_clip.image_transform(image_size, is_train=True)
    data = get_wds_dataset(args, pre, is_train=True, epoch=0, tokenizer=open_clip.get_tokenizer("ViT-B-16"))
    return _time_loader(data.dataloader, batch_size)


def make_large_source(out: str, n: int = 96, per_shard: int = 24, seed: int = 0) -> str:
    """``n`` 1500x1000 JPEGs (smooth colour fields with texture, quality 90) in shards; returns the brace spec."""
    import numpy as np
    from PIL import Image

    sys.path.insert(0, ROOT)
    from data_tools.common import ShardSink, encode_image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:1000, 0:1500].astype(np.float32)
    sink = ShardSink(out, per_shard, prefix="large")
    for i in range(n):
        f = rng.uniform(0.002, 0.02, size=(3, 2))
        ph = rng.uniform(0, 6.3, size=3)
        img = np.stack([np.sin(xx * f[c, 0] + yy * f[c, 1] + ph[c]) for c in range(3)], -1) * 90 + 128
        img += rng.normal(0, 12, size=img.shape)
        sink.write({"__key__": f"{i:06d}", "jpg": encode_image(Image.fromarray(img.clip(0, 255).astype(np.uint8)),
                                                                  "jpg", 90), "txt": f"a synthetic photo {i}"})
    sink.close()
    return sink.shard_spec


def _measure(python: str, side: str, **kw) -> dict:
    """``run_<side>(**kw)`` in a fresh process of ``python`` (this file as a script, one thread); its figures."""
    cmd = [python, os.path.abspath(__file__), side, json.dumps(kw)]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if r.returncode != 0:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def add_args(p: argparse.ArgumentParser) -> None:
    """The ``bench data`` command-line options."""
    p.add_argument("--openclip-python", default=os.path.join(ROOT, ".venv-openclip", "bin", "python"),
                   help="python of the venv with open_clip_train (default: .venv-openclip/bin/python; the open_clip "
                   "side is skipped when it is missing). open_clip_train 3.x needs webdataset<=0.2.86: "
                   + OPEN_CLIP_VENV)
    p.add_argument("--demo", default=None, help="demo dataset folder (default: build one in a temp folder)")
    p.add_argument("--small-samples", type=int, default=2048, help="samples timed on the demo source (default: 2048)")
    p.add_argument("--large-samples", type=int, default=192,
                   help="samples timed on the 1500x1000 JPEG source (default: 192)")
    p.add_argument("--batch-size", type=int, default=32, help="default: 32")
    p.add_argument("--image-size", type=int, default=224, help="train transform output side (default: 224)")
    p.add_argument("--repeats", type=int, default=2, help="runs per side; the best is reported (shared machines)")


def run(args: argparse.Namespace) -> dict:
    """Measure both pipelines on both sources; returns the report section (images/s per worker, or the error)."""
    from evaclip.bench.report import section

    sides = {"evaclip": sys.executable, "open_clip": args.openclip_python}
    notes = [f"one DataLoader worker (one core) per side, best of {args.repeats} runs, batch {args.batch_size}, "
             f"open_clip's train transform at {args.image_size} px and its tokenizer, resampled webdataset shards"]
    if not os.path.isfile(args.openclip_python):
        notes.append(f"open_clip side not run: {args.openclip_python} not found (see --openclip-python in --help)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="evaclip_bench_data_") as tmp:
        if args.demo is None:
            sys.path.insert(0, ROOT)
            from data_tools.make_demo import make_demo

            small = make_demo(os.path.join(tmp, "demo"), show_progress=False)["train"]
        else:
            with open(os.path.join(args.demo, "demo.json")) as f:
                small = json.load(f)["train"]
        large = make_large_source(os.path.join(tmp, "large"))
        for name, spec, n in (("demo 32x32 PNG", small, args.small_samples),
                              ("1500x1000 JPEG", large, args.large_samples)):
            row = {"source": name, "samples": n}
            for side, python in sides.items():
                if not os.path.isfile(python):
                    continue
                runs = [_measure(python, side, spec=spec, num_samples=n, batch_size=args.batch_size,
                                 image_size=args.image_size, workers=1) for _ in range(args.repeats)]
                good = [r["images_per_s"] for r in runs if "images_per_s" in r]
                row[side] = max(good) if good else runs[0]["error"]
            if all(isinstance(row.get(side), float) for side in sides):
                row["ratio"] = round(row["evaclip"] / row["open_clip"], 2)
            rows.append(row)
    return section("Data pipeline (decode + augment + tokenize)", COLUMNS, rows, notes)


if __name__ == "__main__":  # one side's measurement (see _measure): its figures as JSON on stdout
    side, kw = sys.argv[1:]
    print(json.dumps({"evaclip": run_evaclip, "open_clip": run_open_clip}[side](**json.loads(kw))))
