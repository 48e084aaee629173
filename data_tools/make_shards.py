"""Image-text pairs -> webdataset tar shards (``{key}.jpg`` + ``{key}.txt`` + ``{key}.json``) plus ``sizes.json``.

Input is a folder of images with sidecar ``.txt`` captions (``cat.jpg`` + ``cat.txt``), or a CSV / TSV / JSONL /
parquet table with a local image path column and a caption column (relative paths are taken from the table's folder).

    python -m data_tools.make_shards pairs.parquet out/ --samples-per-shard 10000 --max-shorter-side 512 --workers 8

Image-only shards (masked image modeling, ImageNet-21K style): ``--images-only`` on a folder writes ``{key}.jpg`` +
``{key}.json`` and, when the folder is ImageNet-style (class sub-folders: the rule of ``evaclip.evals.data``, sorted
names = class ids), ``{key}.cls`` (the class id) plus ``classnames.txt`` (folder names, one per line, in id order);
captions are not read. Such shards with classes are also a labelled set for the k-NN monitor.

    python -m data_tools.make_shards /data/in21k/train in21k/ --images-only --max-shorter-side 256 --shuffle-seed 0

Class folders are walked class by class, so without ``--shuffle-seed`` each shard holds one or two classes and a
training batch (shards shuffled, then a sample buffer) sees few of them; ``--shuffle-seed`` writes the inputs in a
seeded random order instead.

Unreadable images, empty captions and exact duplicate images (same bytes) are skipped, never written, and reported
in the summary (``summary.json`` in the output folder, which also lists every file the run wrote).

The output folder must be empty (or new): shards left there by an earlier run would be read with the new ones by a
folder spec. ``--overwrite`` first removes what an earlier make_shards wrote there (the files its ``summary.json`` /
``sizes.json`` list) and nothing else.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import multiprocessing as mp
import os
import random
import sys
import time
from typing import Iterator, Optional

from PIL import Image

from data_tools.common import (
    ShardSink,
    clean_caption,
    encode_image,
    progress,
    report_end,
    resize_shorter,
    tally_line,
    to_rgb,
)

TOOL_FILES = ("sizes.json", "summary.json", "classnames.txt")  # what make_shards writes beside the shards

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
IMAGE_COLS = ("image", "image_path", "path", "filepath", "file", "filename", "img")
CAPTION_COLS = ("caption", "text", "txt", "title", "label")


# ----------------------------------------------------------------------------------------------------------------------
# inputs: each yields (source_path, raw_caption or None)
# ----------------------------------------------------------------------------------------------------------------------
def iter_folder(root: str) -> Iterator[tuple[str, Optional[str]]]:
    """Images under ``root`` (recursive, sorted) with the caption from the ``.txt`` next to each (None if absent)."""
    for d, dirs, files in os.walk(root):
        dirs.sort()
        for f in sorted(files):
            if f.lower().endswith(IMAGE_EXTS):
                p = os.path.join(d, f)
                txt = os.path.splitext(p)[0] + ".txt"
                cap = None
                if os.path.isfile(txt):
                    with open(txt, encoding="utf-8", errors="replace") as fh:
                        cap = fh.read()
                yield p, cap


def iter_image_folder(root: str, classes: str = "auto") -> tuple[list[tuple[str, Optional[int]]], Optional[list]]:
    """Images under ``root`` for image-only shards: ``([(path, class id or None)], class names or None)``.

    ``classes``: ``"folders"`` reads ``root`` as an ImageNet-style folder (refused with what was found otherwise),
    ``"none"`` takes every image under it unlabelled (recursive, sorted), ``"auto"`` the first when it qualifies."""
    from evaclip.evals.data import imagenet_folder

    if classes not in ("auto", "folders", "none"):
        raise ValueError(f"classes must be auto, folders or none, got {classes!r}")
    if classes != "none":
        try:
            names, files = imagenet_folder(root)
            return [(p, cid) for p, cid in files], list(names)
        except ValueError:
            if classes == "folders":
                raise
    return [(p, None) for p, _ in iter_folder(root)], None


def _pick(cols: list[str], wanted: Optional[str], defaults: tuple, what: str, path: str) -> str:
    if wanted:
        if wanted not in cols:
            raise SystemExit(f"error: {path} has no column '{wanted}' (columns: {cols})")
        return wanted
    for c in defaults:
        if c in cols:
            return c
    raise SystemExit(f"error: cannot find the {what} column of {path} among {cols}; pass --{what}-col")


def read_table(path: str, image_col: Optional[str] = None, caption_col: Optional[str] = None
               ) -> list[tuple[str, Optional[str]]]:
    """Rows of a .csv/.tsv/.jsonl/.parquet file as (absolute image path, caption)."""
    ext = os.path.splitext(path)[1].lower()
    if ext in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if ext == ".tsv" else ","))
        cols = list(rows[0].keys()) if rows else []
    elif ext in (".jsonl", ".json"):
        rows = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except ValueError as e:
                        raise SystemExit(f"error: {path}:{n} is not valid JSON ({e})") from None
        cols = sorted({k for r in rows for k in r})
    elif ext == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        cols = table.column_names
        rows = table.to_pylist()
    else:
        raise SystemExit(f"error: unsupported input {path}: expected a folder, .csv, .tsv, .jsonl or .parquet")
    if not rows:
        raise SystemExit(f"error: {path} has no rows")
    ic = _pick(cols, image_col, IMAGE_COLS, "image", path)
    cc = _pick(cols, caption_col, CAPTION_COLS, "caption", path)
    base = os.path.dirname(os.path.abspath(path))
    out = []
    for r in rows:
        p = r.get(ic)
        p = "" if p is None else str(p)
        cap = r.get(cc)
        out.append((p if os.path.isabs(p) else os.path.join(base, p), None if cap is None else str(cap)))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# per-item work (runs in the worker processes)
# ----------------------------------------------------------------------------------------------------------------------
def process_item(item: tuple, max_side: Optional[int], fmt: str, quality: int, images_only: bool = False) -> dict:
    """Read, validate, resize and encode one pair ``(path, caption)``, or with ``images_only`` one ``(path, class id or
    None)``. Returns ``{"ok": True, ...}`` or ``{"ok": False, "reason": ...}``."""
    path, raw_caption = item
    label = raw_caption if images_only else None
    caption = "" if images_only else (clean_caption(raw_caption) if raw_caption else "")
    if not caption and not images_only:
        return {"ok": False, "path": path, "reason": "empty caption"}
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return {"ok": False, "path": path, "reason": f"unreadable file: {e.strerror or e}"}
    digest = hashlib.sha1(data).hexdigest()
    try:
        img = Image.open(io.BytesIO(data))
        src_format, (w0, h0) = img.format, img.size
        img.load()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... on bad bytes
        msg = str(e).split(" <_io.")[0]  # drop the BytesIO repr PIL appends
        return {"ok": False, "path": path, "reason": f"unreadable image: {type(e).__name__}: {msg}"}
    out = resize_shorter(img, max_side)
    if out is img and src_format == "JPEG" and img.mode == "RGB" and fmt == "jpg":
        encoded = data  # already a small-enough RGB JPEG: keep the bytes, no generation loss
    else:
        encoded = encode_image(to_rgb(out) if fmt == "jpg" else out, fmt, quality)
    meta = {"source": path, "sha1": digest, "width": out.size[0], "height": out.size[1],
            "original_width": w0, "original_height": h0}
    return {"ok": True, "image": encoded, "caption": caption, "label": label, "meta": meta, "sha1": digest}


def _work(args):
    return process_item(*args)


# ----------------------------------------------------------------------------------------------------------------------
# the output folder
# ----------------------------------------------------------------------------------------------------------------------
def earlier_output(out_dir: str) -> list[str]:
    """The files an earlier make_shards run wrote into ``out_dir`` (from its ``summary.json``, else ``sizes.json``)."""
    names: set[str] = set()
    for index in ("summary.json", "sizes.json"):
        try:
            with open(os.path.join(out_dir, index)) as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        names |= set(data.get("files", [])) if index == "summary.json" else set(data)
    names |= {n for n in TOOL_FILES if names and os.path.exists(os.path.join(out_dir, n))}
    return sorted(n for n in names if os.path.isfile(os.path.join(out_dir, n)) and os.path.basename(n) == n)


def prepare_output(out_dir: str, overwrite: bool) -> list[str]:
    """Refuse a non-empty ``out_dir`` (ValueError naming what is there), or with ``overwrite`` remove what an earlier
    make_shards run wrote there and nothing else; returns the names removed."""
    present = sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []
    if not present:
        return []
    ours = earlier_output(out_dir)
    if not overwrite:
        shown = ", ".join(present[:4]) + (f" and {len(present) - 4} more" if len(present) > 4 else "")
        what = f"an earlier make_shards run's {len(ours)} files" if ours else "files make_shards did not write"
        raise ValueError(f"output folder {out_dir} is not empty ({shown}: {what}); choose an empty folder, or pass "
                         "--overwrite to remove what an earlier make_shards run wrote there")
    for name in ours:
        os.remove(os.path.join(out_dir, name))
    foreign = [n for n in present if n not in ours]
    if any(n.endswith(".tar") for n in foreign):
        raise ValueError(f"output folder {out_dir} holds .tar files no make_shards index lists ("
                         f"{', '.join(n for n in foreign if n.endswith('.tar'))[:200]}); a folder spec would read them "
                         "with the new shards: move them or choose an empty folder")
    return ours


# ----------------------------------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------------------------------
def make_shards(items: list[tuple[str, Optional[str]]], out_dir: str, samples_per_shard: int = 10000,
                max_side: Optional[int] = None, fmt: str = "jpg", quality: int = 95, dedup: bool = True,
                workers: int = 1, prefix: str = "", show_progress: bool = True, max_report: int = 20,
                images_only: bool = False, classnames: Optional[list] = None) -> dict:
    """Write ``items`` [(image path, caption)] as shards into ``out_dir``; returns the summary dict (also saved).

    ``images_only``: items are [(image path, class id or None)] (``iter_image_folder``); samples get no ``txt``, a
    ``cls`` when labelled, and ``classnames`` (if given) is written to ``out_dir/classnames.txt``."""
    t0 = time.time()
    skipped: dict[str, int] = {}
    examples: list[dict] = []
    seen: set[str] = set()
    sink = ShardSink(out_dir, samples_per_shard, prefix=prefix)
    tasks = ((it, max_side, fmt, quality, images_only) for it in items)
    pool = mp.get_context("spawn" if sys.platform == "darwin" else "fork").Pool(workers) if workers > 1 else None
    results = pool.imap(_work, tasks, chunksize=16) if pool else map(_work, tasks)
    written = 0
    ext = "jpg" if fmt == "jpg" else "png"
    try:
        for r in progress(results, total=len(items), desc="make_shards", unit="img", disable=not show_progress):
            if r["ok"] and dedup and r["sha1"] in seen:
                r = {"ok": False, "path": r["meta"]["source"], "reason": "duplicate image"}
            if not r["ok"]:
                kind = r["reason"].split(":")[0]
                skipped[kind] = skipped.get(kind, 0) + 1
                if len(examples) < max_report:
                    examples.append({"path": r["path"], "reason": r["reason"]})
                continue
            seen.add(r["sha1"])
            sample = {"__key__": f"{written:09d}", ext: r["image"], "json": r["meta"]}
            if not images_only:
                sample["txt"] = r["caption"]
            elif r["label"] is not None:
                sample["cls"] = str(r["label"])
                if classnames:
                    r["meta"]["class"] = classnames[r["label"]]
            sink.write(sample)
            written += 1
    finally:
        if pool:
            pool.terminate()
        sizes = sink.close()
    if images_only and classnames:
        with open(os.path.join(out_dir, "classnames.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(classnames) + "\n")
    files = sorted(sizes) + ["sizes.json", "summary.json"] + (["classnames.txt"] if images_only and classnames else [])
    summary = {"inputs": len(items), "written": written, "skipped": skipped, "skipped_total": sum(skipped.values()),
               "skipped_examples": examples, "shards": len(sizes), "spec": sink.shard_spec, "files": files,
               "seconds": round(time.time() - t0, 2)}
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default after its help."""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m data_tools.make_shards", description=__doc__,
                                 formatter_class=HelpFormatter)
    ap.add_argument("input", help="folder of images with sidecar .txt captions, or a .csv/.tsv/.jsonl/.parquet table")
    ap.add_argument("output", help="output folder for the shards, sizes.json and summary.json (empty or new)")
    ap.add_argument("--overwrite", action="store_true",
                    help="the output folder holds an earlier make_shards run: remove the files it wrote first")
    ap.add_argument("--samples-per-shard", type=int, default=10000, help="samples in each tar shard")
    ap.add_argument("--max-shorter-side", "--max-side", dest="max_shorter_side", type=int, default=None,
                    help="downscale so the SHORTER side is at most this many pixels, never upscale (None: keep the "
                         "size; --max-side is the old name of this option)")
    ap.add_argument("--format", choices=("jpg", "png"), default="jpg", help="image encoding in the shards")
    ap.add_argument("--quality", type=int, default=95, help="JPEG quality when re-encoding")
    ap.add_argument("--no-dedup", action="store_true", help="keep exact duplicate images")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                    help="processes reading and encoding images (default: the CPU count - 1)")
    ap.add_argument("--prefix", default="", help="shard name prefix: PREFIX-00000.tar (empty: 00000.tar)")
    ap.add_argument("--image-col", default=None, help=f"table column of image paths (None: first of {IMAGE_COLS})")
    ap.add_argument("--caption-col", default=None, help=f"table column of captions (None: first of {CAPTION_COLS})")
    ap.add_argument("--images-only", action="store_true",
                    help="image-only shards from a folder (no captions; class sub-folders give cls + classnames.txt)")
    ap.add_argument("--classes", choices=("auto", "folders", "none"), default="auto",
                    help="with --images-only: read class sub-folders (folders), never (none), or when the folder "
                         "is ImageNet-style (auto)")
    ap.add_argument("--shuffle-seed", type=int, default=None,
                    help="write the inputs in a random order from this seed (None: input order)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    if a.samples_per_shard < 1:
        ap.error("--samples-per-shard must be >= 1")
    if a.max_shorter_side is not None and a.max_shorter_side < 1:
        ap.error("--max-shorter-side must be >= 1")
    if not os.path.exists(a.input):
        ap.error(f"input not found: {a.input}")
    classnames = None
    if a.images_only:
        if not os.path.isdir(a.input):
            ap.error("--images-only reads a folder of images (class sub-folders allowed)")
        try:
            items, classnames = iter_image_folder(a.input, a.classes)
        except ValueError as e:
            ap.error(str(e))
    else:
        items = list(iter_folder(a.input)) if os.path.isdir(a.input) else read_table(a.input, a.image_col,
                                                                                     a.caption_col)
    if not items:
        ap.error(f"no images found in {a.input}")
    if not a.images_only and os.path.isdir(a.input) and all(cap is None for _, cap in items):
        ap.error(f"{a.input} holds {len(items)} images and no captions (no .txt next to any image): for image-only "
                 "shards (masked image modeling, k-NN) pass --images-only")
    try:
        removed = prepare_output(a.output, a.overwrite)
    except ValueError as e:
        ap.error(str(e))
    if removed:
        print(f"--overwrite: removed {len(removed)} files an earlier make_shards run wrote in {a.output}")
    if a.shuffle_seed is not None:
        random.Random(a.shuffle_seed).shuffle(items)
    s = make_shards(items, a.output, a.samples_per_shard, a.max_shorter_side, a.format, a.quality, not a.no_dedup,
                    a.workers, a.prefix, show_progress=not a.quiet, images_only=a.images_only,
                    classnames=classnames)
    if classnames:
        print(f"{len(classnames)} classes from the sub-folders of {a.input} (classnames.txt)")
    print(f"wrote {s['written']} of {s['inputs']} samples in {s['shards']} shard(s) ({s['spec']}) in {s['seconds']}s")
    if s["skipped_total"]:
        print(tally_line("skipped", s["skipped"]))
    code = report_end(s)
    if s["skipped"].get("empty caption") and os.path.isdir(a.input):
        print("  (empty caption: an image without a non-empty .txt next to it; --images-only writes image-only shards)")
    return code


if __name__ == "__main__":
    sys.exit(main())
