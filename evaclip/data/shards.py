"""Webdataset pipeline: shard specs -> per-worker sample streams -> decoded, transformed, tokenized batches.

Shapes: B batch, C channels, H/W image height/width, L context length.

Why a hand-written stream instead of ``wds.WebDataset(...).shuffle().decode()...``: exact resume and DDP safety need
control over *which* batch each worker produces. Every worker owns a fixed, known set of global batch indices
(``i % W == w`` within a rank), so (a) the DataLoader's round-robin order equals the global batch order, (b) a restart
at step k makes each worker skip exactly its share of the first k batches (cheaply, before transforms), and (c) every
rank yields the same number of batches even when shards do not divide evenly (no DDP hang). Tar reading, ``pipe:``
URLs and the loader come from webdataset.
"""
from __future__ import annotations

import hashlib
import heapq
import io
import json
import logging
import math
import multiprocessing as mp
import os
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from braceexpand import braceexpand
from PIL import Image

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_SKIP_REASONS = ("corrupt_image", "missing_image", "missing_caption")


# ----------------------------------------------------------------------------------------------------------------------
# shard specs
# ----------------------------------------------------------------------------------------------------------------------
def is_local(url: str) -> bool:
    """True for plain file paths (not ``pipe:`` commands or ``scheme://`` URLs)."""
    return not url.startswith("pipe:") and "://" not in url


def expand_spec(spec: str) -> list[list[str]]:
    """``'a/{0..3}.tar::b/x.tar'`` -> one list of shard URLs per ``::``-separated source, braces expanded.

    A source that is a local directory stands for every ``*.tar`` in it (sorted). Globs (``*``, ``?``, ``[...]``)
    are refused with a message saying to use braces or the folder.
    """
    if not spec or not str(spec).strip():
        raise ValueError("empty shard spec: set data.train (e.g. 'data/{00000..00099}.tar')")
    sources = []
    for part in str(spec).split("::"):
        part = part.strip()
        if not part:
            raise ValueError(f"empty source in shard spec '{spec}' (check the '::' separators)")
        if is_local(part) and os.path.isdir(part):
            urls = sorted(os.path.join(part, f) for f in os.listdir(part) if f.endswith(".tar"))
            if not urls:
                raise FileNotFoundError(f"no .tar shards in directory {part}")
        else:
            urls = list(braceexpand(part))
            globbed = [u for u in urls if is_local(u) and any(c in u for c in "*?[") and not os.path.exists(u)]
            if globbed:
                raise ValueError(f"shard spec '{part}' uses a glob ({globbed[0]}), which is not expanded: list the "
                                 "shards with braces ('data/{00000..00099}.tar') or give the folder that holds them")
        sources.append(urls)
    return sources


def check_shards_exist(urls: Iterable[str], spec: str = "") -> None:
    """Raise FileNotFoundError naming every missing local shard, ValueError naming every empty (0-byte) one: a tar
    reader fails on it mid-epoch without naming it (remote URLs are checked when opened)."""
    urls = [u for u in urls if is_local(u)]
    where = f" (from spec '{spec}')" if spec else ""
    for bad, what, err in (([u for u in urls if not os.path.isfile(u)], "shard not found", FileNotFoundError),
                           ([u for u in urls if os.path.isfile(u) and os.path.getsize(u) == 0],
                            "empty shard (0 bytes: an interrupted copy or write? rebuild it, or leave it out)",
                            ValueError)):
        if bad:
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            raise err(f"{what}: {', '.join(bad[:5])}{more}{where}")


def shard_sizes(urls: Sequence[str]) -> Optional[list[int]]:
    """Samples per shard from the ``sizes.json`` next to each shard (written by make_shards); None if any is unknown."""
    cache: dict[str, dict] = {}
    out = []
    for u in urls:
        if not is_local(u):
            return None
        d, name = os.path.split(u)
        if d not in cache:
            p = os.path.join(d, "sizes.json")
            try:
                with open(p) as f:
                    cache[d] = json.load(f)
            except (OSError, ValueError):
                cache[d] = {}
        if name not in cache[d]:
            return None
        out.append(int(cache[d][name]))
    return out


