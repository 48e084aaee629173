"""The webdataset pipeline on real shards written by data_tools.make_shards into a temporary folder."""
from __future__ import annotations

import io
import json
import os
from collections import Counter

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from data_tools.common import ShardSink, encode_image
from data_tools.make_shards import make_shards
from evaclip.config import DataCfg
from evaclip.data import build_train_loader, synthetic_batches
from evaclip.data.shards import decode_image, expand_spec

N_GOOD = 48  # 8 shards x 6


def _captions(texts):
    """Identity 'tokenizer': batches carry the captions, so tests can tell samples apart."""
    return list(texts)


def _write_images(folder, n, start=0, size=(40, 30)):
    rng = np.random.default_rng(start)
    items = []
    for i in range(start, start + n):
        p = os.path.join(folder, f"{i:03d}.jpg")
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(p, quality=90)
        items.append((p, f"sample {i}"))
    return items


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    src = root / "src"
    src.mkdir()
    items = _write_images(str(src), N_GOOD)
    make_shards(items, str(root / "good"), samples_per_shard=6, workers=1, show_progress=False)
    # a shard with planted bad samples, written directly (make_shards refuses to write them)
    good_jpg = open(items[0][0], "rb").read()
    with ShardSink(str(root / "bad"), 100, prefix="bad") as sink:
        sink.write({"__key__": "trunc", "jpg": good_jpg[: len(good_jpg) // 2], "txt": "truncated jpeg"})
        sink.write({"__key__": "garbage", "jpg": b"\xff\xd8\xff\xe0 not a jpeg at all", "txt": "garbage jpeg"})
        sink.write({"__key__": "nocap", "jpg": good_jpg, "txt": "   "})
        sink.write({"__key__": "notxt", "jpg": good_jpg})
        for i in (100, 101):
            buf = io.BytesIO()
            Image.new("RGB", (40, 30), (i, 0, 0)).save(buf, format="JPEG")
            sink.write({"__key__": f"ok{i}", "jpg": buf.getvalue(), "txt": f"sample {i}"})
    empty = root / "empty"
    ShardSink(str(empty), 10, prefix="e").close()
    import webdataset as wds

    wds.TarWriter(str(empty / "e-00000.tar")).close()
    with open(empty / "sizes.json", "w") as f:
        json.dump({"e-00000.tar": 0}, f)
    return {"good": str(root / "good" / "{00000..00007}.tar"), "bad": str(root / "bad" / "bad-00000.tar"),
            "empty": str(empty / "e-00000.tar"), "root": root}


def _run(spec, *, rank=0, world=1, workers=2, batch=4, resampled=False, num=None, seed=0, epoch=0, start=0,
         preprocess=None, buffer=10):
    cfg = DataCfg(train=spec, batch_size=batch, workers=workers, resampled=resampled, train_num_samples=num,
                  shuffle_buffer=buffer)
    pre = preprocess or open_clip.image_transform(16, is_train=False)
    info = build_train_loader(cfg, pre, _captions, rank=rank, world_size=world, seed=seed, epoch=epoch,
                              start_step=start)
    return info, list(info.loader)


def test_exact_mode_covers_every_sample_once_across_ranks_and_workers(shards):
    seen = Counter()
    for rank in range(2):
        info, batches = _run(shards["good"], rank=rank, world=2, workers=2)
        assert len(batches) == info.num_batches == N_GOOD // (4 * 2)
        for images_BCHW, caps in batches:
            assert images_BCHW.shape == (4, 3, 16, 16) and images_BCHW.dtype == torch.float32
            seen.update(caps)
    assert seen == Counter(f"sample {i}" for i in range(N_GOOD))
    # a new epoch reshuffles but still covers everything once
    order0 = [c for _, cs in _run(shards["good"], epoch=0)[1] for c in cs]
    order1 = [c for _, cs in _run(shards["good"], epoch=1)[1] for c in cs]
    assert order0 != order1 and sorted(order0) == sorted(order1)


def test_uneven_shards_give_every_rank_the_same_number_of_batches(shards):
    # 9 shards (8 x 6 + one with 2 valid of 6) over 2 ranks x 2 workers: shards cannot split evenly
    spec = shards["good"] + "::" + shards["bad"]
    counts = [len(_run(spec, rank=r, world=2, workers=2, batch=5)[1]) for r in range(2)]
    assert counts == [54 // 10, 54 // 10]


def test_resampled_yields_train_num_samples_per_epoch(shards):
    total = 0
    for rank in range(2):
        info, batches = _run(shards["good"], rank=rank, world=2, workers=2, resampled=True, num=40, batch=5)
        assert info.num_samples == 40
        total += sum(len(c) for _, c in batches)
    assert total == 40
    # mixing: a source with weight 0 is never drawn
    spec = shards["good"] + "::" + shards["bad"]
    cfg = DataCfg(train=spec, batch_size=4, workers=0, resampled=True, train_num_samples=32, train_weights=[1, 0])
    info = build_train_loader(cfg, open_clip.image_transform(16, is_train=False), _captions)
    caps = [c for _, cs in info.loader for c in cs]
    assert len(caps) == 32 and not {"sample 100", "sample 101"} & set(caps) and info.skipped() == 0


def test_corrupt_images_and_missing_captions_are_skipped_and_counted(shards):
    spec = shards["good"] + "::" + shards["bad"]
    info, batches = _run(spec, workers=0, batch=5)  # 54 raw samples, 50 valid: exactly 10 batches, nothing cycled
    caps = [c for _, cs in batches for c in cs]
    assert sorted(caps) == sorted([f"sample {i}" for i in range(N_GOOD)] + ["sample 100", "sample 101"])
    assert info.skipped() == 4
    assert info.skipped_by_reason() == {"corrupt_image": 2, "missing_image": 0, "missing_caption": 2}
    # with worker processes the counts reach the main process
    info, _ = _run(spec, workers=2, batch=5)
    by = info.skipped_by_reason()
    assert by["corrupt_image"] >= 2 and by["missing_caption"] >= 2


def test_missing_shard_and_empty_data_fail_before_training(shards):
    missing = shards["good"].replace("00007", "00009")
    with pytest.raises(FileNotFoundError, match="00009.tar"):
        _run(missing)
    with pytest.raises(ValueError, match="no samples"):
        _run(shards["empty"])
    with pytest.raises(ValueError, match="fewer than one global batch"):
        _run(shards["bad"], batch=8)
    with pytest.raises(ValueError, match="train_weights"):
        build_train_loader(DataCfg(train=shards["good"], train_weights=[1, 2], resampled=True, train_num_samples=8),
                           None, _captions)
    with pytest.raises(ValueError, match="empty source"):
        expand_spec(shards["good"] + "::")


def test_bad_samples_only_is_an_error_not_a_hang(shards):
    import webdataset as wds

    d = shards["root"] / "allbad"
    d.mkdir()
    with wds.TarWriter(str(d / "x.tar")) as w:
        for i in range(4):
            w.write({"__key__": f"k{i}", "jpg": b"broken", "txt": "x"})
    with pytest.raises(RuntimeError, match="no valid samples"):
        _run(str(d / "x.tar"), workers=0, batch=2)


@pytest.mark.parametrize("resampled", [False, True])
def test_restart_at_step_k_continues_the_stream(shards, resampled):
    # random train augmentations too: they are seeded per global batch, so a restart reproduces them
    pre = open_clip.image_transform(16, is_train=True)
    spec = shards["good"] + "::" + shards["bad"]
    kw = dict(workers=2, batch=3, resampled=resampled, num=48 if resampled else None, preprocess=pre, epoch=1)
    info, full = _run(spec, **kw)
    k = 3  # odd: the restarted loader's worker 0 plays the role of the uninterrupted run's worker 1
    _, rest = _run(spec, start=k, **kw)
    assert len(rest) == info.num_batches - k == len(full) - k
    for (im_a, cap_a), (im_b, cap_b) in zip(full[k:], rest):
        assert cap_a == cap_b
        torch.testing.assert_close(im_a, im_b, rtol=0, atol=0)
    # set_epoch on the same DataInfo does the same
    info.set_epoch(1, start_step=k)
    assert [c for _, c in info.loader] == [c for _, c in rest]


def test_jpeg_draft_decoding_matches_full_decode():
    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (25, 38, 3), dtype=np.uint8)
    big = Image.fromarray(small).resize((1500, 1000), Image.Resampling.BICUBIC)
    data = encode_image(big, "jpg", 90)
    full = decode_image(data)
    draft = decode_image(data, min_side=224)
    assert full.size == (1500, 1000)
    assert min(draft.size) >= 224 and draft.size[0] < 1500 and draft.mode == "RGB"
    ref = np.asarray(full.resize(draft.size, Image.Resampling.BOX), dtype=np.float32)
    assert np.abs(np.asarray(draft, dtype=np.float32) - ref).mean() < 3.0  # same picture, ~1-2 grey levels apart


def test_synthetic_batches_shapes_and_determinism():
    a = list(synthetic_batches(2, 32, context_length=16, vocab_size=100, steps=3, seed=1, fixed=False))
    b = list(synthetic_batches(2, 32, context_length=16, vocab_size=100, steps=3, seed=1, fixed=False))
    assert len(a) == 3 and a[0][0].shape == (2, 3, 32, 32) and a[0][1].shape == (2, 16)
    torch.testing.assert_close(a[2][0], b[2][0])
    tokens_BL = a[0][1]
    assert (tokens_BL[:, 0] == 98).all() and (tokens_BL.argmax(-1) > 0).all()
    assert ((tokens_BL == 99).sum(-1) == 1).all()
    assert not torch.equal(a[0][0], a[1][0])


def test_pipe_urls_need_a_sample_count_and_then_stream(shards):
    spec = "pipe:cat " + shards["good"]
    with pytest.raises(ValueError, match="train_num_samples"):
        _run(spec, workers=0)
    info, batches = _run(spec, workers=2, num=N_GOOD)
    assert sorted(c for _, cs in batches for c in cs) == sorted(f"sample {i}" for i in range(N_GOOD))
