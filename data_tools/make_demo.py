"""The built-in demo dataset: real handwritten digits (scikit-learn's bundled copy of UCI optdigits, no download).

    python -m data_tools.make_demo demo_data --seed 0

Writes, deterministically from the seed:

    demo_data/
      train/train-{00000..0000N}.tar   image-caption pairs: each training digit several times (small random shifts,
                                       rotations, scales), each copy with a caption from varied templates that name
                                       the digit as a word or a numeral ("handwritten digit 7", "the number seven")
      zeroshot/                        held-out zero-shot classification set, clip_benchmark webdataset layout:
        test/{0..K}.tar, test/nshards.txt   one {key}.png + {key}.cls (class index) per sample
        classnames.txt                 "zero" .. "nine"
        zeroshot_classification_templates.txt   held-out templates (none is a training template), using {c}
      retrieval/                       held-out image-text pairs ({key}.png + {key}.txt + {key}.cls), clip_benchmark
        test/{0..K}.tar, test/nshards.txt, dataset_type.txt ("retrieval")   layout
      knn_train/knn-{00000..0000N}.tar labelled image-only shards ({key}.png + {key}.cls) of the training digits as
        classnames.txt, sizes.json     scanned (no augmentation): the k-NN memory bank of the MIM monitor, whose
                                       queries are the held-out zero-shot digits (same class ids)
      demo.json                        the shard specs, counts, seed and templates

Retrieval captions name only the digit ("someone wrote the number seven."), so each caption is word-for-word the
caption of many other images: standard (instance) recall cannot tell them apart and i2t R@1 is about 0 whatever the
model. The samples therefore also carry their class id (``cls``), and ``evaclip eval --retrieval`` reports
class-aware recall (``class_i2t_R@k`` / ``class_t2i_R@k``: a hit is any caption / image of the query's digit) beside
the instance figures, saying which is which.

The three splits are disjoint by scikit-learn sample index. Images are the 8x8 digits upscaled to 32x32 RGB PNG.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
from PIL import Image

from data_tools.common import ShardSink, encode_image, progress

CLASSNAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# {w}: the digit's word, {n}: its numeral. Both forms appear so the text tower ties "7" and "seven" to the same image.
TRAIN_TEMPLATES = (
    "a photo of the number {w}",
    "handwritten digit {n}",
    "a handwritten {w}",
    "the digit {n}",
    "the number {w}, written by hand",
    "an image of the number {n}",
    "a scan of a handwritten digit {w}",
    "{w}",
    "{n}",
    "digit: {w}",
    "a low resolution photo of the digit {n}",
    "the handwritten numeral {w}",
)
# held out: never used for training captions; the class word only (as clip_benchmark fills {c} with the class name)
ZEROSHOT_TEMPLATES = (
    "a picture of the digit {c}.",
    "a sketch of the number {c}.",
    "the numeral {c}, drawn by someone.",
    "a small grey image of the digit {c}.",
    "this is the number {c}.",
)
RETRIEVAL_TEMPLATES = ("a picture of the digit {c}.", "someone wrote the number {c}.", "the numeral {c} on paper.")
_MTIME = 1_700_000_000.0  # fixed tar timestamps: the same seed gives byte-identical shards


def digit_image(pixels_8x8: np.ndarray, size: int) -> Image.Image:
    """sklearn digit (8x8, values 0..16, ink high) -> ``size`` x ``size`` RGB, dark ink on white paper."""
    grey = (255 - np.clip(pixels_8x8, 0, 16) * (255 / 16)).astype(np.uint8)
    return Image.fromarray(grey, mode="L").resize((size, size), Image.Resampling.BICUBIC).convert("RGB")


def augment(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A small random rotation (+-12 deg), scale (0.9..1.1) and shift (+-2 px at 32 px), filled with paper white."""
    size = img.size[0]
    angle = float(rng.uniform(-12, 12))
    scale = float(rng.uniform(0.9, 1.1))
    shift = rng.uniform(-2, 2, size=2) * size / 32
    out = img.rotate(angle, resample=Image.Resampling.BILINEAR, translate=(float(shift[0]), float(shift[1])),
                     fillcolor=(255, 255, 255))
    if abs(scale - 1) > 1e-3:
        s = max(1, round(size * scale))
        z = out.resize((s, s), Image.Resampling.BILINEAR)
        canvas = Image.new("RGB", (size, size), (255, 255, 255))
        off = (size - s) // 2
        if s > size:
            z = z.crop((-off, -off, -off + size, -off + size))
            off = 0
        canvas.paste(z, (off, off))
        out = canvas
    return out


def split_indices(n: int, seed: int, zeroshot_frac: float, retrieval_frac: float) -> dict[str, np.ndarray]:
    """Disjoint train / zeroshot / retrieval index sets, stratified by a seeded permutation."""
    perm = np.random.default_rng(seed).permutation(n)
    n_zs, n_rt = int(round(n * zeroshot_frac)), int(round(n * retrieval_frac))
    return {"zeroshot": np.sort(perm[:n_zs]), "retrieval": np.sort(perm[n_zs:n_zs + n_rt]),
            "train": np.sort(perm[n_zs + n_rt:])}


def _write_benchmark_split(root: str, samples, per_shard: int) -> tuple[str, int]:
    sink = ShardSink(os.path.join(root, "test"), per_shard, name_fmt="{}.tar", mtime=_MTIME)
    for s in samples:
        sink.write(s)
    sizes = sink.close()
    with open(os.path.join(root, "test", "nshards.txt"), "w") as f:
        f.write(f"{len(sizes)}\n")
    return os.path.join(root, "test", "{0..%d}.tar" % (len(sizes) - 1)), sum(sizes.values())