def count_tar_samples(url: str) -> int:
    """Count the distinct sample keys in a local tar by reading member headers only (no payload decode)."""
    import tarfile

    keys = set()
    with tarfile.open(url) as tf:
        for m in tf:
            if m.isfile() and not os.path.basename(m.name).startswith("_"):
                keys.add(_split_key(m.name)[0])
    return len(keys)


def _split_key(name: str) -> tuple[str, str]:
    # webdataset convention: the key is everything before the first dot of the basename
    d, base = os.path.split(name)
    k, _, ext = base.partition(".")
    return os.path.join(d, k), ext


# ----------------------------------------------------------------------------------------------------------------------
# decoding
# ----------------------------------------------------------------------------------------------------------------------
def decode_image(data: bytes, min_side: Optional[int] = None) -> Image.Image:
    """Bytes -> RGB PIL image. For JPEGs, ``min_side`` enables DCT-domain reduced decoding (``Image.draft``): the
    image is decoded at 1/2, 1/4 or 1/8 scale when its shorter side stays >= ``min_side``, which is several times
    faster for sources much larger than the crop. Raises on corrupt or truncated data."""
    img = Image.open(io.BytesIO(data))
    if min_side and img.format == "JPEG":
        w, h = img.size
        s = min(w, h)
        if s >= 2 * min_side:
            # draft picks the largest reduction keeping the size >= the request; scale the request by the aspect
            img.draft("RGB", (max(1, w * min_side // s), max(1, h * min_side // s)))
    img.load()
    return img.convert("RGB") if img.mode != "RGB" else img


def crop_size(preprocess: Callable) -> Optional[int]:
    """The source side a torchvision transform pipeline needs (its last Resize / crop), used to bound JPEG drafting.

    A random resized crop whose area can be as small as ``scale[0]`` of the image needs ``size / sqrt(scale[0])``
    source pixels for its crop to keep full resolution (MIM crops down to 20 % of the area)."""
    size = None
    for t in getattr(preprocess, "transforms", [preprocess]):
        s = getattr(t, "size", None)
        if s is not None:
            size = s if isinstance(s, int) else (min(s) if len(s) else None)
            scale = getattr(t, "scale", None)
            if size is not None and scale is not None and 0 < min(scale) < 1:
                size = int(math.ceil(size / math.sqrt(min(scale))))
    return size


def _first_key(sample: dict, keys: Sequence[str]) -> Optional[str]:
    for k in keys:
        if k in sample:
            return k
    return None


class SkipCounter:
    """Skipped samples per epoch and reason, shared by all DataLoader workers (a process-shared array).

    One row per logical worker: ``[epoch, distinct skipped samples per reason]``. A worker writes how many *distinct*
    samples (shard, key) it has skipped in the epoch, so reading the same samples again -- a worker cycling its
    shards to fill its batch quota, the skip-ahead after a restart, a second pass over the loader -- never counts
    them twice. A row written for another epoch starts over.
    """

    def __init__(self, num_workers: int = 1, reasons: Sequence[str] = _SKIP_REASONS):
        self.num_workers = max(1, num_workers)
        self.reasons = tuple(reasons)
        self._width = 1 + len(self.reasons)
        self._arr = mp.Array("q", [-1 if j % self._width == 0 else 0 for j in range(self.num_workers * self._width)],
                             lock=True)

    def record(self, worker: int, epoch: int, reason: str, distinct: int) -> None:
        """Worker ``worker`` has skipped ``distinct`` different samples for ``reason`` so far in ``epoch``."""
        row = (worker % self.num_workers) * self._width
        with self._arr.get_lock():
            if self._arr[row] != epoch:
                self._arr[row] = epoch
                for j in range(1, self._width):
                    self._arr[row + j] = 0
            j = row + 1 + self.reasons.index(reason)
            self._arr[j] = max(self._arr[j], distinct)

    def by_reason(self, epoch: int) -> dict[str, int]:
        """Distinct skipped samples of ``epoch`` by reason, summed over the workers (zeros once rows moved on)."""
        vals = self._arr[:]
        out = dict.fromkeys(self.reasons, 0)
        for row in range(0, len(vals), self._width):
            if vals[row] == epoch:
                for r, v in zip(self.reasons, vals[row + 1:row + self._width]):
                    out[r] += int(v)
        return out


# ----------------------------------------------------------------------------------------------------------------------
# per-worker streams
# ----------------------------------------------------------------------------------------------------------------------
def _raw_samples(urls: Iterable[str]) -> Iterator[dict]:
    from webdataset.tariterators import tarfile_samples

    def handler(exn):
        # a shard that vanished or a broken remote stream mid-epoch: fail loudly, naming the URL (in exn.args)
        raise exn

    yield from tarfile_samples(({"url": u} for u in urls), handler=handler)


def _shuffle(it: Iterator, bufsize: int, rng: random.Random) -> Iterator:
    """Buffer shuffle: keep ``bufsize`` samples, emit a random one per new arrival (deterministic given ``rng``)."""
    if bufsize <= 1:
        yield from it
        return
    buf = []
    for x in it:
        if len(buf) < bufsize:
            buf.append(x)
            continue
        i = rng.randrange(len(buf))
        buf[i], x = x, buf[i]
        yield x
    rng.shuffle(buf)
    yield from buf


def _seed_int(*parts) -> int:
    return int.from_bytes(hashlib.blake2b("-".join(map(str, parts)).encode(), digest_size=8).digest(), "little") >> 1


def _batch_share(num_batches: int, num_workers: int, worker: int, start: int = 0) -> range:
    """Global batch indices in [start, num_batches) that logical worker ``worker`` produces (i % W == worker)."""
    first = start + (worker - start) % num_workers
    return range(first, num_batches, num_workers)


@dataclass
class _StreamSpec:
    """Everything a worker needs to build its stream; pickled into each DataLoader worker."""

    sources: list  # list[list[url]]
    sizes: Optional[list]  # samples per shard of the flattened shard list, or None
    weights: Optional[list]
    resampled: bool
    batch_size: int
    num_batches: int  # per rank
    rank: int
    world_size: int
    num_workers: int  # logical workers per rank (>= 1)
    seed: int
    epoch: int = 0
    start_step: int = 0
    shuffle_buffer: int = 0
    image_keys: tuple = IMAGE_EXTS
    text_key: str = "txt"
    outputs: tuple = ("image", "text")  # what each batch holds, in order
    deterministic_aug: bool = True
    flat: list = field(default_factory=list)

    def __post_init__(self):
        self.flat = [u for s in self.sources for u in s]


def assign_shards(spec: _StreamSpec) -> list[list[str]]:
    """Exact mode: the epoch's shard order (seeded shuffle), split over ``world_size * num_workers`` slots.

    With known sizes, shards go greedily to the least-loaded slot so the per-worker sample counts stay balanced;
    slot ``rank * num_workers + w`` belongs to worker ``w`` of ``rank``."""
    n_slots = spec.world_size * spec.num_workers
    order = list(range(len(spec.flat)))
    random.Random(_seed_int("shards", spec.seed, spec.epoch)).shuffle(order)
    slots: list[list[str]] = [[] for _ in range(n_slots)]
    if spec.sizes is None:
        for j, i in enumerate(order):
            slots[j % n_slots].append(spec.flat[i])
    else:
        heap = [(0, k) for k in range(n_slots)]  # (samples so far, slot): O(shards * log slots) at 1e5 shards
        for i in order:
            load, k = heapq.heappop(heap)
            slots[k].append(spec.flat[i])
            heapq.heappush(heap, (load + spec.sizes[i], k))
    return slots


class ShardStream(torch.utils.data.IterableDataset):
    """Iterable of collated batches for one rank; each DataLoader worker produces its own share of batch indices."""

    def __init__(self, spec: _StreamSpec, preprocess: Optional[Callable], tokenizer: Optional[Callable],
                 counter: SkipCounter, draft_side: Optional[int] = None, mask_generator: Optional[Callable] = None):
        super().__init__()
        self.spec = spec
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.counter = counter
        self._skip_seen: dict[str, set] = {}
        self._skip_worker = 0
        self.draft_side = draft_side
        self.mask_generator = mask_generator  # a BlockMaskGenerator when the batches carry masks ("mask" output)

    # -- sample sources ------------------------------------------------------------------------------------------
    def _passes(self, logical: int, state: dict) -> Iterator[Iterator[str]]:
        """Shard URL sequences, one per pass. Exact mode: this worker's shards, again and again -- a worker whose
        shards run out before its batch quota cycles them, so every rank yields the same number of batches and DDP
        never waits on a rank that stopped early. Resampled mode: one endless pass of weighted draws."""
        spec = self.spec
        if spec.resampled:
            rng = random.Random(_seed_int("resample", spec.seed, spec.epoch, spec.rank, logical))
            weights = spec.weights or [len(s) for s in spec.sources]
            yield self._guard((spec.sources[rng.choices(range(len(spec.sources)), weights=weights)[0]]
                               for _ in iter(int, 1)), spec.flat, 4 * len(spec.flat) + 16, state,
                              spec.shuffle_buffer, rng)
        else:
            mine = assign_shards(spec)[spec.rank * spec.num_workers + logical]
            while True:
                yield self._guard(iter(mine), mine, 2 * len(mine), state, spec.shuffle_buffer)

    @staticmethod
    def _guard(urls, shards: list, limit: int, state: dict, buffer: int,
               rng: Optional[random.Random] = None) -> Iterator[str]:
        # stop an endless stream that keeps reading shards without finding a single valid sample
        for u in urls:
            # empty shards, or shards read well past the shuffle buffer's fill (webdataset reads one sample ahead)
            # without one decodable sample
            if state["shards_since_raw"] > limit or (
                    state["shards_since_valid"] > limit and state["raw_since_valid"] > 2 * buffer + 100):
                raise RuntimeError(f"no valid samples in {len(shards)} shard(s) after {limit} shard reads "
                                   f"(first: {shards[0]}); every sample was corrupt or lacked an image/caption")
            state["shards_since_raw"] += 1
            state["shards_since_valid"] += 1
            yield rng.choice(u) if rng is not None else u

    def _valid_samples(self, logical: int) -> Iterator[dict]:
        """Raw samples that have an image and (if wanted) a caption, shuffled (not decoded yet)."""
        spec = self.spec
        rng = random.Random(_seed_int("shuffle", spec.seed, spec.epoch, spec.rank, logical))
        state = self._state = {"shards_since_raw": 0, "shards_since_valid": 0, "raw_since_valid": 0}
        # shuffle within a pass so a cycling worker's first pass is exactly its shards' samples
        for urls in self._passes(logical, state):
            yield from _shuffle(self._filter(_raw_samples(urls), state), spec.shuffle_buffer, rng)

    def _filter(self, raw: Iterator[dict], state: dict) -> Iterator[dict]:
        # cheap checks before the shuffle buffer, so the buffer only holds usable samples
        spec = self.spec
        need_text = "text" in spec.outputs
        for s in raw:
            state["shards_since_raw"] = 0
            state["raw_since_valid"] += 1
            ik = _first_key(s, spec.image_keys)
            if ik is None:
                self._skip("missing_image", s)
                continue
            s["__image__"] = s[ik]
            if need_text:
                t = s.get(spec.text_key)
                t = t.decode("utf-8", errors="replace").strip() if isinstance(t, (bytes, bytearray)) else ""
                if not t:
                    self._skip("missing_caption", s)
                    continue
                s["__text__"] = t
            yield s

    def _skip(self, reason: str, sample: dict) -> None:
        # count a skipped sample once per epoch (by shard and key), however often this worker reads it
        seen = self._skip_seen.setdefault(reason, set())
        seen.add((sample.get("__url__"), sample.get("__key__")))
        self.counter.record(self._skip_worker, self.spec.epoch, reason, len(seen))

    def _decoded(self, samples: Iterator[dict], min_side: Optional[int]) -> Iterator[tuple[dict, Any]]:
        for s in samples:
            try:
                img = decode_image(s["__image__"], min_side)
            except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError...) on bad bytes
                self._skip("corrupt_image", s)
                log.debug("skipping %s from %s: %s", s.get("__key__"), s.get("__url__"), e)
                continue
            self._mark_valid()
            yield s, img

    def _mark_valid(self) -> None:
        # a usable sample came out of the stream: reset the no-valid-sample guard (see _guard)
        state = getattr(self, "_state", None)
        if state is not None:
            state["shards_since_valid"] = state["raw_since_valid"] = 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch and the batch index to start from (read by the workers when the loader starts)."""
        self.spec.epoch = epoch
        self.spec.start_step = start_step

    def worker_role(self) -> tuple[int, int, range]:
        """``(logical worker, its batches before start_step, the global batch indices it produces)`` for the
        DataLoader worker this runs in."""
        spec = self.spec
        info = torch.utils.data.get_worker_info()
        physical = info.id if info is not None else 0
        n_phys = info.num_workers if info is not None else 1
        if n_phys != spec.num_workers:
            raise RuntimeError(f"stream built for {spec.num_workers} workers runs in {n_phys}; use the DataInfo loader")
        # after a restart at step k the loader's worker 0 must produce batch k: rotate the logical roles
        logical = (physical + spec.start_step) % spec.num_workers
        done_before = len(range(logical, min(spec.start_step, spec.num_batches), spec.num_workers))
        return logical, done_before, _batch_share(spec.num_batches, spec.num_workers, logical, spec.start_step)

    def items(self, logical: int, done_before: int) -> Iterator:
        """This worker's decoded samples from its first batch after ``start_step`` on, endless (exact mode cycles)."""
        self._skip_seen, self._skip_worker = {}, logical  # this pass's skipped samples (see SkipCounter)
        valid = self._valid_samples(logical)
        # skip this worker's share of the batches before start_step: decode at the smallest JPEG draft scale only to
        # learn which samples are valid (so the stream lines up exactly); no transforms, no tokenization
        for _ in zip(range(done_before * self.spec.batch_size), self._decoded(valid, min_side=1)):
            pass
        yield from self._decoded(valid, min_side=self.draft_side)

    def __iter__(self) -> Iterator:
        logical, done_before, todo = self.worker_role()
        if len(todo) == 0:
            return
        decoded = self.items(logical, done_before)
        for bi in todo:
            batch = [x for _, x in zip(range(self.spec.batch_size), decoded)]
            yield self._collate(batch, bi)

    def _collate(self, batch: list[tuple[dict, Any]], batch_index: int):
        spec = self.spec
        out = []
        with _aug_seed(_seed_int("aug", spec.seed, spec.epoch, spec.rank, batch_index), spec.deterministic_aug):
            images = [self.preprocess(img) if self.preprocess is not None else img for _, img in batch]
        for o in spec.outputs:
            if o == "image":
                out.append(torch.stack(images) if self.preprocess is not None else images)
            elif o == "text":
                texts = [s["__text__"] for s, _ in batch]
                out.append(self.tokenizer(texts) if self.tokenizer is not None else texts)
            elif o == "mask":
                # MIM masks: a generator seeded like the augmentations, from (seed, epoch, rank, batch index) only
                rng = np.random.default_rng(_seed_int("mask", spec.seed, spec.epoch, spec.rank, batch_index))
                out.append(self.mask_generator.batch(len(batch), rng))
        return tuple(out)


class _aug_seed:
    """Seed torch's RNG per global batch so random augmentations are identical after a restart. In the main process
    (workers=0) the caller's RNG state is restored afterwards."""

    def __init__(self, seed: int, enabled: bool):
        self.seed, self.enabled = seed, enabled

    def __enter__(self):
        if not self.enabled:
            return
        self.main = torch.utils.data.get_worker_info() is None
        if self.main:
            self.state = (torch.get_rng_state(), random.getstate())
        torch.default_generator.manual_seed(self.seed)  # CPU generator only: leave any CUDA RNG alone
        random.seed(self.seed)

    def __exit__(self, *exc):
        if self.enabled and self.main:
            torch.set_rng_state(self.state[0])
            random.setstate(self.state[1])


# ----------------------------------------------------------------------------------------------------------------------
# builders
# ----------------------------------------------------------------------------------------------------------------------
class DataInfo:
    """A rank's train loader and its bookkeeping (see docs/ARCHITECTURE.md, Data)."""

    def __init__(self, stream: ShardStream, num_workers: int, pin_memory: bool):
        self.stream = stream
        self._num_workers = num_workers
        self._pin = pin_memory
        self._skip_history: dict[int, dict[str, int]] = {}  # finished epochs' skipped samples by reason
        self.loader = self._make_loader()

    def _make_loader(self):
        import webdataset as wds

        # batches are built inside the workers (batch_size=None); workers are re-created per epoch so the new
        # epoch / start step reach them with the pickled stream
        return wds.WebLoader(self.stream, batch_size=None, shuffle=False, num_workers=self._num_workers,
                             pin_memory=self._pin, persistent_workers=False)

    @property
    def num_batches(self) -> int:
        """Batches per epoch for this rank (the same on every rank)."""
        return self.stream.spec.num_batches

    @property
    def num_samples(self) -> int:
        """Samples per epoch over all ranks (num_batches * batch_size * world_size)."""
        spec = self.stream.spec
        return spec.num_batches * spec.batch_size * spec.world_size

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch (shard order, shuffles, augmentations) and the batch index to start from."""
        if not 0 <= start_step <= self.num_batches:
            raise ValueError(f"start_step {start_step} outside [0, {self.num_batches}] for this epoch")
        if epoch != self.stream.spec.epoch:  # file the epoch that ends (the counter's rows move on)
            self._skip_history[self.stream.spec.epoch] = self.skipped_by_reason()
        self.stream.set_epoch(epoch, start_step)

    def skipped(self, epoch: Optional[int] = None) -> int:
        """Distinct samples skipped in ``epoch`` (default: the current one), summed over all reasons and workers."""
        return sum(self.skipped_by_reason(epoch).values())

    def skipped_by_reason(self, epoch: Optional[int] = None) -> dict[str, int]:
        """``{"corrupt_image": n, "missing_image": n, "missing_caption": n}`` for ``epoch`` (default: the current one):
        distinct samples, each counted once however often the epoch re-reads it (see SkipCounter)."""
        epoch = self.stream.spec.epoch if epoch is None else epoch
        live = self.stream.counter.by_reason(epoch)
        filed = self._skip_history.get(epoch, {})
        return {r: max(n, filed.get(r, 0)) for r, n in live.items()}

    def skipped_per_epoch(self) -> dict[int, dict[str, int]]:
        """``{epoch: skipped_by_reason(epoch)}`` for every epoch this loader has run (or is running)."""
        epochs = sorted({*self._skip_history, self.stream.spec.epoch})
        return {e: self.skipped_by_reason(e) for e in epochs}

    def __len__(self) -> int:
        return self.num_batches - self.stream.spec.start_step


def _split_keys(keys: str) -> tuple:
    return tuple(k.strip().lstrip(".") for k in keys.split(";") if k.strip())


@dataclass
class ShardPlan:
    """One shard spec, checked and sized: its sources, samples per shard (None if unknown), source weights, and the
    samples of one epoch (``total``)."""

    spec: str
    sources: list
    sizes: Optional[list]
    weights: Optional[list]
    resampled: bool
    total: int

    @property
    def flat(self) -> list:
        return [u for s in self.sources for u in s]


def plan_shards(spec_str: str, weights: Optional[list], resampled: bool, num_samples: Optional[int],
                world_size: int, key: str = "data.train") -> ShardPlan:
    """Expand, check and size the shard spec ``spec_str`` (config key ``key``) for ``world_size`` ranks.

    Exact mode: an epoch is every sample (``num_samples`` caps it); resampled mode: ``num_samples``. Missing local
    shards, empty datasets and fewer shards than ranks raise, naming the key."""
    sources = expand_spec(spec_str)
    flat = [u for s in sources for u in s]
    check_shards_exist(flat, spec_str)
    if weights is not None:
        if len(weights) != len(sources):
            raise ValueError(f"{key}_weights has {len(weights)} entries but {key} has {len(sources)} "
                             f"'::'-separated sources")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"{key}_weights must be non-negative with a positive sum, got {weights}")
    sizes = shard_sizes(flat)
    if resampled:
        if not num_samples:
            raise ValueError(f"{key}_num_samples is required in resampled mode (it defines the epoch)")
        total = num_samples
    else:
        if sizes is None and all(is_local(u) for u in flat):
            sizes = [count_tar_samples(u) for u in flat]
        if sizes is not None:
            total = sum(sizes)
            if total == 0:
                raise ValueError(f"no samples in the {len(flat)} shard(s) of '{spec_str}'")
            if num_samples:
                total = min(total, num_samples)
        elif num_samples:
            total = num_samples
        else:
            raise ValueError(f"cannot count the samples of '{spec_str}' (remote shards without sizes.json): "
                             f"set {key}_num_samples")
        if len(flat) < world_size:
            raise ValueError(f"exact mode needs at least one shard per rank: {len(flat)} shard(s) for "
                             f"{world_size} ranks; use more shards or data.resampled=true")
    return ShardPlan(spec_str, sources, sizes, weights, resampled, total)


def batches_per_rank(plan: ShardPlan, batch_size: int, world_size: int, rank: int = 0) -> int:
    """Full global batches of ``batch_size`` rows per rank in one epoch of ``plan`` (raises when there is none)."""
    global_batch = batch_size * world_size
    num_batches = plan.total // global_batch
    if num_batches == 0:
        raise ValueError(f"{plan.total} samples are fewer than one global batch ({batch_size} x {world_size} ranks) "
                         f"from '{plan.spec}'")
    if plan.total % global_batch and rank == 0:
        log.info("epoch of %d samples rounded down to %d full global batches", plan.total, num_batches)
    return num_batches


def worker_count(workers: int, plan: ShardPlan, world_size: int, rank: int = 0) -> int:
    """DataLoader workers for ``plan``: ``workers``, fewer in exact mode so each one has a shard of its own."""
    workers = max(0, workers)
    per_rank = len(plan.flat) // world_size
    if not plan.resampled and workers > per_rank:
        # no idle worker: each one needs at least a shard of its own
        if rank == 0:
            log.warning("data.workers=%d but only %d shard(s) per rank: using %d worker(s)", workers, per_rank,
                        per_rank)
        workers = per_rank
    return workers


def build_train_loader(cfg, preprocess: Callable, tokenizer: Optional[Callable] = None, *, rank: int = 0,
                       world_size: int = 1, seed: int = 0, epoch: int = 0, start_step: int = 0,
                       pin_memory: Optional[bool] = None, mask_generator=None) -> DataInfo:
    """Train loader for one rank from ``cfg`` (a ``DataCfg``); yields ``(images_BCHW, tokens_BL)``.

    With ``mask_generator`` (a ``evaclip.data.masking.BlockMaskGenerator``; masked image modeling) it yields
    ``(images_BCHW, masks_BP)`` instead: captions are neither read nor required (image-only shards such as
    ImageNet-21K's, or image-text shards with the text ignored) and ``tokenizer`` is unused. Batch ``i``'s masks are
    drawn in the worker from a generator seeded by (seed, epoch, rank, i), like its augmentations.

    Exact mode (``cfg.resampled=False``): every shard once per epoch, shards shuffled per epoch from ``seed`` and
    split over ranks and workers; every rank yields ``total // (world_size * batch_size)`` batches. Resampled mode:
    shards drawn with replacement (sources mixed by ``cfg.train_weights``); an epoch is ``cfg.train_num_samples``.
    Missing local shards and empty datasets raise before any worker starts.
    """
    if cfg.synthetic:
        raise ValueError("data.synthetic is true: use evaclip.data.synthetic.synthetic_batches instead")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, {world_size})")
    plan = plan_shards(cfg.train, cfg.train_weights, cfg.resampled, cfg.train_num_samples, world_size)
    num_batches = batches_per_rank(plan, cfg.batch_size, world_size, rank)
    workers = worker_count(cfg.workers, plan, world_size, rank)
    spec = _StreamSpec(sources=plan.sources, sizes=plan.sizes, weights=plan.weights, resampled=cfg.resampled,
                       batch_size=cfg.batch_size, num_batches=num_batches, rank=rank, world_size=world_size,
                       num_workers=max(1, workers), seed=seed, shuffle_buffer=cfg.shuffle_buffer,
                       image_keys=_split_keys(cfg.image_key), text_key=cfg.text_key.strip().lstrip("."),
                       outputs=("image", "mask") if mask_generator is not None else ("image", "text"))
    stream = ShardStream(spec, preprocess, tokenizer, SkipCounter(spec.num_workers), draft_side=crop_size(preprocess),
                         mask_generator=mask_generator)
    info = DataInfo(stream, workers, torch.cuda.is_available() if pin_memory is None else pin_memory)
    info.set_epoch(epoch, start_step)
    return info
