"""The demo's interleaved documents (LCL, issue 19): the handwritten digits of ``data_tools.make_demo``, several per
document, each next to a sentence about it.

    python -m data_tools.make_demo_docs demo_data --seed 0

Writes, deterministically from the seed, beside what ``make_demo`` writes into the same folder:

    demo_data/
      docs/docs-{00000..0000N}.tar     training documents (``make_interleaved_shards``'s format): 2 to 5 training
                                       digits each (the first copy of a digit as scanned, later copies augmented), an
                                       opening sentence, and one sentence per digit naming it as a word or a numeral
                                       ("next comes a handwritten seven."); each image matched to its sentence with a
                                       similarity in [0.25, 0.45) (above MMC4's 0.24: the loader keeps them all), its
                                       side (before / after the sentence) left to the loader's coin
      docs_val/docs-{00000..0000N}.tar held-out documents from the retrieval digits (never in a training document or
                                       pair), for a held-out loss
      docs.json                        the shard specs, counts, seed

The splits are ``make_demo.split_indices`` of the same seed, so training documents use the training pairs' digits.
Each image entry also carries the digit's class (``label``) and scikit-learn index (``digit``); the loader ignores
them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from data_tools.common import ShardSink, encode_image, progress
from data_tools.make_demo import _MTIME, CLASSNAMES, augment, digit_image, split_indices

OPENINGS = (
    "here are some handwritten digits.",
    "a page of numbers written by hand.",
    "someone filled in a form with digits.",
    "these digits were scanned from paper.",
)
# {w}: the digit's word, {n}: its numeral
SENTENCES = (
    "next comes a handwritten {w}.",
    "this one is the digit {n}.",
    "then the number {w}.",
    "here someone wrote a {n}.",
    "the following digit is {w}.",
    "a {w}, written quickly.",
    "after that, the numeral {n}.",
    "this is a {w}.",
)


def _documents(indices: np.ndarray, copies: int, rng: np.random.Generator, lo: int, hi: int) -> list[list[tuple]]:
    """Each of ``indices`` ``copies`` times, shuffled, cut into documents of ``lo``..``hi`` (digit, copy) pairs."""
    order = [(int(i), c) for c in range(copies) for i in indices]
    rng.shuffle(order)
    docs, k = [], 0
    while k < len(order):
        n = int(rng.integers(lo, hi + 1))
        docs.append(order[k:k + n])
        k += n
    if len(docs) > 1 and len(docs[-1]) < lo:  # no one-digit tail document
        docs[-2] += docs.pop()
    return docs


def _write(root: str, docs: list[list[tuple]], images, labels, size: int, rng: np.random.Generator,
           samples_per_shard: int, show_progress: bool, what: str) -> tuple[str, int]:
    with ShardSink(root, samples_per_shard, prefix="docs", mtime=_MTIME) as sink:
        for d, doc in enumerate(progress(docs, desc=what, unit="doc", disable=not show_progress)):
            texts = [OPENINGS[rng.integers(len(OPENINGS))]]
            entries, sample = [], {"__key__": f"doc{d:05d}"}
            for k, (i, c) in enumerate(doc):
                y = int(labels[i])
                texts.append(SENTENCES[rng.integers(len(SENTENCES))].format(w=CLASSNAMES[y], n=y))
                base = digit_image(images[i], size)
                img = base if c == 0 else augment(base, rng)
                entries.append({"file": f"{k}.png", "sentence": len(texts) - 1,
                                "similarity": round(float(rng.uniform(0.25, 0.45)), 4), "label": y, "digit": i})
                sample[f"{k}.png"] = encode_image(img, "png")
            sample["json"] = {"texts": texts, "images": entries}
            sink.write(sample)
    return sink.shard_spec, sum(sink.sizes.values())


def make_demo_docs(out: str, seed: int = 0, docs_per_digit: int = 3, size: int = 32, samples_per_shard: int = 500,
                   digits_per_doc: tuple[int, int] = (2, 5), show_progress: bool = False) -> dict:
    """Write ``out/docs`` and ``out/docs_val``; returns (and writes as ``out/docs.json``) their description.
    ``docs_per_digit``: how many training documents show each training digit (a different copy in each)."""
    from sklearn.datasets import load_digits

    lo, hi = digits_per_doc
    if docs_per_digit < 1 or not 1 <= lo <= hi:
        raise ValueError(f"docs_per_digit >= 1 and 1 <= digits_per_doc[0] <= [1] needed, got {docs_per_digit}, "
                         f"{digits_per_doc}")
    t0 = time.time()
    digits = load_digits()
    images, labels = digits.images, digits.target.astype(int)
    idx = split_indices(len(labels), seed, 0.2, 0.1)  # make_demo's splits (its default fractions)
    rng = np.random.default_rng([seed, 19])
    train_spec, n_train = _write(os.path.join(out, "docs"), _documents(idx["train"], docs_per_digit, rng, lo, hi),
                                 images, labels, size, rng, samples_per_shard, show_progress, "demo docs")
    val_spec, n_val = _write(os.path.join(out, "docs_val"), _documents(idx["retrieval"], 1, rng, lo, hi),
                             images, labels, size, rng, samples_per_shard, show_progress, "demo docs_val")
    info = {"seed": seed, "image_size": size, "docs_per_digit": docs_per_digit, "digits_per_doc": [lo, hi],
            "docs": train_spec, "docs_num_samples": n_train, "docs_val": val_spec, "docs_val_num_samples": n_val,
            "seconds": round(time.time() - t0, 2)}
    with open(os.path.join(out, "docs.json"), "w") as f:
        json.dump(info, f, indent=1)
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_tools.make_demo_docs", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("output", nargs="?", default="demo_data", help="output folder (default: demo_data)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--docs-per-digit", type=int, default=3, help="training documents showing each training digit")
    ap.add_argument("--size", type=int, default=32, help="image side in pixels")
    ap.add_argument("--samples-per-shard", type=int, default=500)
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    a = ap.parse_args(argv)
    if a.docs_per_digit < 1 or a.size < 8 or a.samples_per_shard < 1:
        ap.error("--docs-per-digit >= 1, --size >= 8 and --samples-per-shard >= 1 are required")
    info = make_demo_docs(a.output, a.seed, a.docs_per_digit, a.size, a.samples_per_shard,
                          show_progress=not a.quiet)
    print(f"demo documents in {a.output} ({info['seconds']}s): {info['docs_num_samples']} training ({info['docs']}), "
          f"{info['docs_val_num_samples']} held-out ({info['docs_val']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
