"""LCL's data (issue 19): pairs and interleaved documents as token rows with image blocks, on real webdataset shards.

Malformed documents and bad images are skipped and counted by reason; the loader resumes exactly mid-epoch; a pair's
order coin is tied to its position in the data; truncation never cuts an image block; a document left with no image
is replaced by the next one; MMC4's image rules as LCL's loader applies them.
"""
from __future__ import annotations

import hashlib
import io
import json
import random

import numpy as np
import pytest
import torch
import webdataset as wds
from open_clip.tokenizer import SimpleTokenizer
from PIL import Image
from torchvision import transforms as T

from evaclip.config import DataCfg
from evaclip.data.interleaved import (
    DocBatch,
    DocImage,
    LCLDataCfg,
    RowBuilder,
    build_lcl_loader,
    document_pieces,
    parse_document,
    select_images,
)
from evaclip.errors import ConfigError
from evaclip.models.lcl_tokens import LCLTokens

IDS = LCLTokens()
N_IMG = 4  # image placeholders per image in these tests
TOK = SimpleTokenizer()
PRE = T.Compose([T.Resize(8), T.CenterCrop(8), T.ToTensor()])


def _png(v: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), v % 256, np.uint8)).save(buf, format="png")
    return buf.getvalue()


def _doc(texts, images, **extra):
    return {"texts": texts, "images": [dict(file=f"{k}.png", sentence=j, similarity=s, **extra)
                                       for k, (j, s) in enumerate(images)]}


def _write_docs(path, docs):
    with wds.TarWriter(str(path)) as w:
        for key, d, blobs in docs:
            s = {"__key__": key, "json": d if isinstance(d, bytes) else json.dumps(d).encode()}
            s.update(blobs)
            w.write(s)


