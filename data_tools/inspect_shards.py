"""Check webdataset shards: count samples, decode every image, report bad samples, and summarise the data.

    python -m data_tools.inspect_shards 'data/{00000..00099}.tar' --plot stats.png

Reports every bad sample as ``shard  key  reason`` (unreadable image, no image, empty caption), compares the counts
with ``sizes.json`` when present and lists the ``.tar`` files beside the shards that it does not list (an earlier
run's leftovers, which a folder spec would read), prints caption-length and image-size statistics, and writes a PNG
of histograms. Image-only shards (``make_shards --images-only``: no ``txt`` in any sample) are a set of their own:
their samples are good without a caption, and the classes (``cls``) are counted and plotted instead.
Exit status: 0, or 1 with ``--strict`` when any sample is bad, a shard cannot be read or a tar is not indexed.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import sys
from typing import Optional

import numpy as np
from PIL import Image

from data_tools.common import progress
from evaclip.data.shards import check_shards_exist, expand_spec, is_local

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def inspect_shard(url: str, text_key: str = "txt") -> dict:
    """Decode every sample of one shard. Returns counts, per-sample stats and the bad samples with reasons; samples
    without any ``text_key`` entry are listed in ``uncaptioned`` (good in an image-only set, bad beside captions)."""
    from webdataset.tariterators import tarfile_samples

    out = {"shard": url, "count": 0, "bad": [], "uncaptioned": [], "caption_chars": [], "caption_words": [],
           "widths": [], "heights": [], "classes": [], "error": None}
    try:
        for s in tarfile_samples([{"url": url}]):
            out["count"] += 1
            key = s.get("__key__", "?")
            ik = next((k for k in IMAGE_EXTS if k in s), None)
            if ik is None:
                out["bad"].append((url, key, "no image (expected one of " + ", ".join(IMAGE_EXTS) + ")"))
                continue
            try:
                img = Image.open(io.BytesIO(s[ik]))
                img.load()
            except Exception as e:  # PIL raises many exception types on bad bytes
                out["bad"].append((url, key, f"unreadable {ik}: {type(e).__name__}: {str(e).split(' <_io.')[0]}"))
                continue
            if text_key not in s:
                out["uncaptioned"].append((url, key, img.size, _class_of(s)))
                continue
            cap = s[text_key].decode("utf-8", errors="replace").strip()
            if not cap:
                out["bad"].append((url, key, f"empty caption ({text_key})"))
                continue
            out["caption_chars"].append(len(cap))
            out["caption_words"].append(len(cap.split()))
            out["widths"].append(img.size[0])
            out["heights"].append(img.size[1])
    except Exception as e:  # a truncated or unreadable tar: report it, keep going with the other shards
        out["error"] = f"{type(e).__name__}: {e}"
    return out


def _class_of(sample: dict) -> Optional[int]:
    try:
        return int(sample["cls"].decode().strip()) if "cls" in sample else None
    except ValueError:
        return None


def index_check(urls: list[str], counts: list[int]) -> tuple[list[dict], list[str]]:
    """Against the ``sizes.json`` of each shard folder: shards whose count differs, and ``.tar`` files in those
    folders that it does not list."""
    mismatched, unlisted = [], []
    for folder in sorted({os.path.dirname(u) for u in urls if is_local(u)}):
        try:
            with open(os.path.join(folder, "sizes.json")) as f:
                listed = json.load(f)
        except (OSError, ValueError):
            continue
        mismatched += [{"shard": u, "sizes_json": listed[os.path.basename(u)], "found": n}
                       for u, n in zip(urls, counts) if os.path.dirname(u) == folder
                       and os.path.basename(u) in listed and listed[os.path.basename(u)] != n]
        unlisted += sorted(os.path.join(folder, f) for f in os.listdir(folder)
                           if f.endswith(".tar") and f not in listed)
    return mismatched, unlisted


def _work(args):
    return inspect_shard(*args)


def _stats(v) -> dict:
    if len(v) == 0:
        return {}
    a = np.asarray(v, dtype=np.float64)
    p = np.percentile(a, [5, 50, 95])
    return {"min": float(a.min()), "p5": float(p[0]), "median": float(p[1]), "mean": round(float(a.mean()), 2),
            "p95": float(p[2]), "max": float(a.max())}


def word_bins(words) -> np.ndarray:
    """Histogram bin edges with one bar per word count: edges at n - 0.5 for every n from the shortest caption to
    the longest + 1, so neighbouring counts never share a bar (a count no caption has shows as a gap)."""
    if len(words) == 0:
        return np.array([-0.5, 0.5])
    return np.arange(int(min(words)), int(max(words)) + 2) - 0.5


def plot_histograms(words, chars, widths, heights, path: str, classes=None) -> None:
    """Histograms of caption length (words, characters) and image size (width, height, shorter side) to a PNG; an
    image-only set (no ``words``) gets image size and, with ``classes`` (a class id per sample), samples per class."""
    import matplotlib

    matplotlib.use("Agg")  # headless: never open a window
    import matplotlib.pyplot as plt

    captions = len(words) > 0
    panels = 3 if captions else 1 + (classes is not None and len(classes) > 0)
    fig, ax = plt.subplots(1, panels, figsize=(5 * panels, 4), squeeze=False)
    ax = ax[0]
    if captions:
        ax[0].hist(words, bins=word_bins(words), color="tab:blue", edgecolor="white")
        ax[0].set(title="caption length", xlabel="words", ylabel="samples")
        ax[1].hist(chars, bins=50, color="tab:cyan")
        ax[1].set(title="caption length", xlabel="characters", ylabel="samples")
    size_ax = ax[2] if captions else ax[0]
    short = np.minimum(widths, heights) if len(widths) else []
    size_ax.hist([widths, heights, short], bins=40, label=["width", "height", "shorter side"])
    size_ax.set(title="image size", xlabel="pixels", ylabel="samples")
    size_ax.legend()
    if not captions and panels == 2:
        ids, n = np.unique(np.asarray(classes), return_counts=True)
        ax[1].bar(ids, n, color="tab:green")
        ax[1].set(title="samples per class", xlabel="class id", ylabel="samples")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def inspect(spec: str, workers: int = 1, text_key: str = "txt", plot: Optional[str] = None,
            show_progress: bool = True) -> dict:
    """Inspect every shard of ``spec``; returns a report dict (counts, bad samples, statistics)."""
    urls = [u for s in expand_spec(spec) for u in s]
    check_shards_exist(urls, spec)
    tasks = [(u, text_key) for u in urls]
    pool = mp.get_context("fork").Pool(workers) if workers > 1 and len(urls) > 1 else None
    results = pool.imap(_work, tasks) if pool else map(_work, tasks)
    per = []
    try:
        for r in progress(results, total=len(urls), desc="inspect", unit="shard", disable=not show_progress):
            per.append(r)
    finally:
        if pool:
            pool.terminate()
    cat = lambda k: [x for r in per for x in r[k]]
    words, chars, widths, heights = cat("caption_words"), cat("caption_chars"), cat("widths"), cat("heights")
    uncaptioned, bad = cat("uncaptioned"), cat("bad")
    images_only = bool(uncaptioned) and not words and not any("caption" in why for _, _, why in bad)
    classes = []
    if images_only:  # an image-only set: these samples are good, their sizes and classes are the statistics
        widths, heights = [w for _, _, (w, _), _ in uncaptioned], [h for _, _, (_, h), _ in uncaptioned]
        classes = [c for *_, c in uncaptioned if c is not None]
    else:
        bad += [(u, k, f"missing caption ({text_key}) in a set with captions") for u, k, _, _ in uncaptioned]
    mismatched, unlisted = index_check(urls, [r["count"] for r in per])
    report = {
        "shards": len(urls), "samples": sum(r["count"] for r in per),
        "good": len(uncaptioned) if images_only else len(words), "images_only": images_only,
        "bad": [{"shard": u, "key": k, "reason": why} for u, k, why in bad],
        "shard_errors": [{"shard": r["shard"], "error": r["error"]} for r in per if r["error"]],
        "sizes_json_mismatch": mismatched, "not_in_sizes_json": unlisted,
        "caption_words": _stats(words), "caption_chars": _stats(chars),
        "width": _stats(widths), "height": _stats(heights), "shorter_side": _stats(np.minimum(widths, heights)),
        "classes": {int(c): int(n) for c, n in zip(*np.unique(classes, return_counts=True))} if classes else {},
    }
    if plot:
        plot_histograms(words, chars, widths, heights, plot, classes=classes)
        report["plot"] = plot
    return report


def build_parser() -> argparse.ArgumentParser:
    from data_tools.make_shards import HelpFormatter

    ap = argparse.ArgumentParser(prog="python -m data_tools.inspect_shards", description=__doc__,
                                 formatter_class=HelpFormatter)
    ap.add_argument("spec", help="shard spec: brace pattern, '::'-separated sources, or a folder of .tar")
    ap.add_argument("--plot", default=None, help="write histograms of caption length and image size to this PNG")
    ap.add_argument("--json", default=None, help="write the full report to this JSON file")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                    help="processes reading shards (default: the CPU count - 1)")
    ap.add_argument("--text-key", default="txt", help="the caption entry of a sample")
    ap.add_argument("--strict", action="store_true", help="exit 1 when any sample or shard is bad")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    try:
        r = inspect(a.spec, a.workers, a.text_key, a.plot, show_progress=not a.quiet)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    kind = " (image-only: no captions)" if r["images_only"] else ""
    print(f"{r['samples']} samples in {r['shards']} shard(s){kind}: {r['good']} good, {len(r['bad'])} bad")
    for b in r["bad"]:
        print(f"  BAD {b['shard']}  {b['key']}  {b['reason']}")
    for e in r["shard_errors"]:
        print(f"  SHARD ERROR {e['shard']}: {e['error']}")
    for m in r["sizes_json_mismatch"]:
        print(f"  sizes.json says {m['sizes_json']} for {m['shard']}, found {m['found']}")
    for u in r["not_in_sizes_json"]:
        print(f"  NOT IN sizes.json: {u} (an earlier run's leftover? a folder spec reads it as training data)")
    if r["classes"]:
        print(f"{'classes':>14}: {len(r['classes'])}, samples per class min {min(r['classes'].values())} max "
              f"{max(r['classes'].values())}")
    for name in ("caption_words", "caption_chars", "width", "height", "shorter_side"):
        if r[name]:
            print(f"{name:>14}: " + "  ".join(f"{k} {v:g}" for k, v in r[name].items()))
    if a.plot:
        print(f"histograms: {a.plot}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=1)
    return 1 if a.strict and (r["bad"] or r["shard_errors"] or r["not_in_sizes_json"]) else 0


if __name__ == "__main__":
    sys.exit(main())
