"""Skipped training samples are counted per epoch and by reason, each bad sample once however often it is read.

A worker whose valid samples run short of its batch quota cycles its shards and reads the bad ones again; a restart
re-reads the epoch up to the resume point; a new epoch reads everything again. None of that may inflate the count.
"""
from __future__ import annotations

import io

import numpy as np
import open_clip
import pytest
import torch
import webdataset as wds
from PIL import Image

from evaclip.config import DataCfg
from evaclip.data.shards import build_train_loader

BAD = {"corrupt_image": 2, "missing_image": 1, "missing_caption": 1}


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), i, np.uint8)).save(buf, format="png")
    return buf.getvalue()


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    """Two shards of 8 raw samples: the second has 2 corrupt images, 1 sample without image, 1 without caption."""
    d = tmp_path_factory.mktemp("skips")
    with wds.TarWriter(str(d / "00000.tar")) as w:
        for i in range(8):
            w.write({"__key__": f"good{i}", "png": _png(i), "txt": f"sample {i}"})
    with wds.TarWriter(str(d / "00001.tar")) as w:
        for i in range(4):
            w.write({"__key__": f"ok{i}", "png": _png(10 + i), "txt": f"sample {10 + i}"})
        w.write({"__key__": "corrupt0", "png": b"\x89PNG not really", "txt": "x"})
        w.write({"__key__": "corrupt1", "png": b"garbage", "txt": "y"})
        w.write({"__key__": "noimage", "txt": "z"})
        w.write({"__key__": "nocaption", "png": _png(3)})
    return str(d / "{00000..00001}.tar")


def _loader(spec, workers, start=0):
    # 16 raw samples -> 4 batches of 4, but only 12 are valid: the workers cycle their shards to fill the quota
    cfg = DataCfg(train=spec, batch_size=4, workers=workers, shuffle_buffer=0)
    return build_train_loader(cfg, open_clip.image_transform(8, is_train=False), lambda t: torch.zeros(len(t), 4),
                              start_step=start)


@pytest.mark.parametrize("workers", [0, 2])
def test_skipped_samples_per_epoch_and_reason_counted_once(spec, workers):
    info = _loader(spec, workers)
    assert len(list(info.loader)) == 4
    assert info.skipped_by_reason() == BAD  # cycling re-read the bad shard: still each bad sample once
    assert info.skipped() == 4
    list(info.loader)  # a second pass over the same epoch (e.g. a fresh iterator) adds nothing
    assert info.skipped_by_reason() == BAD
    info.set_epoch(1)
    assert info.skipped() == 0 and info.skipped(epoch=0) == 4  # the new epoch starts at zero, epoch 0 is kept
    list(info.loader)
    assert info.skipped_per_epoch() == {0: BAD, 1: BAD}


def test_restart_mid_epoch_counts_the_epoch_so_far_once(spec):
    info = _loader(spec, 0, start=2)  # resume at batch 2: batches 0-1 are read (and skipped over) again
    assert len(list(info.loader)) == 2
    assert info.skipped_by_reason() == BAD