# the bad documents of the shards below, by the reason each is counted under
BAD_DOCS = {"doc_bad_json": 2, "doc_no_text": 1, "doc_bad_image_index": 1, "doc_missing_image": 1,
            "doc_corrupt_image": 2, "doc_no_image": 3}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Pair shards (2 x 12 pairs, 1 corrupt) and document shards (2 x 10 documents, the second with bad ones)."""
    d = tmp_path_factory.mktemp("lcl")
    for s in range(2):
        with wds.TarWriter(str(d / f"pairs-{s}.tar")) as w:
            for i in range(12):
                w.write({"__key__": f"p{s}_{i}", "png": b"broken" if (s, i) == (1, 3) else _png(10 * s + i),
                         "txt": f"pair number {s} {i}"})
    good = []
    for i in range(10):
        n = 1 + i % 3  # 1..3 images, sentence per image
        texts = [f"document {i} sentence {j} about thing{i}x{j}" for j in range(n + 1)]
        good.append((f"g{i}", _doc(texts, [(j, 0.3) for j in range(n)]),
                     {f"{k}.png": _png(100 + 3 * i + k) for k in range(n)}))
    _write_docs(d / "docs-0.tar", good)
    bad = [
        ("badjson", b"{not json", {"0.png": _png(1)}),
        ("notdict", b"[1, 2]", {"0.png": _png(1)}),
        ("notext", _doc(["", "  "], [(0, 0.5)]), {"0.png": _png(1)}),
        ("pastend", _doc(["only one sentence"], [(0, 0.5), (3, 0.5)]), {"0.png": _png(1), "1.png": _png(2)}),
        ("lowsim", _doc(["zebraword low similarity", "another"], [(0, 0.1), (1, 0.2)]),
         {"0.png": _png(1), "1.png": _png(2)}),
        ("allcorrupt", _doc(["giraffeword corrupt", "x"], [(0, 0.9)]), {"0.png": b"garbage"}),
        ("somecorrupt", _doc(["one", "two"], [(0, 0.9), (1, 0.9)]), {"0.png": b"garbage", "1.png": _png(7)}),
        ("missing", _doc(["penguinword missing file"], [(0, 0.9)]), {}),
    ]
    good2 = [(f"h{i}", _doc([f"second shard doc {i}", "tail"], [(1, 0.5)]), {"0.png": _png(200 + i)})
             for i in range(10)]
    _write_docs(d / "docs-1.tar", bad + good2)
    return {"pairs": str(d / "pairs-{0..1}.tar"), "docs": str(d / "docs-{0..1}.tar"), "dir": d}


def _loader(pairs, docs, batch=4, workers=0, start=0, epoch=0, seed=0, L=48, world=1, rank=0, **lcl):
    cfg = DataCfg(train=pairs, batch_size=batch, workers=workers, shuffle_buffer=4)
    return build_lcl_loader(cfg, LCLDataCfg(docs=docs, context_length=L, **lcl), PRE, TOK, image_tokens=N_IMG,
                            rank=rank, world_size=world, seed=seed, epoch=epoch, start_step=start, pin_memory=False)


def _rows(batch: DocBatch) -> list[list[int]]:
    return [[t for t in r if t != IDS.pad] for r in batch.tokens_BL.tolist()]


def _check_batch(batch: DocBatch, L: int = 48) -> None:
    """The contract: rows of L padded with pad, sot first (boi when the row opens with an image), eot last, whole
    image blocks, N images = N boi tokens."""
    assert isinstance(batch, DocBatch) and batch.tokens_BL.shape[1] == L
    n_boi = 0
    for r in _rows(batch):
        assert r[0] in (IDS.sot, IDS.boi) and r[-1] == IDS.eot and r.count(IDS.eot) == 1
        assert r.count(IDS.sot) == (r[0] == IDS.sot)
        bois = [k for k, t in enumerate(r) if t == IDS.boi]
        assert bois, "every row has an image"
        for k in bois:
            assert r[k + 1:k + 1 + N_IMG] == [IDS.image] * N_IMG and r[k + 1 + N_IMG] == IDS.eoi
        assert r.count(IDS.image) == N_IMG * len(bois) and r.count(IDS.eoi) == len(bois)
        n_boi += len(bois)
    assert batch.images_NCHW.shape == (n_boi, 3, 8, 8)


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x.tokens_BL, y.tokens_BL) and torch.equal(x.images_NCHW,
                                                                                       y.images_NCHW)
                                    for x, y in zip(a, b))


# ----------------------------------------------------------------------------------------------------------------------
# skipped and counted by reason
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [0, 2])
def test_malformed_documents_and_bad_images_are_skipped_and_counted_by_reason(data, workers):
    info = _loader(None, data["docs"], workers=workers)
    batches = list(info.loader)
    # 28 documents in the shards -> 7 batches of 4; 21 are usable (10 + 10 good, somecorrupt keeps one image): the
    # worker cycles its shards to fill its quota
    assert len(batches) == info.num_batches == 28 // 4
    for b in batches:
        _check_batch(b)
    by = info.skipped_by_reason()
    assert {k: by[k] for k in BAD_DOCS} == BAD_DOCS
    # the documents with no usable image were replaced: their words never reach a row
    words = {w: TOK.encode(w)[0] for w in ("zebraword", "giraffeword", "penguinword")}
    seen = {t for b in batches for r in _rows(b) for t in r}
    assert not seen & set(words.values())


def test_corrupt_pairs_counted_beside_documents(data):
    info = _loader(data["pairs"], data["docs"], batch=4, docs_ratio=0.5)
    batches = list(info.loader)
    assert len(batches) == info.num_batches == 24 // 2  # 2 pair rows per batch: the pairs define the epoch
    for b in batches:
        _check_batch(b)
        assert b.tokens_BL.shape[0] == 4
    by = info.skipped_by_reason()
    assert by["corrupt_image"] == 1 and by["doc_bad_json"] == 2 and info.skipped() == 1 + sum(BAD_DOCS.values())


def test_parse_document_reasons():
    assert parse_document(b"{") == (None, "doc_bad_json")
    assert parse_document(b'{"texts": "a string"}') == (None, "doc_bad_json")
    assert parse_document({"texts": ["a"], "images": [{"sentence": 0}]}) == (None, "doc_bad_json")  # no file
    assert parse_document({"texts": [None, " "], "images": []}) == (None, "doc_no_text")
    assert parse_document(_doc(["a", "b"], [(2, 0.5)])) == (None, "doc_bad_image_index")
    assert parse_document(_doc(["a", "b"], [(-1, 0.5)])) == (None, "doc_bad_image_index")
    assert parse_document(_doc(["a", "b"], [(True, 0.5)])) == (None, "doc_bad_image_index")
    (texts, images), reason = parse_document(json.dumps(_doc(["a", None], [(1, None)])))
    assert reason is None and texts == ["a", ""] and images == [DocImage("0.png", 1, None, None)]


# ----------------------------------------------------------------------------------------------------------------------
# exact resume
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_reproduces_the_uninterrupted_batches(data, workers):
    full = list(_loader(data["pairs"], data["docs"], workers=workers).loader)
    for k in (1, 5):
        resumed = list(_loader(data["pairs"], data["docs"], workers=workers, start=k).loader)
        assert _same(resumed, full[k:]), k
    # a later epoch too, and it differs from epoch 0 (new shard order, shuffles, coins)
    e1 = list(_loader(data["pairs"], data["docs"], workers=workers, epoch=1).loader)
    assert _same(list(_loader(data["pairs"], data["docs"], workers=workers, epoch=1, start=3).loader), e1[3:])
    assert not _same(e1, full)


def test_set_epoch_repositions_the_loader(data):
    info = _loader(None, data["docs"], workers=0)
    full = list(info.loader)
    info.set_epoch(0, 2)
    assert _same(list(info.loader), full[2:])


def test_every_rank_yields_the_same_number_of_batches(data):
    counts = []
    for rank in range(2):
        info = _loader(data["pairs"], data["docs"], batch=2, world=2, rank=rank)
        batches = list(info.loader)
        for b in batches:
            _check_batch(b)
        counts.append((info.num_batches, len(batches)))
    assert counts[0] == counts[1] == (24 // (1 * 2), 24 // (1 * 2))


# ----------------------------------------------------------------------------------------------------------------------
# pair rows: the order coin is seeded by the data position
# ----------------------------------------------------------------------------------------------------------------------
def _position_coin(seed, epoch, rank, batch, row) -> bool:
    """The rule of the contract, written out: a generator seeded by (seed, epoch, rank, batch index, row)."""
    h = hashlib.blake2b(f"order-{seed}-{epoch}-{rank}-{batch}-{row}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(h, "little") >> 1).random() < 0.5


def test_pair_order_coin_is_seeded_by_position(data):
    for seed, epoch in ((0, 0), (3, 1)):
        batches = list(_loader(data["pairs"], None, batch=4, seed=seed, epoch=epoch).loader)
        firsts = []
        for bi, b in enumerate(batches):
            _check_batch(b)
            for r, row in enumerate(_rows(b)):
                image_first = row[0] == IDS.boi
                # either [boi][img]xn[eoi] caption [eot] (no sot: the boi at position 0 is no contrastive pair, as
                # in LCL) or [sot] caption [boi][img]xn[eoi] [eot]
                assert image_first or (row[0] == IDS.sot and row[-2] == IDS.eoi)
                assert image_first == _position_coin(seed, epoch, 0, bi, r)
                firsts.append(image_first)
        assert 0 < sum(firsts) < len(firsts)


def test_pair_caption_is_cut_to_leave_room_for_the_image():
    b = RowBuilder(TOK, context_length=12, image_tokens=N_IMG)
    long = "one two three four five six seven eight nine ten"
    for first in (True, False):
        row = b.pair(long, first)
        assert len(row) == 12 - first and row.count(IDS.boi) == 1 and row[-1] == IDS.eot  # image first: no sot
        text = [t for t in row if t < IDS.sot]
        assert text == TOK.encode(long)[:12 - N_IMG - 4]


# ----------------------------------------------------------------------------------------------------------------------
# truncation and resampling
# ----------------------------------------------------------------------------------------------------------------------
def test_truncation_never_cuts_an_image_block():
    L = 16
    b = RowBuilder(TOK, context_length=L, image_tokens=N_IMG)  # a block is 6 tokens
    t = lambda n: list(range(100, 100 + n))  # noqa: E731
    for n_before in range(0, 16):
        row, kept = b.row([t(n_before), 0, t(2), 1])
        assert len(row) <= L and row[-1] == IDS.eot and row[0] == IDS.sot
        body = row[1:-1]
        bois = [k for k, x in enumerate(body) if x == IDS.boi]
        assert len(bois) == len(kept)
        for k in bois:  # every block whole
            assert body[k + 1:k + 1 + N_IMG] == [IDS.image] * N_IMG and body[k + N_IMG + 1] == IDS.eoi
        if n_before + 6 > L - 2:  # the first block does not fit: it and everything after are gone
            assert kept == [] and body == t(n_before)[:L - 2]
        elif n_before + 6 + 2 + 6 > L - 2:
            assert kept == [0]  # the second block does not fit whole
            assert body[:n_before + 6] == t(n_before) + b.block
        else:
            assert kept == [0, 1] and len(row) == n_before + 16
    # a row that fits keeps everything; one that opens with an image has no sot (its boi is not a pair)
    row, kept = b.row([t(3), 0])
    assert row == [IDS.sot] + t(3) + b.block + [IDS.eot] and kept == [0]
    row, kept = b.row([0, t(3), 1])
    assert row == b.block + t(3) + b.block + [IDS.eot] and kept == [0, 1]
    row, kept = b.row([0, t(20), 1])
    assert row == b.block + t(20)[:L - 7] + [IDS.eot] and kept == [0]


def test_document_cut_before_its_first_image_is_replaced(tmp_path):
    long = " ".join(f"w{i}" for i in range(60))
    docs = [("long", _doc([long, "koalaword"], [(1, 0.5)], where="after"), {"0.png": _png(1)})]
    docs += [(f"ok{i}", _doc([f"short {i}"], [(0, 0.5)]), {"0.png": _png(2 + i)}) for i in range(4)]
    _write_docs(tmp_path / "d.tar", docs)
    info = _loader(None, str(tmp_path / "d.tar"), batch=2, L=32)
    batches = list(info.loader)
    assert len(batches) == 2 and info.skipped_by_reason()["doc_no_image"] == 1
    for b in batches:
        _check_batch(b, L=32)
    assert TOK.encode("koalaword")[0] not in {t for b in batches for r in _rows(b) for t in r}


def test_config_errors_name_the_key(data):
    with pytest.raises(ConfigError, match="lcl_data.context_length"):
        _loader(data["pairs"], None, L=N_IMG + 4)
    with pytest.raises(ConfigError, match="lcl_data.docs_ratio"):
        _loader(data["pairs"], data["docs"], docs_ratio=1.0)
    with pytest.raises(ConfigError, match="lcl_data.docs"):
        _loader(None, None)
    with pytest.raises(FileNotFoundError, match="nothere"):
        _loader(None, str(data["dir"] / "nothere.tar"))


# ----------------------------------------------------------------------------------------------------------------------
# MMC4's image rules (as LCL's MMC4 loader applies them)
# ----------------------------------------------------------------------------------------------------------------------
def test_mmc4_rules_threshold_one_image_per_sentence_at_most_max():
    ims = [DocImage(f"{k}.jpg", j, s, None) for k, (j, s) in enumerate(
        [(5, 0.3), (1, 0.23), (1, 0.24), (1, 0.5), (0, 0.9), (2, 0.4), (3, 0.4), (4, 0.4), (6, 0.4), (7, 0.4)])]
    picked = select_images(ims, random.Random(0), sim_threshold=0.24, max_images=6, one_per_sentence=True)
    assert [im.sentence for im in picked] == [0, 1, 2, 3, 4, 5]  # sorted, one per sentence, the first 6
    assert all(im.similarity >= 0.24 for im in picked)
    # sentence 1's image is a random one of the two above the threshold, both drawn over seeds
    assert {select_images(ims, random.Random(s), 0.24, 6, True)[1].file for s in range(20)} == {"2.jpg", "3.jpg"}
    assert len(select_images(ims, random.Random(0), 0.24, 6, False)) == 6
    assert len(select_images(ims, random.Random(0), 0.24, 100, False)) == 9


def test_images_go_before_or_after_their_sentence():
    texts = [[1], [2], [3]]
    ims = [DocImage("0.jpg", 0, 0.5, None), DocImage("1.jpg", 2, 0.5, None)]
    sides = set()
    for s in range(30):
        p = document_pieces(texts, ims, random.Random(s), 0.5)
        assert p in ([0, [1], [2], [3], 1], [0, [1], [2], 1, [3]], [[1], 0, [2], [3], 1], [[1], 0, [2], 1, [3]])
        sides.add(p.index(0) < p.index([1]))
    assert sides == {True, False}
    fixed = [DocImage("0.jpg", 1, None, "before"), DocImage("1.jpg", 1, None, "after")]
    assert document_pieces(texts, fixed, random.Random(0), 0.5) == [[1], 0, [2], 1, [3]]


def test_a_long_document_is_tokenized_only_as_far_as_a_row_reaches(tmp_path):
    """Sentences after the one where the text alone fills the row are not read, their images not decoded: a corrupt
    image there is not even seen."""
    texts = ["start"] + [" ".join(f"w{i}x{j}" for j in range(10)) for i in range(20)] + ["late"]
    doc = _doc(texts, [(0, 0.5), (21, 0.5)], where="after")
    _write_docs(tmp_path / "d.tar", [("long", doc, {"0.png": _png(1), "1.png": b"garbage"})])
    info = _loader(None, str(tmp_path / "d.tar"), batch=1, L=32)
    (b,) = list(info.loader)
    _check_batch(b, L=32)
    assert b.images_NCHW.shape[0] == 1 and info.skipped() == 0


def test_each_image_of_a_batch_belongs_to_its_block(tmp_path):
    """images_NCHW follows the boi order row by row: every image's pixel value is the number its sentence names."""
    with wds.TarWriter(str(tmp_path / "p.tar")) as w:
        for i in range(12):
            w.write({"__key__": f"p{i}", "png": _png(20 + i), "txt": f"color {20 + i}"})
    docs = []
    for d in range(12):
        vals = [100 + 10 * d + k for k in range(1 + d % 3)]
        docs.append((f"d{d}", _doc([f"color {v}" for v in vals], [(k, 0.5) for k in range(len(vals))],
                                   where="after"), {f"{k}.png": _png(v) for k, v in enumerate(vals)}))
    _write_docs(tmp_path / "d.tar", docs)
    for workers in (0, 1):
        for b in _loader(str(tmp_path / "p.tar"), str(tmp_path / "d.tar"), batch=4, workers=workers, L=64).loader:
            _check_batch(b, L=64)
            k = 0
            for r in _rows(b):
                # the number named right before each block (documents: image after its sentence), or the pair's caption
                for j in [j for j, t in enumerate(r) if t == IDS.boi]:
                    start = max([i + 1 for i, t in enumerate(r[:j]) if t == IDS.eoi], default=0)
                    before = [t for t in r[start:j] if t < IDS.sot]
                    after = [t for t in r[j:] if t < IDS.sot]  # an image-first pair: its caption follows
                    words = TOK.decode(before or after).split()  # CLIP's BPE writes 123 as 1 2 3
                    shade = round(float(b.images_NCHW[k].mean()) * 255)
                    assert words[0] == "color" and shade == int("".join(words[1:]))
                    k += 1
            assert k == b.images_NCHW.shape[0]
