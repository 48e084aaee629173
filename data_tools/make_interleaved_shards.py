"""Interleaved image-text documents -> webdataset tar shards for LCL (``lcl_data.docs``) plus ``sizes.json``.

Each sample is ``{key}.json`` + ``{key}.{i}.jpg`` (its images): the JSON is ``{"texts": [sentence, ...], "images":
[{"file": "0.jpg", "sentence": j, "similarity": s, "where": ...}, ...], "source": ..., "url": ...}`` (the format
``evaclip.data.interleaved`` reads; the MMC4 rules -- similarity threshold, one image per sentence, at most 6 images,
random side -- are applied by the loader at training time, so they stay settings of the run).

Two inputs:

- MMC4 (``.jsonl`` or ``.jsonl.zip`` files, or a folder of them) with ``--images DIR``, the folder holding the
  downloaded images by their ``image_name``. A document is ``{"text_list": [...], "image_info": [{"image_name",
  "matched_text_index", "matched_sim", "raw_url"}, ...], "url": ...}`` (MMC4's fields; other fields are ignored).

      python -m data_tools.make_interleaved_shards docs_shard_{0..9}_v2.jsonl.zip out/ --images mmc4_images/

- A folder of markdown documents (``*.md``, recursive): paragraphs split into sentences, each image link
  ``![alt](path)`` (path relative to the document) placed where it stands: after the sentence before it, or before
  the first sentence when it opens the document (``where`` fixed, similarity null: always kept).

      python -m data_tools.make_interleaved_shards notes/ out/ --samples-per-shard 1000

Bad input is skipped and counted like ``make_shards``: an image that is missing or unreadable is dropped from its
document; a document that is not valid JSON, has no text, or is left without an image is not written; an image whose
sentence index is past the end of the texts is dropped. The counts and examples go to ``summary.json``.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import re
import sys
import time
import zipfile
from typing import Iterator, Optional

from data_tools.common import ShardSink, clean_caption, progress, report_end, tally_line
from data_tools.make_shards import HelpFormatter, prepare_output, process_item

_IMAGE_LINK = re.compile(r"!\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


# ----------------------------------------------------------------------------------------------------------------------
# inputs: each yields (source name, document dict or an error string)
# ----------------------------------------------------------------------------------------------------------------------
def _jsonl_lines(path: str) -> Iterator[tuple[str, str]]:
    if path.endswith(".zip"):
        with zipfile.ZipFile(path) as z:
            for name in sorted(n for n in z.namelist() if n.endswith(".jsonl")):
                with z.open(name) as f:
                    for n, line in enumerate(io.TextIOWrapper(f, encoding="utf-8", errors="replace"), 1):
                        yield f"{path}/{name}:{n}", line
    else:
        with open(path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                yield f"{path}:{n}", line


def iter_mmc4(paths: list[str], image_dir: str) -> Iterator[tuple[str, object]]:
    """MMC4 documents as ``(where, {"texts", "images": [(path, sentence, similarity, None)], "url"})`` or
    ``(where, "bad json")``; image paths are ``image_dir/image_name``."""
    for path in paths:
        for where, line in _jsonl_lines(path):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                texts = d["text_list"]
                infos = d.get("image_info") or []
                if not isinstance(texts, list) or not isinstance(infos, list):
                    raise TypeError("text_list / image_info are not lists")
                images = [(os.path.join(image_dir, str(i["image_name"])), i["matched_text_index"],
                           i.get("matched_sim"), None) for i in infos]
            except (ValueError, KeyError, TypeError) as e:
                yield where, f"bad json: {type(e).__name__}: {e}"
                continue
            yield where, {"texts": [t if isinstance(t, str) else "" for t in texts], "images": images,
                          "url": d.get("url")}


def markdown_document(text: str, base: str) -> dict:
    """A markdown text -> ``{"texts", "images": [(path, sentence, None, where)]}``: paragraphs split into sentences,
    each image link attached after the sentence before it (before the first sentence if none precedes it)."""
    texts: list[str] = []
    images: list[tuple] = []
    pending: list[str] = []  # images seen before any sentence
    for para in re.split(r"\n\s*\n", text):
        pos = 0
        for m in list(_IMAGE_LINK.finditer(para)) + [None]:
            chunk = para[pos:m.start() if m else len(para)]
            for s in _SENTENCE_END.split(" ".join(chunk.split())):
                s = s.lstrip("#>*- ").strip()
                if s:
                    texts.append(s)
            if m is None:
                break
            pos = m.end()
            path = m.group(1)
            path = path if os.path.isabs(path) else os.path.join(base, path)
            if texts:
                images.append((path, len(texts) - 1, None, "after"))
            else:
                pending.append(path)
    if texts:
        images = [(p, 0, None, "before") for p in pending] + images
    return {"texts": texts, "images": images}


def iter_markdown(root: str) -> Iterator[tuple[str, object]]:
    for d, dirs, files in os.walk(root):
        dirs.sort()
        for f in sorted(files):
            if f.lower().endswith((".md", ".markdown")):
                p = os.path.join(d, f)
                with open(p, encoding="utf-8", errors="replace") as fh:
                    yield p, markdown_document(fh.read(), d)


# ----------------------------------------------------------------------------------------------------------------------
# per-document work (runs in the worker processes)
# ----------------------------------------------------------------------------------------------------------------------
def process_document(item: tuple, max_side: Optional[int], fmt: str, quality: int) -> dict:
    """Clean the texts, read and encode the images of one document. Returns ``{"ok": True, "json": ..., "images":
    [bytes]}`` or ``{"ok": False, "reason": ...}``, with ``"dropped"``: ``[(path, reason)]`` for images left out."""
    where, doc = item
    if isinstance(doc, str):
        return {"ok": False, "path": where, "reason": doc, "dropped": []}
    texts = [clean_caption(t) for t in doc["texts"]]
    if not any(texts):
        return {"ok": False, "path": where, "reason": "no text", "dropped": []}
    entries, blobs, dropped = [], [], []
    ext = "jpg" if fmt == "jpg" else "png"
    for path, sentence, sim, side in doc["images"]:
        if not isinstance(sentence, int) or isinstance(sentence, bool) or not 0 <= sentence < len(texts):
            dropped.append((path, f"bad image index: sentence {sentence!r} of {len(texts)}"))
            continue
        if not os.path.isfile(path):
            dropped.append((path, "missing file"))
            continue
        r = process_item((path, None), max_side, fmt, quality, images_only=True)
        if not r["ok"]:
            dropped.append((path, r["reason"]))
            continue
        e = {"file": f"{len(blobs)}.{ext}", "sentence": sentence,
             "similarity": float(sim) if isinstance(sim, (int, float)) and not isinstance(sim, bool) else None,
             "source": path}
        if side:
            e["where"] = side
        entries.append(e)
        blobs.append(r["image"])
    if not blobs:
        return {"ok": False, "path": where, "reason": "no image", "dropped": dropped}
    meta = {"texts": texts, "images": entries, "source": where}
    if doc.get("url"):
        meta["url"] = doc["url"]
    return {"ok": True, "json": meta, "images": blobs, "ext": ext, "dropped": dropped}


def _work(args):
    return process_document(*args)


def make_interleaved_shards(docs, out_dir: str, samples_per_shard: int = 1000, max_side: Optional[int] = None,
                            fmt: str = "jpg", quality: int = 95, workers: int = 1, prefix: str = "",
                            show_progress: bool = True, max_report: int = 20) -> dict:
    """Write the documents ``docs`` (an iterable of ``(where, document or error)``, see ``iter_mmc4`` /
    ``iter_markdown``) as shards; returns (and writes as ``summary.json``) the counts."""
    t0 = time.time()
    skipped: dict[str, int] = {}
    images_dropped: dict[str, int] = {}
    examples: list[dict] = []
    sink = ShardSink(out_dir, samples_per_shard, prefix=prefix)
    tasks = ((d, max_side, fmt, quality) for d in docs)
    pool = mp.get_context("spawn" if sys.platform == "darwin" else "fork").Pool(workers) if workers > 1 else None
    results = pool.imap(_work, tasks, chunksize=4) if pool else map(_work, tasks)
    written = inputs = images = 0
    try:
        for r in progress(results, desc="make_interleaved_shards", unit="doc", disable=not show_progress):
            inputs += 1
            for path, reason in r["dropped"]:
                kind = reason.split(":")[0]
                images_dropped[kind] = images_dropped.get(kind, 0) + 1
                if len(examples) < max_report:
                    examples.append({"path": path, "reason": reason})
            if not r["ok"]:
                kind = r["reason"].split(":")[0]
                skipped[kind] = skipped.get(kind, 0) + 1
                if len(examples) < max_report:
                    examples.append({"path": r["path"], "reason": r["reason"]})
                continue
            sample = {"__key__": f"{written:09d}", "json": r["json"]}
            for e, blob in zip(r["json"]["images"], r["images"]):
                sample[e["file"]] = blob
            sink.write(sample)
            written += 1
            images += len(r["images"])
    finally:
        if pool:
            pool.terminate()
        sizes = sink.close()
    files = sorted(sizes) + ["sizes.json", "summary.json"]
    summary = {"inputs": inputs, "written": written, "images": images, "skipped": skipped,
               "skipped_total": sum(skipped.values()), "images_dropped": images_dropped,
               "images_dropped_total": sum(images_dropped.values()), "skipped_examples": examples,
               "shards": len(sizes), "spec": sink.shard_spec, "files": files, "seconds": round(time.time() - t0, 2)}
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def _mmc4_files(inputs: list[str]) -> list[str]:
    out = []
    for p in inputs:
        if os.path.isdir(p):
            out += sorted(os.path.join(p, f) for f in os.listdir(p) if f.endswith((".jsonl", ".jsonl.zip")))
        else:
            out.append(p)
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m data_tools.make_interleaved_shards", description=__doc__,
                                 formatter_class=HelpFormatter)
    ap.add_argument("inputs", nargs="+", help="MMC4 .jsonl / .jsonl.zip files or a folder of them (with --images), "
                                              "or one folder of markdown documents; the last argument is the output")
    ap.add_argument("--images", default=None, help="MMC4: the folder holding the images by their image_name")
    ap.add_argument("--overwrite", action="store_true",
                    help="the output folder holds an earlier run: remove the files it wrote first")
    ap.add_argument("--samples-per-shard", type=int, default=1000, help="documents in each tar shard")
    ap.add_argument("--max-shorter-side", type=int, default=None,
                    help="downscale so the SHORTER side is at most this many pixels, never upscale")
    ap.add_argument("--format", choices=("jpg", "png"), default="jpg", help="image encoding in the shards")
    ap.add_argument("--quality", type=int, default=95, help="JPEG quality when re-encoding")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                    help="processes reading and encoding images")
    ap.add_argument("--prefix", default="", help="shard name prefix: PREFIX-00000.tar (empty: 00000.tar)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    if len(a.inputs) < 2:
        ap.error("give the input(s) and the output folder")
    *inputs, out = a.inputs
    if a.samples_per_shard < 1:
        ap.error("--samples-per-shard must be >= 1")
    missing = [p for p in inputs if not os.path.exists(p)]
    if missing:
        ap.error(f"input not found: {', '.join(missing)}")
    if a.images is not None:
        if not os.path.isdir(a.images):
            ap.error(f"--images: not a folder: {a.images}")
        files = _mmc4_files(inputs)
        if not files:
            ap.error(f"no .jsonl / .jsonl.zip files in {', '.join(inputs)}")
        docs = iter_mmc4(files, a.images)
    elif len(inputs) == 1 and os.path.isdir(inputs[0]) and not _mmc4_files(inputs):
        docs = iter_markdown(inputs[0])
    else:
        ap.error("MMC4 input needs --images (the folder of its images); markdown input is one folder of .md files")
    try:
        removed = prepare_output(out, a.overwrite)
    except ValueError as e:
        ap.error(str(e))
    if removed:
        print(f"--overwrite: removed {len(removed)} files an earlier run wrote in {out}")
    s = make_interleaved_shards(docs, out, a.samples_per_shard, a.max_shorter_side, a.format, a.quality, a.workers,
                                a.prefix, show_progress=not a.quiet)
    print(f"wrote {s['written']} of {s['inputs']} documents ({s['images']} images) in {s['shards']} shard(s) "
          f"({s['spec']}) in {s['seconds']}s")
    for what, key in (("skipped documents", "skipped"), ("dropped images", "images_dropped")):
        if s[key]:
            print(tally_line(what, s[key]))
    return report_end(s)


if __name__ == "__main__":
    sys.exit(main())
