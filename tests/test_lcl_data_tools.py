"""data_tools.make_interleaved_shards (MMC4 jsonl + images, markdown folders; bad input skipped and counted) and
data_tools.make_demo_docs (the digits as interleaved documents), read back through the LCL loader."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from open_clip.tokenizer import SimpleTokenizer
from PIL import Image
from torchvision import transforms as T

from data_tools import make_demo_docs
from data_tools import make_interleaved_shards as mis
from evaclip.config import DataCfg
from evaclip.data.interleaved import LCLDataCfg, build_lcl_loader
from evaclip.models.lcl_tokens import LCLTokens

ROOT = Path(__file__).resolve().parents[1]
IDS = LCLTokens()
PRE = T.Compose([T.Resize(8), T.CenterCrop(8), T.ToTensor()])


def _img(path, v):
    Image.fromarray(np.full((20, 30, 3), v, np.uint8)).save(path)


def _samples(spec):
    return list(wds.WebDataset(spec, shardshuffle=False))


def _mmc4_doc(url, texts, images):
    return {"url": url, "text_list": texts, "similarity_matrix": [[0.1]],
            "image_info": [{"image_name": n, "raw_url": f"http://x/{n}", "matched_text_index": j, "matched_sim": s}
                           for n, j, s in images]}


@pytest.fixture()
def mmc4(tmp_path):
    imgs = tmp_path / "images"
    imgs.mkdir()
    for k in range(4):
        _img(imgs / f"i{k}.jpg", 40 * k)
    (imgs / "corrupt.jpg").write_bytes(b"\xff\xd8 truncated")
    docs = [
        _mmc4_doc("a", ["A cat sits.", "It sleeps."], [("i0.jpg", 0, 0.31), ("i1.jpg", 1, 0.2)]),
        _mmc4_doc("b", ["Only a corrupt image."], [("corrupt.jpg", 0, 0.5)]),
        _mmc4_doc("c", ["", "   "], [("i2.jpg", 0, 0.5)]),
        _mmc4_doc("d", ["One sentence."], [("i2.jpg", 0, 0.5), ("i3.jpg", 4, 0.5), ("gone.jpg", 0, 0.4)]),
    ]
    lines = [json.dumps(d) for d in docs] + ["{broken json", json.dumps({"no_text_list": 1})]
    (tmp_path / "docs_shard_0_v2.jsonl").write_text("\n".join(lines[:3]) + "\n")
    with zipfile.ZipFile(tmp_path / "docs_shard_1_v2.jsonl.zip", "w") as z:
        z.writestr("docs_shard_1_v2.jsonl", "\n".join(lines[3:]) + "\n")
    return tmp_path


def test_mmc4_jsonl_and_zip_to_shards_with_bad_input_counted(mmc4):
    out = mmc4 / "out"
    rc = mis.main([str(mmc4 / "docs_shard_0_v2.jsonl"), str(mmc4 / "docs_shard_1_v2.jsonl.zip"), str(out),
                   "--images", str(mmc4 / "images"), "--workers", "1", "--quiet"])
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["inputs"] == 6 and s["written"] == 2 and s["images"] == 3
    assert s["skipped"] == {"no image": 1, "no text": 1, "bad json": 2}
    assert s["images_dropped"] == {"unreadable image": 1, "bad image index": 1, "missing file": 1}
    got = {json.loads(x["json"])["url"]: x for x in _samples(str(out / "00000.tar"))}
    a = json.loads(got["a"]["json"])
    assert a["texts"] == ["A cat sits.", "It sleeps."]
    # the similarity is kept as it is: the threshold is the loader's (a setting of the run)
    assert [(e["file"], e["sentence"], e["similarity"]) for e in a["images"]] == [("0.jpg", 0, 0.31),
                                                                                 ("1.jpg", 1, 0.2)]
    assert Image.open(__import__("io").BytesIO(got["a"]["1.jpg"])).size == (30, 20)
    d = json.loads(got["d"]["json"])
    assert [e["source"].endswith("i2.jpg") for e in d["images"]] == [True]
    # read back: doc a keeps only its image above 0.24, doc d its one image
    info = build_lcl_loader(DataCfg(batch_size=2, workers=0, shuffle_buffer=0), LCLDataCfg(docs=str(out),
                            context_length=32), PRE, SimpleTokenizer(), image_tokens=4, pin_memory=False)
    (batch,) = list(info.loader)
    assert batch.images_NCHW.shape[0] == 2 and (batch.tokens_BL == IDS.boi).sum() == 2
    assert info.skipped() == 0


def test_markdown_folder_to_shards(tmp_path):
    md = tmp_path / "md"
    (md / "sub").mkdir(parents=True)
    _img(md / "a.png", 10)
    _img(md / "sub" / "b.png", 20)
    (md / "broken.png").write_bytes(b"nope")
    (md / "one.md").write_text("![cover](a.png)\n\n# A title\n\nFirst line. Second line!\n\n"
                               "![inline](sub/b.png) Third line? Fourth.\n")
    (md / "sub" / "two.md").write_text("Text with a broken image ![x](../broken.png) and nothing else.\n")
    (md / "three.md").write_text("No image at all.\n")
    out = tmp_path / "out"
    assert mis.main([str(md), str(out), "--workers", "2", "--quiet", "--format", "png"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["written"] == 1 and s["skipped"] == {"no image": 2} and s["images_dropped"] == {"unreadable image": 1}
    (doc,) = _samples(str(out / "00000.tar"))
    j = json.loads(doc["json"])
    assert j["texts"] == ["A title", "First line.", "Second line!", "Third line?", "Fourth."]
    assert [(e["file"], e["sentence"], e["where"], e["similarity"]) for e in j["images"]] == [
        ("0.png", 0, "before", None), ("1.png", 2, "after", None)]
    assert "0.png" in doc and "1.png" in doc


def test_cli_errors_are_one_line(tmp_path, mmc4):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "data_tools.make_interleaved_shards", *map(str, args)],
                              cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})

    r = run(mmc4 / "docs_shard_0_v2.jsonl", tmp_path / "o")
    assert r.returncode == 2 and "needs --images" in r.stderr and "Traceback" not in r.stderr
    r = run(tmp_path / "nothere", tmp_path / "o")
    assert r.returncode == 2 and "input not found" in r.stderr
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    r = run(mmc4 / "docs_shard_0_v2.jsonl", tmp_path / "full", "--images", mmc4 / "images")
    assert r.returncode == 2 and "not empty" in r.stderr


def test_demo_documents_are_deterministic_and_load(tmp_path):
    a = make_demo_docs.make_demo_docs(str(tmp_path / "a"), seed=0, docs_per_digit=1, samples_per_shard=200)
    make_demo_docs.make_demo_docs(str(tmp_path / "b"), seed=0, docs_per_digit=1, samples_per_shard=200)
    for split in ("docs", "docs_val"):
        fa = sorted((tmp_path / "a" / split).glob("*.tar"))
        assert fa and [f.read_bytes() for f in fa] == [(tmp_path / "b" / split / f.name).read_bytes() for f in fa]
    assert a["docs_num_samples"] > 0 and a["docs_val_num_samples"] > 0
    # several digits per document, each image next to a sentence naming it
    docs = _samples(a["docs"])
    for s in docs[:20]:
        j = json.loads(s["json"])
        assert len(j["images"]) >= 2
        for e in j["images"]:
            assert make_demo_docs.CLASSNAMES[e["label"]] in j["texts"][e["sentence"]] or \
                str(e["label"]) in j["texts"][e["sentence"]]
    # the held-out documents use digits the training documents never show
    train_ids = {e["digit"] for s in docs for e in json.loads(s["json"])["images"]}
    val_ids = {e["digit"] for s in _samples(a["docs_val"]) for e in json.loads(s["json"])["images"]}
    assert train_ids and val_ids and not train_ids & val_ids
    info = build_lcl_loader(DataCfg(batch_size=8, workers=0, shuffle_buffer=0),
                            LCLDataCfg(docs=a["docs"], context_length=64), PRE, SimpleTokenizer(), image_tokens=4,
                            pin_memory=False)
    batch = next(iter(info.loader))
    assert batch.images_NCHW.shape[0] == int((batch.tokens_BL == IDS.boi).sum()) > 8
