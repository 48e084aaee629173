"""Helpers shared by the data tools: a tar shard writer that records ``sizes.json``; image encoding; captions."""
from __future__ import annotations

import io
import json
import os
import re
import sys
from typing import Optional

from PIL import Image

_WS = re.compile(r"\s+")


def clean_caption(text: str) -> str:
    """Fix mojibake and HTML entities (ftfy), collapse whitespace, strip. Empty result means: no caption."""
    import ftfy

    return _WS.sub(" ", ftfy.fix_text(text)).strip()


def resize_shorter(img: Image.Image, max_side: Optional[int]) -> Image.Image:
    """Downscale so the shorter side is at most ``max_side`` (never upscale); ``None`` keeps the size."""
    if not max_side:
        return img
    w, h = img.size
    s = min(w, h)
    if s <= max_side:
        return img
    r = max_side / s
    return img.resize((max(1, round(w * r)), max(1, round(h * r))), Image.Resampling.BICUBIC)


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with transparent pixels composited on white (not black, which is what a plain convert gives)."""
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        bg = Image.new("RGB", img.size, (255, 255, 255))
        bg.paste(img, mask=img.getchannel("A"))
        return bg
    return img.convert("RGB") if img.mode != "RGB" else img


def encode_image(img: Image.Image, fmt: str = "jpg", quality: int = 95) -> bytes:
    """Encode a PIL image as ``jpg`` or ``png`` bytes."""
    buf = io.BytesIO()
    if fmt in ("jpg", "jpeg"):
        to_rgb(img).save(buf, format="JPEG", quality=quality)
    elif fmt == "png":
        img.save(buf, format="PNG", optimize=False)
    else:
        raise ValueError(f"unsupported image format '{fmt}' (jpg or png)")
    return buf.getvalue()


class ShardSink:
    """Write samples into ``{prefix}-{NNNNN}.tar`` shards of ``samples_per_shard`` each; ``close()`` writes
    ``sizes.json`` (shard name -> samples, the file the pipeline reads to size an epoch)."""

    def __init__(self, out_dir: str, samples_per_shard: int, prefix: str = "", name_fmt: Optional[str] = None,
                 mtime: Optional[float] = None):
        import webdataset as wds

        if samples_per_shard < 1:
            raise ValueError(f"samples per shard must be >= 1, got {samples_per_shard}")
        self._wds = wds
        self.out_dir = out_dir
        self.per = samples_per_shard
        self.name_fmt = name_fmt or (f"{prefix}-{{:05d}}.tar" if prefix else "{:05d}.tar")
        self.sizes: dict[str, int] = {}
        self._writer = None
        self._n = 0
        self._mtime = mtime  # fixed mtime -> byte-identical shards on every run
        os.makedirs(out_dir, exist_ok=True)

    def write(self, sample: dict) -> None:
        """``sample``: ``{"__key__": str, "jpg": bytes, "txt": str, "json": dict, ...}``."""
        if self._writer is None or self._n == self.per:
            self._roll()
        self._writer.write(sample)
        self._n += 1
        self.sizes[self._name] = self._n

    def _roll(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._name = self.name_fmt.format(len(self.sizes))
        self._writer = self._wds.TarWriter(os.path.join(self.out_dir, self._name), mtime=self._mtime)
        self._n = 0

    def close(self) -> dict[str, int]:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        with open(os.path.join(self.out_dir, "sizes.json"), "w") as f:
            json.dump(self.sizes, f, indent=1)
        return self.sizes

    @property
    def shard_spec(self) -> str:
        """A brace spec for the shards written so far, e.g. ``out/train-{00000..00007}.tar``."""
        n = len(self.sizes)
        if n == 0:
            return ""
        first, last = self.name_fmt.format(0), self.name_fmt.format(n - 1)
        if n == 1:
            return os.path.join(self.out_dir, first)
        i = os.path.commonprefix([first, last])
        a, b = first[len(i):].split(".")[0], last[len(i):].split(".")[0]
        suffix = first[len(i) + len(a):]
        return os.path.join(self.out_dir, f"{i}{{{a}..{b}}}{suffix}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def tally_line(what: str, counts: dict) -> str:
    """One line for a tool's summary: ``WHAT N: reason: n, ...`` of a ``{reason: count}`` tally, reasons sorted."""
    return f"{what} {sum(counts.values())}: " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))


def report_end(summary: dict) -> int:
    """The end of a shard tool's report: the skipped examples it kept, then its exit code (1, with one line on stderr,
    when nothing was written)."""
    for e in summary["skipped_examples"]:
        print(f"  {e['path']}: {e['reason']}")
    if summary["written"] == 0:
        print("error: nothing written", file=sys.stderr)
        return 1
    return 0


def progress(iterable=None, **kw):
    """tqdm progress bar (to stderr; quiet when not a terminal unless forced by the caller)."""
    from tqdm import tqdm

    kw.setdefault("dynamic_ncols", True)
    kw.setdefault("mininterval", 0.5)
    return tqdm(iterable, **kw)
