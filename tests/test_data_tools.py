"""data_tools: make_shards (every input kind, cleaning, resizing, dedup, bad inputs), inspect_shards, make_demo."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import subprocess
import sys
import time

import numpy as np
import open_clip
import pytest
import webdataset as wds
from PIL import Image

from data_tools import inspect_shards, make_demo, make_shards
from data_tools.common import ShardSink, clean_caption
from evaclip.evals.data import build_eval_loader, resolve_zeroshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(spec):
    return list(wds.WebDataset(spec, shardshuffle=False, empty_check=False))


@pytest.fixture
def pairs(tmp_path):
    """6 images (one 120x80 PNG with alpha, one exact duplicate, one corrupt) with captions."""
    rng = np.random.default_rng(0)
    d = tmp_path / "imgs"
    d.mkdir()
    rows = []
    for i in range(4):
        p = d / f"im{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(p)
        rows.append((str(p), f"  a   photo\tof {i} "))
    big = d / "big.png"
    Image.fromarray(rng.integers(0, 255, (80, 120, 4), dtype=np.uint8), "RGBA").save(big)
    rows.append((str(big), "caf\u00c3\u00a9 &amp; bar"))  # mojibake + HTML entity, fixed by ftfy
    (d / "dup.jpg").write_bytes((d / "im0.jpg").read_bytes())
    rows.append((str(d / "dup.jpg"), "a duplicate"))
    (d / "bad.jpg").write_bytes(b"\xff\xd8 definitely not an image")
    rows.append((str(d / "bad.jpg"), "corrupt"))
    rows.append((str(d / "im1.jpg"), "   "))  # empty caption
    rows.append((str(d / "missing.jpg"), "no such file"))
    return d, rows


def test_clean_caption():
    assert clean_caption("  caf\u00c3\u00a9 \n\t &amp;  co ") == "café & co"
    assert clean_caption(" \n ") == ""


@pytest.mark.parametrize("kind", ["csv", "tsv", "jsonl", "parquet"])
def test_make_shards_from_tables(tmp_path, pairs, kind):
    d, rows = pairs
    table = tmp_path / f"pairs.{kind}"
    if kind in ("csv", "tsv"):
        with open(table, "w", newline="") as f:
            w = csv.writer(f, delimiter="\t" if kind == "tsv" else ",")
            w.writerow(["filepath", "caption"])
            # relative paths resolve against the table's folder
            w.writerows([(os.path.relpath(p, tmp_path), c) for p, c in rows])
    elif kind == "jsonl":
        table.write_text("".join(json.dumps({"image": p, "text": c}) + "\n" for p, c in rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"path": [p for p, _ in rows], "title": [c for _, c in rows]}), table)
    out = tmp_path / "out"
    rc = make_shards.main([str(table), str(out), "--samples-per-shard", "2", "--max-side", "40", "--workers", "2",
                           "--prefix", "s", "--quiet"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["written"] == 5 and summary["inputs"] == 9 and summary["shards"] == 3
    assert summary["skipped"] == {"duplicate image": 1, "unreadable image": 1, "empty caption": 1,
                                  "unreadable file": 1}
    assert json.loads((out / "sizes.json").read_text()) == {"s-00000.tar": 2, "s-00001.tar": 2, "s-00002.tar": 1}
    samples = _read(summary["spec"])
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(5)]
    caps = [s["txt"].decode() for s in samples]
    assert caps[:4] == [f"a photo of {i}" for i in range(4)] and caps[4] == "café & bar"
    for s in samples:
        img = Image.open(io.BytesIO(s["jpg"]))
        meta = json.loads(s["json"])
        assert img.format == "JPEG" and img.mode == "RGB" and min(img.size) <= 40
        assert list(img.size) == [meta["width"], meta["height"]]
    big = json.loads(samples[4]["json"])
    assert (big["original_width"], big["original_height"], big["width"], big["height"]) == (120, 80, 60, 40)
    # small RGB JPEGs are copied byte for byte (no generation loss)
    assert samples[0]["jpg"] == open(rows[0][0], "rb").read()
    assert json.loads(samples[0]["json"])["sha1"] == hashlib.sha1(samples[0]["jpg"]).hexdigest()


def test_make_shards_from_folder_with_sidecar_captions(tmp_path, pairs, capsys):
    d, _ = pairs
    for i in range(4):
        (d / f"im{i}.txt").write_text(f"caption {i}\n")
    (d / "big.txt").write_text("big one")
    (d / "bad.txt").write_text("bad one")  # dup.jpg has no caption file -> empty caption
    out = tmp_path / "out"
    assert make_shards.main([str(d), str(out), "--workers", "1", "--no-dedup", "--format", "png", "--quiet"]) == 0
    samples = _read(str(out / "00000.tar"))
    assert sorted(s["txt"].decode() for s in samples) == ["big one"] + [f"caption {i}" for i in range(4)]
    assert all("png" in s for s in samples)
    printed = capsys.readouterr().out
    assert "wrote 5 of 7" in printed and "bad.jpg: unreadable image" in printed and "dup.jpg: empty caption" in printed


def test_make_shards_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        make_shards.main([str(tmp_path / "nope.csv"), str(tmp_path / "out")])
    assert "input not found" in capsys.readouterr().err
    t = tmp_path / "t.csv"
    t.write_text("file,words\na.jpg,hello\n")
    with pytest.raises(SystemExit, match="caption column"):
        make_shards.main([str(t), str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="no column 'img_path'"):
        make_shards.main([str(t), str(tmp_path / "out"), "--image-col", "img_path"])


def test_inspect_shards_reports_bad_samples_and_plots(tmp_path, capsys):
    good = io.BytesIO()
    Image.new("RGB", (50, 20), "red").save(good, format="JPEG")
    with ShardSink(str(tmp_path / "sh"), 3) as sink:
        sink.write({"__key__": "a", "jpg": good.getvalue(), "txt": "two words"})
        sink.write({"__key__": "b", "jpg": good.getvalue()[:40], "txt": "truncated"})
        sink.write({"__key__": "c", "jpg": good.getvalue(), "txt": ""})
        sink.write({"__key__": "d", "txt": "no image"})
        sink.write({"__key__": "e", "jpg": good.getvalue(), "txt": "a b c d"})
    png = tmp_path / "hist.png"
    rc = inspect_shards.main([str(tmp_path / "sh"), "--plot", str(png), "--json", str(tmp_path / "r.json"),
                              "--workers", "2", "--strict", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "5 samples in 2 shard(s): 2 good, 3 bad" in out
    r = json.loads((tmp_path / "r.json").read_text())
    bad = {(os.path.basename(b["shard"]), b["key"]): b["reason"] for b in r["bad"]}
    assert set(bad) == {("00000.tar", "b"), ("00000.tar", "c"), ("00001.tar", "d")}
    assert bad[("00000.tar", "b")].startswith("unreadable jpg") and "caption" in bad[("00000.tar", "c")]
    assert r["caption_words"]["min"] == 2 and r["caption_words"]["max"] == 4 and r["width"]["median"] == 50
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert inspect_shards.main([str(tmp_path / "sh" / "{00000..00003}.tar"), "--quiet"]) == 2  # missing shards


def test_inspect_shards_plot_has_one_bar_per_word_count(tmp_path, monkeypatch):
    import matplotlib.axes

    words = [2, 3, 3, 4, 7, 7, 7, 12]  # 2..12: eleven counts, some absent; a 50-bin cap must not merge any
    seen = []
    real_hist = matplotlib.axes.Axes.hist

    def spy(self, x, bins=None, **kw):
        seen.append((x, bins))
        return real_hist(self, x, bins=bins, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "hist", spy)
    inspect_shards.plot_histograms(words, [10] * len(words), [32] * len(words), [32] * len(words),
                                   str(tmp_path / "h.png"))
    x, bins = seen[0]  # the caption-length (words) histogram
    counts, edges = np.histogram(x, bins=bins)
    assert np.allclose(np.diff(edges), 1) and np.allclose(edges[:-1] + 0.5, np.arange(2, 13))
    assert counts.tolist() == [1, 2, 1, 0, 0, 3, 0, 0, 0, 0, 1]
    # long captions too: one bar per count even past 50 distinct counts
    assert len(inspect_shards.word_bins(list(range(1, 80)))) == 80


def test_inspect_shards_glob_spec_is_one_line(tmp_path, capsys):
    with ShardSink(str(tmp_path / "sh"), 2) as sink:
        sink.write({"__key__": "a", "png": _png_bytes(), "txt": "x"})
    assert inspect_shards.main([str(tmp_path / "sh" / "*.tar"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "glob" in err and "braces" in err


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), "blue").save(buf, format="PNG")
    return buf.getvalue()


def test_tools_run_as_modules_with_help():
    for tool in ("make_shards", "inspect_shards", "make_demo"):
        with pytest.raises(SystemExit) as e:
            sys.modules[f"data_tools.{tool}"].main(["--help"])
        assert e.value.code == 0
    r = subprocess.run([sys.executable, "-m", "data_tools.make_demo", "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "zeroshot" in r.stdout


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    t0 = time.process_time()  # CPU time: wall time on a shared, oversubscribed CI box says little
    info = make_demo.make_demo(str(out), seed=0, show_progress=False)
    return out, info, time.process_time() - t0


def test_make_demo_builds_fast_with_the_expected_layout(demo):
    out, info, seconds = demo
    assert seconds < 60
    assert info["train_num_samples"] == info["sklearn_indices"]["train"] * info["copies_per_train_digit"]
    zs = out / "zeroshot"
    assert (zs / "classnames.txt").read_text().split() == list(make_demo.CLASSNAMES)
    templates = (zs / "zeroshot_classification_templates.txt").read_text().splitlines()
    assert templates and all("{c}" in t for t in templates)
    train_forms = {t.format(w="{c}", n="{c}") for t in make_demo.TRAIN_TEMPLATES}
    assert not train_forms & set(templates), "held-out templates must differ from training templates"
    assert (zs / "test" / "nshards.txt").read_text().strip() == "1"
    train = _read(info["train"])
    assert len(train) == info["train_num_samples"]
    caps = [s["txt"].decode() for s in train]
    # both the word and the numeral name the digit in the training captions
    assert any("seven" in c for c in caps) and any(c.endswith(" 7") or c == "7" for c in caps)
    for s in train[:200]:
        meta = json.loads(s["json"])
        c = s["txt"].decode()
        assert make_demo.CLASSNAMES[meta["label"]] in c or str(meta["label"]) in c
        assert Image.open(io.BytesIO(s["png"])).size == (32, 32)
    # held-out sets are disjoint from training by sklearn index
    train_idx = {json.loads(s["json"])["sklearn_index"] for s in train}
    zs_keys = {int(s["__key__"][1:]) for s in _read(info["zeroshot_shards"])}
    rt_keys = {int(s["__key__"][1:]) for s in _read(info["retrieval_shards"])}
    assert len(zs_keys) == info["zeroshot_num_samples"] and len(rt_keys) == info["retrieval_num_samples"]
    assert not (train_idx & zs_keys) and not (train_idx & rt_keys) and not (zs_keys & rt_keys)
    assert len(train_idx | zs_keys | rt_keys) == 1797


def test_make_demo_zeroshot_set_loads_with_labels(demo):
    out, info, _ = demo
    from sklearn.datasets import load_digits

    y = load_digits().target
    evset = resolve_zeroshot(info["zeroshot"])
    assert len(evset.classnames) == 10
    loader = build_eval_loader(evset, open_clip.image_transform(32, is_train=False), batch_size=128, workers=0)
    labels, positions = [], []
    for idx_B, images_BCHW, labels_B in loader:
        assert images_BCHW.shape[1:] == (3, 32, 32)
        labels += labels_B.tolist()
        positions += idx_B.tolist()
    assert positions == list(range(len(labels)))
    assert len(labels) == info["zeroshot_num_samples"]
    held_out = make_demo.split_indices(len(y), seed=0, zeroshot_frac=0.2, retrieval_frac=0.1)["zeroshot"]
    assert labels == [int(y[i]) for i in held_out]  # the held-out digits, in order, with their true labels


def test_make_demo_retrieval_split_carries_classes_for_class_aware_recall(demo):
    """Retrieval captions name only the digit, so they repeat across images (instance i2t R@1 is about 0 for any
    model); each sample also carries its class id, which evaclip eval turns into class-aware recall."""
    from sklearn.datasets import load_digits

    _, info, _ = demo
    y = load_digits().target
    samples = _read(info["retrieval_shards"])
    assert all(int(s["cls"]) == int(y[int(s["__key__"][1:])]) for s in samples)
    caps = [s["txt"].decode() for s in samples]
    assert len(set(caps)) < len(caps) / 3  # shared captions: why instance recall cannot be the demo's figure
    for s in samples[:50]:
        assert make_demo.CLASSNAMES[int(s["cls"])] in s["txt"].decode()


def test_make_demo_is_deterministic(tmp_path, demo):
    _, info, _ = demo
    a = make_demo.make_demo(str(tmp_path / "a"), seed=0, copies=1, show_progress=False)
    b = make_demo.make_demo(str(tmp_path / "b"), seed=0, copies=1, show_progress=False)
    digest = lambda p: hashlib.sha1(open(p, "rb").read()).hexdigest()
    train0 = lambda i: os.path.join(os.path.dirname(i["train"]), "train-00000.tar")
    zs0 = lambda i: i["zeroshot_shards"].replace("{0..0}", "0")
    assert digest(train0(a)) == digest(train0(b))
    # the held-out sets depend on the seed only, not on the number of training copies
    assert digest(zs0(a)) == digest(zs0(b)) == digest(zs0(info))


# ----------------------------------------------------------------------------------------------------------------------
# a reused output folder; image-only shards in the tools; --help
# ----------------------------------------------------------------------------------------------------------------------
def _captioned_folder(root, n):
    rng = np.random.default_rng(n)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(root / f"im{i}.png")
        (root / f"im{i}.txt").write_text(f"caption {i}")
    return root


def test_make_shards_refuses_a_reused_output_folder_and_overwrite_removes_only_its_own_files(tmp_path, capsys):
    """The issue's case: a rerun with fewer shards into the same folder left the earlier shards beside the new
    sizes.json. Now it is refused; --overwrite removes what make_shards wrote there (nothing else), and
    inspect_shards names a tar its folder's sizes.json does not list."""
    out = tmp_path / "out"
    args = ["--samples-per-shard", "2", "--workers", "1", "--quiet"]
    assert make_shards.main([str(_captioned_folder(tmp_path / "a", 6)), str(out), *args]) == 0
    assert sorted(json.loads((out / "sizes.json").read_text())) == ["00000.tar", "00001.tar", "00002.tar"]
    (out / "notes.md").write_text("mine")
    small = _captioned_folder(tmp_path / "b", 2)
    with pytest.raises(SystemExit) as e:
        make_shards.main([str(small), str(out), *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "is not empty" in err and "--overwrite" in err
    assert make_shards.main([str(small), str(out), *args, "--overwrite"]) == 0
    assert sorted(os.listdir(out)) == ["00000.tar", "notes.md", "sizes.json", "summary.json"]
    from evaclip.data.shards import expand_spec

    assert expand_spec(str(out)) == [[str(out / "00000.tar")]]  # what a folder spec trains on: the new shard only
    # a tar the index does not list (an earlier run's leftover, copied in by hand) is reported; --strict fails
    (out / "00007.tar").write_bytes((out / "00000.tar").read_bytes())
    capsys.readouterr()
    assert inspect_shards.main([str(out), "--quiet", "--workers", "1", "--strict"]) == 1
    assert f"NOT IN sizes.json: {out / '00007.tar'}" in capsys.readouterr().out
    assert inspect_shards.inspect(str(out / "00000.tar"), show_progress=False)["not_in_sizes_json"] == [
        str(out / "00007.tar")]


def test_image_only_shards_in_the_tools(tmp_path, capsys):
    """make_shards on an uncaptioned folder says to pass --images-only; inspect_shards takes the image-only shards
    as good (sizes and classes reported and plotted); `evaclip eval --zeroshot` finds the classnames.txt beside them."""
    src = tmp_path / "src"
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (src / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (10, 14, 3), dtype=np.uint8)).save(src / c / f"{i}.png")
    with pytest.raises(SystemExit):
        make_shards.main([str(src), str(tmp_path / "o"), "--workers", "1", "--quiet"])
    err = capsys.readouterr().err
    assert "no captions" in err and "--images-only" in err
    out = tmp_path / "img"
    assert make_shards.main([str(src), str(out), "--images-only", "--workers", "1", "--quiet"]) == 0
    capsys.readouterr()
    png = tmp_path / "h.png"
    assert inspect_shards.main([str(out), "--quiet", "--workers", "1", "--strict", "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    assert "6 samples in 1 shard(s) (image-only: no captions): 6 good, 0 bad" in printed
    assert "classes: 2" in printed and "BAD" not in printed
    r = inspect_shards.inspect(str(out), show_progress=False)
    assert r["classes"] == {0: 3, 1: 3} and r["width"]["median"] == 14
    assert Image.open(png).size[0] > Image.open(png).size[1]  # two panels: sizes and classes
    assert resolve_zeroshot(str(out)).classnames == ["cat", "dog"]
    assert resolve_zeroshot(str(out / "00000.tar")).classnames == ["cat", "dog"]


@pytest.mark.parametrize("tool", ["make_shards", "inspect_shards"])
def test_tool_help_gives_every_option_a_help_and_its_default(tool, capsys):
    parser = sys.modules[f"data_tools.{tool}"].build_parser()
    text = parser.format_help()
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, action.option_strings
            if action.default is not None and not isinstance(action.default, bool):
                assert f"(default: {action.default})" in " ".join(text.split()), action.option_strings
    if tool == "make_shards":  # the size option says which side it caps; the old name still works
        assert parser.parse_args(["a", "b", "--max-side", "64"]).max_shorter_side == 64
        assert "SHORTER side" in text