def make_demo(out: str, seed: int = 0, copies: int = 6, size: int = 32, samples_per_shard: int = 1000,
              zeroshot_frac: float = 0.2, retrieval_frac: float = 0.1, show_progress: bool = True) -> dict:
    """Build the demo dataset into ``out``; returns (and writes as ``demo.json``) its description."""
    from sklearn.datasets import load_digits

    if copies < 1:
        raise ValueError(f"copies must be >= 1, got {copies}")
    t0 = time.time()
    digits = load_digits()
    images, labels = digits.images, digits.target.astype(int)
    idx = split_indices(len(labels), seed, zeroshot_frac, retrieval_frac)
    rng = np.random.default_rng(seed + 1)
    os.makedirs(out, exist_ok=True)

    # training pairs: copy 0 is the digit as scanned, the others are augmented
    train = ShardSink(os.path.join(out, "train"), samples_per_shard, prefix="train", mtime=_MTIME)
    order = [(i, c) for i in idx["train"] for c in range(copies)]
    rng.shuffle(order)  # mix classes and copies across shards
    for i, c in progress(order, desc="demo train", unit="img", disable=not show_progress):
        base = digit_image(images[i], size)
        img = base if c == 0 else augment(base, rng)
        y = labels[i]
        caption = TRAIN_TEMPLATES[rng.integers(len(TRAIN_TEMPLATES))].format(w=CLASSNAMES[y], n=y)
        train.write({"__key__": f"d{i:04d}_{c:02d}", "png": encode_image(img, "png"), "txt": caption,
                     "json": {"sklearn_index": int(i), "label": int(y), "copy": c}})
    train_sizes = train.close()

    zs_root = os.path.join(out, "zeroshot")
    zs_spec, n_zs = _write_benchmark_split(zs_root, (
        {"__key__": f"d{i:04d}", "png": encode_image(digit_image(images[i], size), "png"), "cls": str(labels[i])}
        for i in idx["zeroshot"]), samples_per_shard)
    with open(os.path.join(zs_root, "classnames.txt"), "w") as f:
        f.write("\n".join(CLASSNAMES) + "\n")
    with open(os.path.join(zs_root, "zeroshot_classification_templates.txt"), "w") as f:
        f.write("\n".join(ZEROSHOT_TEMPLATES) + "\n")
    with open(os.path.join(zs_root, "dataset_type.txt"), "w") as f:
        f.write("classification\n")

    rt_root = os.path.join(out, "retrieval")
    rt_spec, n_rt = _write_benchmark_split(rt_root, (
        {"__key__": f"d{i:04d}", "png": encode_image(digit_image(images[i], size), "png"),
         "txt": RETRIEVAL_TEMPLATES[k % len(RETRIEVAL_TEMPLATES)].format(c=CLASSNAMES[labels[i]]),
         "cls": str(labels[i])}  # captions are shared across images: cls gives evaclip eval its class-aware recall
        for k, i in enumerate(idx["retrieval"])), samples_per_shard)
    with open(os.path.join(rt_root, "dataset_type.txt"), "w") as f:
        f.write("retrieval\n")

    # k-NN memory bank for the MIM monitor: the training digits as scanned, labelled, in make_shards --images-only form
    knn_root = os.path.join(out, "knn_train")
    with ShardSink(knn_root, samples_per_shard, prefix="knn", mtime=_MTIME) as knn:
        for i in idx["train"]:
            knn.write({"__key__": f"d{i:04d}", "png": encode_image(digit_image(images[i], size), "png"),
                       "cls": str(labels[i])})
    with open(os.path.join(knn_root, "classnames.txt"), "w") as f:
        f.write("\n".join(CLASSNAMES) + "\n")

    info = {
        "seed": seed, "image_size": size, "copies_per_train_digit": copies,
        "knn_train": knn_root, "knn_train_num_samples": sum(knn.sizes.values()), "knn_val": zs_root,
        "train": os.path.join(out, "train", "train-{00000..%05d}.tar" % (len(train_sizes) - 1)),
        "train_num_samples": sum(train_sizes.values()),
        "zeroshot": zs_root, "zeroshot_shards": zs_spec, "zeroshot_num_samples": n_zs,
        "retrieval": rt_root, "retrieval_shards": rt_spec, "retrieval_num_samples": n_rt,
        "sklearn_indices": {k: len(v) for k, v in idx.items()},
        "classnames": list(CLASSNAMES), "train_templates": list(TRAIN_TEMPLATES),
        "zeroshot_templates": list(ZEROSHOT_TEMPLATES), "seconds": round(time.time() - t0, 2),
    }
    with open(os.path.join(out, "demo.json"), "w") as f:
        json.dump(info, f, indent=1)
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_tools.make_demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("output", nargs="?", default="demo_data", help="output folder (default: demo_data)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--copies", type=int, default=6, help="training copies per digit (1 original + augmented)")
    ap.add_argument("--size", type=int, default=32, help="image side in pixels")
    ap.add_argument("--samples-per-shard", type=int, default=1000)
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    a = ap.parse_args(argv)
    if a.copies < 1 or a.size < 8 or a.samples_per_shard < 1:
        ap.error("--copies >= 1, --size >= 8 and --samples-per-shard >= 1 are required")
    info = make_demo(a.output, a.seed, a.copies, a.size, a.samples_per_shard, show_progress=not a.quiet)
    print(f"demo dataset in {a.output} ({info['seconds']}s): {info['train_num_samples']} training pairs "
          f"({info['train']}), {info['zeroshot_num_samples']} zero-shot ({info['zeroshot']}), "
          f"{info['retrieval_num_samples']} retrieval ({info['retrieval']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
