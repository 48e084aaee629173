"""LCL's training data (issue 19): image-text pairs and interleaved image-text documents as token rows with image
slots, on the shard pipeline of ``evaclip.data.shards`` (same exact resume, per-rank shard split, equal batch counts
and skip counting).

Shapes: N images of a batch (every image of every row, N >= B), C/H/W image channels / height / width, B rows,
L context length.

A row is ``[sot] text ... [boi] [img] x n [eoi] text ... [eot] [pad] ...`` (ids: ``evaclip.models.lcl_tokens``),
``n`` = ``image_tokens`` latents per image. A row that opens with an image has no ``sot``: it starts with that
image's ``boi``, as LCL's rows do (its pair wrapper writes an image-first pair as ``[boi] ... caption [eot]``). The
model takes the hidden state at a ``boi`` as the text side of a contrastive pair unless the ``boi`` is at position 0;
with a ``sot`` before it, every image-first row would add a pair whose "text" is ``sot`` alone, the same vector for
all of them.

- A pair (``data.train``, the image-text shards as they are) becomes ``[sot] caption [boi][img]xn[eoi] [eot]`` or
  ``[boi][img]xn[eoi] caption [eot]``, each with probability ``img_first_prob`` = 0.5, drawn from a generator
  seeded by (run seed, epoch, rank, batch index, row): the sample's position in the data, so a resumed run draws the
  same. The caption is cut to leave room for the image.
- A document (``lcl_data.docs``) is a webdataset sample ``{key}.json`` + its images ``{key}.{i}.{jpg,png,...}``; the
  JSON is ``{"texts": [sentence, ...], "images": [{"file": "0.jpg", "sentence": j, "similarity": s}, ...]}``
  (``similarity`` null or absent: always kept; optional ``"where": "before" | "after"`` fixes the side instead of the
  coin). ``data_tools.make_interleaved_shards`` writes them from MMC4 / markdown documents. MMC4's rules as LCL's
  MMC4 loader applies them: images with similarity below ``sim_threshold`` (0.24) are dropped; of several images
  matched to one sentence one is kept at random; the first ``max_images`` (6) by sentence order are kept; each goes
  before or after its sentence at random; sentences are joined in order. The random draws are seeded by (run seed,
  epoch, shard, key). A row longer than L is cut so that no image block is split (a block that does not fit is
  dropped with everything after it) and it always ends with ``eot``. A document left with no image (all below the
  threshold, corrupt, missing or cut) is replaced by the next one of the stream.

Bad input is skipped and counted by reason (``DataInfo.skipped_by_reason``): pairs as in ``shards`` (corrupt_image,
missing_image, missing_caption); documents: ``doc_bad_json`` (unparsable or not the schema above), ``doc_no_text``
(no non-empty sentence), ``doc_bad_image_index`` (an image's sentence index past the end of the texts, or not an
integer), ``doc_missing_image`` / ``doc_corrupt_image`` (an image file absent from the sample / undecodable: that
image is dropped), ``doc_no_image`` (no image left: the document is replaced).

With both pairs and documents, each batch holds ``round(batch_size * docs_ratio)`` document rows after the pair rows;
the pairs define the epoch and the documents' stream cycles over its shards (a rank's document shards are read
again when its pair quota is not reached yet), as the pair stream does for a worker whose shards run out.
"""
from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NamedTuple, Optional, Sequence

import torch

from evaclip.errors import ConfigError
from evaclip.models.lcl_tokens import LCLTokens

from .shards import (
    DataInfo,
    ShardStream,
    SkipCounter,
    _aug_seed,
    _seed_int,
    _split_keys,
    _StreamSpec,
    batches_per_rank,
    crop_size,
    decode_image,
    plan_shards,
    worker_count,
)

log = logging.getLogger(__name__)

__all__ = ["LCLDataCfg", "DocBatch", "RowBuilder", "build_lcl_loader", "parse_document", "DOC_SKIP_REASONS"]

