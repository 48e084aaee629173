"""MIM data: the block mask generator, image-only / caption-ignoring train batches with masks, image-only shards from
make_shards, the k-NN monitor and the demo's k-NN sets. Tiny, CPU."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from data_tools import make_demo, make_shards
from data_tools.common import ShardSink
from evaclip.config import DataCfg
from evaclip.data import BlockMaskGenerator, build_train_loader
from evaclip.data.masking import scaled_min_block
from evaclip.data.transforms import mim_train_transform
from evaclip.evals.data import build_eval_loader
from evaclip.evals.knn import knn_top1, resolve_labelled, topk_neighbours, vote_scores


# ----------------------------------------------------------------------------------------------------------------------
# masking
# ----------------------------------------------------------------------------------------------------------------------
def _draws(gen, n, seed=0):
    rng = np.random.default_rng(seed)
    return [gen.draw(rng, return_blocks=True) for _ in range(n)]


def test_eva02_grid_counts_reach_the_target_or_end_slightly_under():
    gen = BlockMaskGenerator((16, 16), mask_ratio=0.41)  # EVA-02: 105 of 256
    assert gen.num_masked == 105 and gen.min_block == 16
    assert BlockMaskGenerator(16).num_masked == round(0.4 * 256)
    counts = []
    for mask, blocks in _draws(gen, 1500):
        assert mask.dtype == bool and mask.shape == (256,)
        grid = np.zeros((16, 16), dtype=bool)
        for b in blocks:
            grid[b.top:b.top + b.h, b.left:b.left + b.w] = True
        assert (grid.reshape(-1) == mask).all()  # the mask is exactly the union of its blocks, row-major
        assert sum(b.new for b in blocks) == mask.sum()
        counts.append(int(mask.sum()))
    c = np.array(counts)
    assert c.max() == 105  # never over the target
    assert (c == 105).mean() > 0.55  # most masks reach it ...
    assert 103.5 < c.mean() < 105 and c.min() >= 80  # ... the others end a few patches short


def test_blocks_follow_the_specification():
    gen = BlockMaskGenerator(16, num_masked=105, min_block_patches=16, aspect=(0.3, 1 / 0.3))
    lo, hi = math.log(0.3), math.log(1 / 0.3)
    first_areas, log_aspects = [], []
    for _, blocks in _draws(gen, 1500, seed=1):
        remaining = 105
        for j, b in enumerate(blocks):
            # drawn area in [min_block, remaining] (the interval reversed once remaining < min_block, as in BEiT)
            assert min(16, remaining) - 1e-9 <= b.area <= max(16, remaining) + 1e-9
            assert lo - 1e-9 <= math.log(b.aspect) <= hi + 1e-9
            assert b.h == round(math.sqrt(b.area * b.aspect)) and b.w == round(math.sqrt(b.area / b.aspect))
            assert b.h < 16 and b.w < 16 and 0 <= b.top <= 16 - b.h and 0 <= b.left <= 16 - b.w
            assert 0 < b.new <= remaining and b.new <= b.h * b.w
            if remaining >= 16:  # a full-size block: at least min_block patches up to the rounding of h and w
                assert b.h * b.w >= 16 - 0.5 * (math.sqrt(b.area * b.aspect) + math.sqrt(b.area / b.aspect)) + 0.25
            if j == 0:
                first_areas.append(b.area)
            log_aspects.append(math.log(b.aspect))
            remaining -= b.new
    # first blocks: area ~ U(16, 105) among those that fit; aspects symmetric and spread over the log range
    assert 40 < np.mean(first_areas) < 65 and min(first_areas) >= 16
    la = np.array(log_aspects)
    assert abs(la.mean()) < 0.05
    hist, _ = np.histogram(la, bins=4, range=(lo, hi))
    assert hist.min() > 0.15 * len(la)


@pytest.mark.parametrize("grid, expected_min, target", [(4, 1, 6), (8, 6, 26), (14, 16, 78), (16, 16, 102),
                                                        ((6, 10), 6, 24)])
def test_small_grids_scale_the_minimum_block(grid, expected_min, target):
    gen = BlockMaskGenerator(grid)
    assert gen.min_block == expected_min == scaled_min_block(gen.num_patches, 16)
    assert gen.num_masked == target
    counts = np.array([m.sum() for m, _ in _draws(gen, 400)])
    assert counts.max() == target and counts.min() > 0.8 * target and (counts == target).mean() > 0.6


def test_masks_are_deterministic_given_the_generator():
    gen = BlockMaskGenerator(8)
    a = gen.batch(16, np.random.default_rng(7))
    b = gen.batch(16, np.random.default_rng(7))
    assert a.dtype == torch.bool and a.shape == (16, 64) and torch.equal(a, b)
    assert not torch.equal(a, gen.batch(16, np.random.default_rng(8)))
    # the batch is the sequence of single draws from one generator; torch generators and int seeds work too
    rng = np.random.default_rng(7)
    assert torch.equal(a, torch.from_numpy(np.stack([gen(rng) for _ in range(16)])))
    t1, t2 = (gen.batch(4, torch.Generator().manual_seed(3)) for _ in range(2))
    assert torch.equal(t1, t2)
    assert torch.equal(gen.batch(4, 5), gen.batch(4, np.random.default_rng(5)))
    with pytest.raises(TypeError):
        gen.draw(0.5)


def test_fixed_validation_masks_are_deterministic_and_independent_of_training_rng():
    gen = BlockMaskGenerator(16, num_masked=105)
    ref = gen.fixed_masks(6)
    torch.manual_seed(123)
    np.random.seed(123)
    _ = gen.batch(3, np.random.default_rng(0))  # training draws in between change nothing
    assert torch.equal(gen.fixed_masks(range(6)), ref)
    assert torch.equal(BlockMaskGenerator(16, num_masked=105).fixed_masks(6), ref)
    # per sample index, whatever the batch it is in
    assert torch.equal(gen.fixed_masks(torch.tensor([5, 1])), ref[[5, 1]])
    assert torch.equal(gen.fixed_mask(), ref[0])
    assert len({tuple(r.tolist()) for r in ref}) == 6  # different images get different masks
    assert not torch.equal(gen.fixed_masks(6, seed=1), ref)
    assert (ref.sum(1) <= 105).all() and (ref.sum(1) > 80).all()


@pytest.mark.parametrize("kw", [dict(grid_hw=1), dict(grid_hw=(4, 4), mask_ratio=1.0), dict(grid_hw=4, tries=0),
                                dict(grid_hw=4, aspect=(2.0, 1.0)), dict(grid_hw=4, min_block_patches=0)])
def test_bad_settings_are_refused(kw):
    with pytest.raises(ValueError):
        BlockMaskGenerator(**kw)


# ----------------------------------------------------------------------------------------------------------------------
# image-only shards (make_shards --images-only)
# ----------------------------------------------------------------------------------------------------------------------
COLORS = {"blue": (20, 40, 220), "green": (30, 200, 40), "red": (220, 30, 30)}


def _solid(path, rgb, i, size=(24, 20)):
    rng = np.random.default_rng(i)
    arr = np.clip(np.array(rgb)[None, None] + rng.integers(-25, 25, (size[1], size[0], 3)), 0, 255)
    Image.fromarray(arr.astype(np.uint8)).save(path, quality=95)


def _class_folder(root, per_class, offset=0, wrong=None):
    """``root/{blue,green,red}/*.jpg`` of noisy solid colours; ``wrong=(folder, colour)`` adds one mislabelled image."""
    for c, rgb in COLORS.items():
        os.makedirs(root / c, exist_ok=True)
        for i in range(per_class):
            _solid(root / c / f"{c}{i}.jpg", rgb, offset + 100 * len(c) + i)
    if wrong:
        _solid(root / wrong[0] / "odd.jpg", COLORS[wrong[1]], 999)
    return root


def test_make_shards_images_only_from_class_folders(tmp_path):
    src = _class_folder(tmp_path / "src", per_class=4)
    (src / "red" / "red0.txt").write_text("a caption that image-only shards ignore")
    out = tmp_path / "out"
    assert make_shards.main([str(src), str(out), "--images-only", "--samples-per-shard", "5", "--workers", "1",
                             "--quiet"]) == 0
    assert (out / "classnames.txt").read_text().split() == ["blue", "green", "red"]
    sizes = json.loads((out / "sizes.json").read_text())
    assert sum(sizes.values()) == 12 and len(sizes) == 3
    samples = list(wds.WebDataset(str(out / "{00000..00002}.tar"), shardshuffle=False, empty_check=False))
    assert len(samples) == 12
    for s in samples:
        assert {"jpg", "cls", "json"} <= set(s) and "txt" not in s
        meta = json.loads(s["json"])
        cls = int(s["cls"])
        assert meta["class"] == ["blue", "green", "red"][cls] and f"/{meta['class']}/" in meta["source"]
    # the eval reader takes it as a labelled set with the class names beside the shards
    evset = resolve_labelled(str(out))
    ys = torch.cat([y for _, _, y in build_eval_loader(evset, lambda im: torch.zeros(1), 8, workers=0)])
    assert sorted(ys.tolist()) == [0] * 4 + [1] * 4 + [2] * 4


def test_make_shards_shuffle_seed_mixes_classes_deterministically(tmp_path):
    src = _class_folder(tmp_path / "src", per_class=6)

    def order(out, *extra):
        assert make_shards.main([str(src), str(out), "--images-only", "--workers", "1", "--quiet", *extra]) == 0
        return [int(s["cls"]) for s in wds.WebDataset(str(out / "00000.tar"), shardshuffle=False, empty_check=False)]

    assert order(tmp_path / "plain") == sorted(order(tmp_path / "plain2"))  # class by class without the flag
    a, b = order(tmp_path / "a", "--shuffle-seed", "3"), order(tmp_path / "b", "--shuffle-seed", "3")
    assert a == b and a != sorted(a) and sorted(a) == [0] * 6 + [1] * 6 + [2] * 6


def test_make_shards_images_only_flat_folder_has_no_classes(tmp_path):
    src = tmp_path / "flat"
    (src / "sub").mkdir(parents=True)
    for i in range(3):
        _solid(src / f"a{i}.jpg", (i * 50, 0, 0), i)
    _solid(src / "sub" / "b.jpg", (0, 0, 90), 9)  # one sub-folder with loose images beside it: not class folders
    out = tmp_path / "out"
    assert make_shards.main([str(src), str(out), "--images-only", "--workers", "1", "--quiet"]) == 0
    assert not (out / "classnames.txt").exists()
    samples = list(wds.WebDataset(str(out / "00000.tar"), shardshuffle=False, empty_check=False))
    assert len(samples) == 4 and all("cls" not in s and "txt" not in s for s in samples)
    with pytest.raises(SystemExit) as e:  # forcing class folders on a folder that is not one is refused
        make_shards.main([str(src), str(tmp_path / "o2"), "--images-only", "--classes", "folders", "--quiet"])
    assert e.value.code == 2


# ----------------------------------------------------------------------------------------------------------------------
# MIM train batches
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mim_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("mim")
    items, names = make_shards.iter_image_folder(str(_class_folder(root / "src", per_class=8)))
    make_shards.make_shards(items, str(root / "img"), samples_per_shard=6, workers=1, show_progress=False,
                            images_only=True, classnames=names)
    # image-text shards where some samples have no caption at all: MIM reads them all
    with ShardSink(str(root / "pairs"), 6, prefix="p") as sink:
        for i in range(24):
            buf = root / "tmp.jpg"
            _solid(buf, (10 * i, 100, 50), i)
            s = {"__key__": f"s{i:03d}", "jpg": buf.read_bytes()}
            if i % 3:
                s["txt"] = f"caption {i}"
            sink.write(s)
    return {"img": str(root / "img" / "{00000..00003}.tar"), "pairs": str(root / "pairs" / "p-{00000..00003}.tar")}


def _mim_run(spec, *, workers=2, batch=4, epoch=0, start=0, seed=0, rank=0, world=1):
    cfg = DataCfg(train=spec, batch_size=batch, workers=workers, shuffle_buffer=8)
    info = build_train_loader(cfg, mim_train_transform(16), rank=rank, world_size=world, seed=seed, epoch=epoch,
                              start_step=start, pin_memory=False, mask_generator=BlockMaskGenerator(4))
    return info, list(info.loader)


@pytest.mark.parametrize("which", ["img", "pairs"])
def test_mim_batches_are_images_and_masks(mim_shards, which):
    info, batches = _mim_run(mim_shards[which])
    assert info.num_batches == len(batches) == 6 and info.skipped() == 0  # captionless samples are not skipped
    for images, masks in batches:
        assert images.shape == (4, 3, 16, 16) and images.dtype == torch.float32
        assert masks.shape == (4, 16) and masks.dtype == torch.bool
        assert (masks.sum(1) <= 6).all() and (masks.sum(1) > 0).all()


def test_mim_batches_resume_exactly_and_depend_on_seed_epoch_rank(mim_shards):
    _, full = _mim_run(mim_shards["img"])
    _, again = _mim_run(mim_shards["img"])
    _, resumed = _mim_run(mim_shards["img"], start=3)
    assert len(resumed) == 3
    for (ia, ma), (ib, mb) in zip(full, again):
        assert torch.equal(ia, ib) and torch.equal(ma, mb)
    for (ia, ma), (ib, mb) in zip(full[3:], resumed):
        assert torch.equal(ia, ib) and torch.equal(ma, mb)
    _, other_epoch = _mim_run(mim_shards["img"], epoch=1)
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(full, other_epoch))
    _, rank1 = _mim_run(mim_shards["img"], rank=1, world=2)
    _, rank0 = _mim_run(mim_shards["img"], rank=0, world=2)
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(rank0, rank1))


def test_mim_train_transform_is_one_random_view():
    tf = mim_train_transform(16, crop_scale=(0.2, 1.0))
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    torch.manual_seed(0)
    a = tf(img)
    torch.manual_seed(0)
    assert torch.equal(a, tf(img)) and a.shape == (3, 16, 16)
    with pytest.raises(ValueError):
        mim_train_transform(16, crop_scale=(0.0, 1.0))


# ----------------------------------------------------------------------------------------------------------------------
# k-NN
# ----------------------------------------------------------------------------------------------------------------------
def test_votes_weighted_versus_majority():
    # one query: a very close neighbour of class 0, two distant ones of class 1, one padding slot
    sims = torch.tensor([[0.99, 0.10, 0.05, float("-inf")]])
    labels = torch.tensor([[0, 1, 1, -1]])
    w = vote_scores(sims, labels, 3, "weighted", 0.07)
    assert w.argmax().item() == 0 and w[0, 2] == 0
    assert torch.allclose(w[0, 1], torch.tensor(math.exp(0.10 / 0.07) + math.exp(0.05 / 0.07), dtype=torch.float64))
    assert vote_scores(sims, labels, 3, "majority").argmax().item() == 1
    # a majority tie goes to the class with the larger summed similarity
    tie = vote_scores(torch.tensor([[0.9, 0.2, 0.3, 0.1]]), torch.tensor([[0, 1, 1, 0]]), 2, "majority")
    assert tie.argmax().item() == 0 and tie[0, 0] - tie[0, 1] < 1
    with pytest.raises(ValueError):
        vote_scores(sims, labels, 3, "mean")


def test_topk_neighbours_pads_a_small_bank():
    bank = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=1)
    s, y = topk_neighbours(torch.tensor([[1.0, 0.0]]), bank, torch.tensor([4, 7]), k=3, chunk=1)
    assert y.tolist() == [[4, 7, -1]] and s[0, 0] == 1 and s[0, 2] == float("-inf")


def _mean_colour(images_BCHW):
    return images_BCHW.mean(dim=(2, 3))


def test_knn_top1_known_answer(tmp_path):
    import open_clip

    pre = open_clip.image_transform(16, is_train=False)
    train = _class_folder(tmp_path / "train", per_class=5)  # ImageNet-style folder
    # val: image-only shards with classes, one red image filed under "green": exactly one error
    val_src = _class_folder(tmp_path / "val_src", per_class=3, offset=50, wrong=("green", "red"))
    items, names = make_shards.iter_image_folder(str(val_src))
    make_shards.make_shards(items, str(tmp_path / "val"), samples_per_shard=4, workers=1, show_progress=False,
                            images_only=True, classnames=names)
    for vote in ("weighted", "majority"):
        res = knn_top1(_mean_colour, str(train), str(tmp_path / "val"), pre, k=3, batch_size=4, workers=0,
                       vote=vote)
        assert res["knn/top1"] == pytest.approx(9 / 10) and res["knn/num_train"] == 15
        assert res["knn/num_val"] == 10 and "knn/top5" not in res  # 3 classes: no top-5
    # k beyond the bank uses the whole bank; the weighted vote still finds the colour
    assert knn_top1(_mean_colour, str(train), str(train), pre, k=100, workers=0)["knn/top1"] == 1.0


def test_knn_refuses_mismatched_class_spaces(tmp_path):
    import open_clip

    train = _class_folder(tmp_path / "train", per_class=2)
    two = tmp_path / "two"
    for c in ("a", "b"):
        (two / c).mkdir(parents=True)
        _solid(two / c / "x.jpg", (1, 2, 3), 0)
    with pytest.raises(ValueError, match="class-id space"):
        knn_top1(_mean_colour, str(train), str(two), open_clip.image_transform(16, is_train=False), workers=0)


# ----------------------------------------------------------------------------------------------------------------------
# the demo's MIM data
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, make_demo.make_demo(str(out), seed=0, copies=1, show_progress=False)


def test_demo_has_images_only_train_data_and_a_knn_pair(demo):
    out, info = demo
    knn_train = out / "knn_train"
    assert info["knn_train"] == str(knn_train) and info["knn_val"] == info["zeroshot"]
    assert info["knn_train_num_samples"] == info["sklearn_indices"]["train"]
    assert (knn_train / "classnames.txt").read_text().split() == list(make_demo.CLASSNAMES)
    # MIM reads the image-text train shards as images
    cfg = DataCfg(train=info["train"], batch_size=32, workers=0, shuffle_buffer=64)
    data = build_train_loader(cfg, mim_train_transform(32), seed=0, pin_memory=False,
                              mask_generator=BlockMaskGenerator((4, 4)))
    images, masks = next(iter(data.loader))
    assert images.shape == (32, 3, 32, 32) and masks.shape == (32, 16)
    # k-NN on raw pixels of the held-out digits against the labelled train digits: the sets share class ids
    import open_clip

    flat = lambda x: x.flatten(1)  # noqa: E731
    res = knn_top1(flat, info["knn_train"], info["knn_val"], open_clip.image_transform(16, is_train=False),
                   k=10, batch_size=256, workers=0)
    assert res["knn/num_val"] == info["zeroshot_num_samples"] and res["knn/top1"] > 0.9