DOC_SKIP_REASONS = ("doc_bad_json", "doc_no_text", "doc_bad_image_index", "doc_missing_image", "doc_corrupt_image",
                    "doc_no_image")


@dataclass
class LCLDataCfg:
    """The LCL task's ``lcl_data`` section (the shared ``data`` section keeps batch_size, workers, shuffle_buffer,
    train (the pairs), resampled, ...)."""

    docs: Optional[str] = None  # interleaved document shards (make_interleaved_shards); null: pairs only
    docs_ratio: float = 0.5  # share of a batch's rows that are documents when data.train (pairs) is set too
    docs_num_samples: Optional[int] = None  # documents per epoch (caps exact mode; required resampled without pairs)
    context_length: int = 256  # tokens per row, image placeholders included
    max_images: int = 6  # images kept per document (MMC4 / LCL: 6)
    sim_threshold: float = 0.24  # an image matched to its sentence below this similarity is dropped (MMC4 / LCL)
    img_first_prob: float = 0.5  # an image goes before its sentence (a pair's image before its caption)
    one_image_per_sentence: bool = True  # of several images matched to one sentence keep one at random (LCL)

    def check(self, image_tokens: Optional[int] = None, has_pairs: bool = True) -> None:
        """ConfigError naming the ``lcl_data`` key that is out of range."""
        if not self.docs and not has_pairs:
            raise ConfigError("config key 'lcl_data.docs': LCL needs pairs (data.train), documents (lcl_data.docs) "
                              "or both; neither is set")
        if self.docs and has_pairs and not 0.0 < self.docs_ratio < 1.0:
            raise ConfigError(f"config key 'lcl_data.docs_ratio' must be in (0, 1) when both data.train and "
                              f"lcl_data.docs are set, got {self.docs_ratio}")
        if self.max_images < 1:
            raise ConfigError(f"config key 'lcl_data.max_images' must be >= 1, got {self.max_images}")
        if not 0.0 <= self.img_first_prob <= 1.0:
            raise ConfigError(f"config key 'lcl_data.img_first_prob' must be in [0, 1], got {self.img_first_prob}")
        if self.docs_num_samples is not None and self.docs_num_samples < 1:
            raise ConfigError(f"config key 'lcl_data.docs_num_samples' must be >= 1, got {self.docs_num_samples}")
        if image_tokens is not None and self.context_length < image_tokens + 5:
            raise ConfigError(f"config key 'lcl_data.context_length' ({self.context_length}) leaves no room for one "
                              f"image ({image_tokens} latents + boi/eoi) with sot, eot and a token of text: set it "
                              f">= {image_tokens + 5}")


class DocBatch(NamedTuple):
    """One collated LCL batch: every image of the batch in the order its ``<boi>`` appears reading row 0 left to
    right, then row 1, ...; and the token rows, padded with ``LCLTokens().pad``."""

    images_NCHW: torch.Tensor
    tokens_BL: torch.Tensor


# ----------------------------------------------------------------------------------------------------------------------
# token rows
# ----------------------------------------------------------------------------------------------------------------------
class RowBuilder:
    """Token rows of pairs and documents at ``context_length`` with ``image_tokens`` placeholders per image.

    ``tokenizer``: anything with ``encode(text) -> list[int]`` (open_clip's SimpleTokenizer: the BPE ids, no sot /
    eot). A text piece is a list of ids, an image piece is an int (the image's index, returned when it is kept)."""

    def __init__(self, tokenizer: Any, context_length: int, image_tokens: int, ids: LCLTokens = LCLTokens()):
        if image_tokens < 1:
            raise ValueError(f"image_tokens must be >= 1, got {image_tokens}")
        if context_length < image_tokens + 5:
            raise ValueError(f"context_length {context_length} leaves no room for one image of {image_tokens} "
                             f"latents with sot, boi, eoi, eot and a text token: use >= {image_tokens + 5}")
        self.tokenizer, self.L, self.n, self.ids = tokenizer, context_length, image_tokens, ids
        self.block = [ids.boi] + [ids.image] * image_tokens + [ids.eoi]

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def row(self, pieces: Sequence[Any]) -> tuple[list[int], list[int]]:
        """``[sot] pieces... [eot]`` cut to L (no sot when the first piece is an image: see the module docstring):
        text is cut anywhere, an image block that does not fit whole is dropped with everything after it; eot always
        ends the row. Returns ``(ids, the kept images' indices in block order)`` (not padded)."""
        out = [] if pieces and isinstance(pieces[0], int) else [self.ids.sot]
        budget, kept = self.L - 1 - len(out), []  # room for eot
        for p in pieces:
            if isinstance(p, int):
                if len(self.block) > budget:
                    break
                out += self.block
                budget -= len(self.block)
                kept.append(p)
            else:
                take = p[:budget]
                out += take
                budget -= len(take)
                if len(take) < len(p):
                    break
        out.append(self.ids.eot)
        return out, kept

    def pair(self, caption: str, image_first: bool) -> list[int]:
        """A pair's row: the caption cut to leave room for its image, the image before or after it."""
        text = self.encode(caption)[: self.L - len(self.block) - 2]
        return self.row([0, text] if image_first else [text, 0])[0]

    def pad(self, rows: Sequence[list[int]]) -> torch.Tensor:
        out = torch.full((len(rows), self.L), self.ids.pad, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        return out


# ----------------------------------------------------------------------------------------------------------------------
# documents
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class DocImage:
    file: str  # the sample member holding it ("0.jpg" for {key}.0.jpg)
    sentence: int
    similarity: Optional[float]
    where: Optional[str]  # "before" | "after" | None (a coin)


def parse_document(raw: Any) -> tuple[Optional[tuple[list[str], list[DocImage]]], Optional[str]]:
    """A document's JSON (bytes / str / dict) -> ``((texts, images), None)``, or ``(None, reason)`` with reason one of
    ``doc_bad_json``, ``doc_no_text``, ``doc_bad_image_index``."""
    try:
        d = json.loads(raw) if isinstance(raw, (bytes, bytearray, str)) else raw
    except ValueError:
        return None, "doc_bad_json"
    if not isinstance(d, dict) or not isinstance(d.get("texts"), list) or not isinstance(d.get("images", []), list):
        return None, "doc_bad_json"
    texts = d["texts"]
    if not all(isinstance(t, str) or t is None for t in texts):
        return None, "doc_bad_json"
    texts = [t or "" for t in texts]
    if not any(t.strip() for t in texts):
        return None, "doc_no_text"
    images = []
    for im in d.get("images", []):
        if not isinstance(im, dict) or not isinstance(im.get("file"), str):
            return None, "doc_bad_json"
        j, sim, where = im.get("sentence"), im.get("similarity"), im.get("where")
        if not isinstance(j, int) or isinstance(j, bool) or not 0 <= j < len(texts):
            return None, "doc_bad_image_index"
        if sim is not None and (not isinstance(sim, (int, float)) or isinstance(sim, bool) or math.isnan(sim)):
            return None, "doc_bad_json"
        if where not in (None, "before", "after"):
            return None, "doc_bad_json"
        images.append(DocImage(im["file"], j, None if sim is None else float(sim), where))
    return (texts, images), None


def select_images(images: Sequence[DocImage], rng: random.Random, sim_threshold: float, max_images: int,
                  one_per_sentence: bool) -> list[DocImage]:
    """MMC4's rules as LCL applies them: similarity >= threshold, sorted by sentence, one image per sentence (a random
    one of those matched to it), the first ``max_images``."""
    keep = sorted((im for im in images if im.similarity is None or im.similarity >= sim_threshold),
                  key=lambda im: im.sentence)  # stable: a sentence's images stay in document order
    if one_per_sentence:
        by_sentence: dict[int, list[DocImage]] = {}
        for im in keep:
            by_sentence.setdefault(im.sentence, []).append(im)
        keep = [ims[rng.randrange(len(ims))] for _, ims in sorted(by_sentence.items())]
    return keep[:max_images]


def document_pieces(texts: Sequence[list[int]], images: Sequence[DocImage], rng: random.Random,
                    img_first_prob: float) -> list[Any]:
    """The sentences (token ids) in order with each image (its index in ``images``) before or after its sentence
    (``where``, else a coin drawn in image order)."""
    before: dict[int, list[int]] = {}
    after: dict[int, list[int]] = {}
    for k, im in enumerate(images):
        first = im.where == "before" if im.where else rng.random() < img_first_prob
        (before if first else after).setdefault(im.sentence, []).append(k)
    pieces: list[Any] = []
    for j, ids in enumerate(texts):
        pieces += before.get(j, [])
        if ids:
            pieces.append(ids)
        pieces += after.get(j, [])
    return pieces


class DocStream(ShardStream):
    """The shard stream of interleaved documents; a sample comes out as ``(token row, [PIL images of its blocks])``."""

    def __init__(self, spec: _StreamSpec, builder: RowBuilder, lcl: LCLDataCfg, counter: SkipCounter,
                 draft_side: Optional[int] = None):
        super().__init__(spec, None, None, counter, draft_side=draft_side)
        self.builder, self.lcl = builder, lcl

    def _filter(self, raw: Iterator[dict], state: dict) -> Iterator[dict]:
        # parse before the shuffle buffer, so the buffer holds only well-formed documents
        for s in raw:
            state["shards_since_raw"] = 0
            state["raw_since_valid"] += 1
            if "json" not in s:
                self._skip("doc_bad_json", s)
                continue
            doc, reason = parse_document(s["json"])
            if doc is None:
                self._skip(reason, s)
                continue
            s["__doc__"] = doc
            yield s

    def _decoded(self, samples: Iterator[dict], min_side: Optional[int]) -> Iterator[tuple[list[int], list]]:
        for s in samples:
            out = self._document(s, min_side)
            if out is not None:
                self._mark_valid()
                yield out

    def _document(self, s: dict, min_side: Optional[int]) -> Optional[tuple[list[int], list]]:
        spec, lcl = self.spec, self.lcl
        texts, images = s["__doc__"]
        rng = random.Random(_seed_int("doc", spec.seed, spec.epoch, s.get("__url__"), s.get("__key__")))
        chosen = select_images(images, rng, lcl.sim_threshold, lcl.max_images, lcl.one_image_per_sentence)
        # tokenize the sentences up to the one where the text alone fills the row: nothing after it can be kept
        # (an MMC4 document can be much longer than a row), so its images are neither decoded nor placed
        ids, total = [], 0
        for t in texts:
            if total >= self.builder.L:
                break
            ids.append(self.builder.encode(t) if t.strip() else [])
            total += len(ids[-1])
        decoded = []
        for im in (im for im in chosen if im.sentence < len(ids)):
            data = s.get(im.file.lower())
            if data is None:
                self._skip("doc_missing_image", s)
                continue
            try:
                decoded.append((im, decode_image(data, min_side)))
            except Exception as e:  # PIL raises many types on bad bytes
                self._skip("doc_corrupt_image", s)
                log.debug("dropping image %s of %s from %s: %s", im.file, s.get("__key__"), s.get("__url__"), e)
        pieces = document_pieces(ids, [im for im, _ in decoded], rng, lcl.img_first_prob)
        row, kept = self.builder.row(pieces)
        if not kept:
            self._skip("doc_no_image", s)
            return None
        return row, [decoded[k][1] for k in kept]


# ----------------------------------------------------------------------------------------------------------------------
# pairs + documents -> DocBatch
# ----------------------------------------------------------------------------------------------------------------------
class _Counters:
    """Several streams' SkipCounters read as one (their reasons are disjoint or summed)."""

    def __init__(self, counters: Sequence[SkipCounter]):
        self.counters = list(counters)

    def by_reason(self, epoch: int) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.counters:
            for r, n in c.by_reason(epoch).items():
                out[r] = out.get(r, 0) + n
        return out


class LCLStream(torch.utils.data.IterableDataset):
    """Iterable of ``DocBatch`` for one rank: batch ``i`` takes the next pair rows of the pair stream and the next
    document rows of the document stream in the DataLoader worker that owns ``i`` (both streams split their batch
    indices over the same workers, so resume and worker order are the shard pipeline's)."""

    def __init__(self, pairs: Optional[ShardStream], docs: Optional[DocStream], builder: RowBuilder,
                 preprocess: Callable, img_first_prob: float):
        super().__init__()
        self.pairs, self.docs, self.builder = pairs, docs, builder
        self.preprocess, self.img_first_prob = preprocess, img_first_prob
        self.counter = _Counters([s.counter for s in (pairs, docs) if s is not None])

    @property
    def spec(self) -> _StreamSpec:
        """The stream that defines the epoch (the pairs when given)."""
        return (self.pairs or self.docs).spec

    @property
    def rows(self) -> int:
        return sum(s.spec.batch_size for s in (self.pairs, self.docs) if s is not None)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        for s in (self.pairs, self.docs):
            if s is not None:
                s.set_epoch(epoch, start_step)

    def __iter__(self) -> Iterator[DocBatch]:
        logical, done_before, todo = (self.pairs or self.docs).worker_role()
        if len(todo) == 0:
            return
        pairs = self.pairs.items(logical, done_before) if self.pairs is not None else None
        docs = self.docs.items(logical, done_before) if self.docs is not None else None
        for bi in todo:
            p = [x for _, x in zip(range(self.pairs.spec.batch_size), pairs)] if pairs is not None else []
            d = [x for _, x in zip(range(self.docs.spec.batch_size), docs)] if docs is not None else []
            yield self._collate(p, d, bi)

    def _collate(self, pairs: list, docs: list, batch_index: int) -> DocBatch:
        spec = self.spec
        rows, images = [], []
        for r, (s, img) in enumerate(pairs):
            # the coin of the pair's order: seeded by its position in the data (seed, epoch, rank, batch, row)
            coin = random.Random(_seed_int("order", spec.seed, spec.epoch, spec.rank, batch_index, r))
            rows.append(self.builder.pair(s["__text__"], coin.random() < self.img_first_prob))
            images.append(img)
        for row, imgs in docs:
            rows.append(row)
            images += imgs
        with _aug_seed(_seed_int("aug", spec.seed, spec.epoch, spec.rank, batch_index), spec.deterministic_aug):
            tensors = [self.preprocess(im) for im in images]
        return DocBatch(torch.stack(tensors), self.builder.pad(rows))


class LCLData(DataInfo):
    """A rank's LCL loader (``DataInfo``: num_batches, set_epoch, skipped, skipped_by_reason)."""

    @property
    def num_samples(self) -> int:
        """Rows per epoch over all ranks (pairs + documents)."""
        spec = self.stream.spec
        return spec.num_batches * self.stream.rows * spec.world_size


def _spec(plan, batch_size: int, num_batches: int, rank: int, world_size: int, workers: int, seed: int,
          shuffle_buffer: int, image_keys: tuple = (), text_key: str = "txt") -> _StreamSpec:
    kw = {"image_keys": image_keys} if image_keys else {}
    return _StreamSpec(sources=plan.sources, sizes=plan.sizes, weights=plan.weights, resampled=plan.resampled,
                       batch_size=batch_size, num_batches=num_batches, rank=rank, world_size=world_size,
                       num_workers=max(1, workers), seed=seed, shuffle_buffer=shuffle_buffer, text_key=text_key, **kw)


def build_lcl_loader(data_cfg, lcl_data: LCLDataCfg, preprocess: Callable, tokenizer: Any, image_tokens: int,
                     rank: int = 0, world_size: int = 1, seed: int = 0, *, epoch: int = 0, start_step: int = 0,
                     pin_memory: Optional[bool] = None) -> LCLData:
    """LCL train loader for one rank: ``DocBatch(images_NCHW, tokens_BL)`` batches of ``data_cfg.batch_size`` rows.

    ``data_cfg`` (a ``DataCfg``): ``train`` (image-text pair shards, or null), batch_size, workers, shuffle_buffer,
    resampled, train_num_samples, train_weights, image_key, text_key. ``lcl_data``: the documents and the row rules
    (``LCLDataCfg``). ``tokenizer``: has ``encode(text) -> ids`` (open_clip's SimpleTokenizer). ``image_tokens``: the
    placeholders per image (``evaclip.models.token_drop.num_kept`` of the image tower's patches).

    The epoch: the pairs' (every pair once in exact mode) when given, else the documents'; every rank yields the same
    number of batches. Missing shards and bad settings raise before any worker starts.
    """
    if data_cfg.synthetic:
        raise ValueError("data.synthetic is true: the LCL loader reads shards (data.train and/or lcl_data.docs)")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, {world_size})")
    has_pairs = bool(data_cfg.train)
    lcl_data.check(image_tokens, has_pairs)
    B = data_cfg.batch_size
    b_docs = 0 if not lcl_data.docs else (B if not has_pairs else min(B - 1, max(1, round(B * lcl_data.docs_ratio))))
    if has_pairs and lcl_data.docs and B < 2:
        raise ValueError(f"data.batch_size {B} cannot hold both a pair row and a document row: use >= 2")
    builder = RowBuilder(tokenizer, lcl_data.context_length, image_tokens)
    pair_plan = doc_plan = None
    if has_pairs:
        pair_plan = plan_shards(data_cfg.train, data_cfg.train_weights, data_cfg.resampled,
                                data_cfg.train_num_samples, world_size)
        num_batches = batches_per_rank(pair_plan, B - b_docs, world_size, rank)
    if lcl_data.docs:
        doc_plan = plan_shards(lcl_data.docs, None, data_cfg.resampled,
                               lcl_data.docs_num_samples or (pair_plan.total if pair_plan else None), world_size,
                               key="lcl_data.docs")
        if not has_pairs:
            num_batches = batches_per_rank(doc_plan, b_docs, world_size, rank)
    workers = min(worker_count(data_cfg.workers, p, world_size, rank) for p in (pair_plan, doc_plan) if p)
    common = dict(num_batches=num_batches, rank=rank, world_size=world_size, workers=workers, seed=seed,
                  shuffle_buffer=data_cfg.shuffle_buffer)
    draft = crop_size(preprocess)
    pairs = docs = None
    if pair_plan is not None:
        spec = _spec(pair_plan, B - b_docs, image_keys=_split_keys(data_cfg.image_key),
                     text_key=data_cfg.text_key.strip().lstrip("."), **common)
        pairs = ShardStream(spec, None, None, SkipCounter(spec.num_workers), draft_side=draft)
    if doc_plan is not None:
        spec = _spec(doc_plan, b_docs, **common)
        docs = DocStream(spec, builder, lcl_data, SkipCounter(spec.num_workers, DOC_SKIP_REASONS), draft_side=draft)
    stream = LCLStream(pairs, docs, builder, preprocess, lcl_data.img_first_prob)
    info = LCLData(stream, workers, torch.cuda.is_available() if pin_memory is None else pin_memory)
    info.set_epoch(epoch, start_step)
    return info
