"""``python -m evaclip.demo_lcl``: LCL against CLIP from scratch on the digits at equal image-side FLOPs per step."""
from __future__ import annotations

import json

import pytest

from evaclip import demo_lcl


def test_clip_batch_gives_the_lcl_step_image_side_flops():
    flops = {a: demo_lcl.tower_flops_per_image(a, batch=2) for a in ("clip", "lcl")}
    # the same trunk; LCL's readout reads every patch (pooler, per-patch latents), CLIP's last block the CLS only
    assert flops["clip"]["trunk"] == flops["lcl"]["trunk"]
    assert flops["lcl"]["whole"] > flops["clip"]["whole"]
    per_step = {"steps": 300, "images": 300 * 222, "mean": 222.0, "rows": 128}
    b = demo_lcl.clip_batch_size(per_step, flops)
    lcl_g, clip_g = 222.0 * flops["lcl"]["whole"], b * flops["clip"]["whole"]
    assert abs(clip_g - lcl_g) <= flops["clip"]["whole"] / 2  # equal up to CLIP's batch rounding
    rows = [{"seed": 0, "steps": 300, "seconds": dict.fromkeys(demo_lcl.ARMS, 10.0),
             "zeroshot": {"lcl": {100: 0.5, 300: 0.9}, "lcl_c0": {300: 0.1}, "clip": {300: 0.8}},
             "knn": {"lcl": {300: 0.95}, "lcl_c0": {300: 0.9}, "clip": {300: 0.85}}}]
    table = demo_lcl.lcl_table(rows, per_step, flops)
    assert "| 0 | LCL (generation 1.0 + contrastive 0.1) | 50.0 | 90.0 | 95.0 | 10 |" in table
    assert "| 0 | CLIP from scratch | - | 80.0 | 85.0 | 10 |" in table
    assert f"CLIP {b} (its batch)" in table


@pytest.mark.slow
def test_demo_lcl_end_to_end_on_the_digits(digits, tmp_path):
    """Every arm trains one step on the digits and is evaluated (zero-shot through its own text side, k-NN of its
    image embedding); the table lands between its markers; a second invocation finds the finished runs."""
    from data_tools.make_demo_docs import make_demo_docs

    data = tmp_path / "data"  # the digits' demo.json (its shard paths point to the fixture's folder) + documents
    data.mkdir()
    (data / "demo.json").write_text(json.dumps(digits))
    make_demo_docs(str(data), seed=0, docs_per_digit=1, samples_per_shard=200)
    table = tmp_path / "T.md"
    table.write_text("# x\n")
    argv = ["max_steps=1", "optim.warmup_steps=0", "data.batch_size=8", "eval.batch_size=256", "--data", str(data),
            "--runs", str(tmp_path / "runs"), "--seeds", "0", "--table", str(table)]
    # --arms: one run of the seed, no table; the full invocation then finds that run finished and trains the others
    assert demo_lcl.main([*argv, "--arms", "clip"]) == 0
    assert (tmp_path / "runs" / "seed0" / "clip").is_dir() and not (tmp_path / "runs" / "seed0" / "lcl").exists()
    assert table.read_text() == "# x\n"
    assert demo_lcl.main(argv) == 0
    clip_events = [json.loads(x).get("event") for x in
                   (tmp_path / "runs" / "seed0" / "clip" / "metrics.jsonl").read_text().splitlines()]
    assert clip_events.count("start") == 1  # trained once, by the --arms call
    text = table.read_text()
    assert text.startswith("# x\n") and demo_lcl.TABLE_BEGIN in text and demo_lcl.TABLE_END in text
    for a in demo_lcl.ARMS:
        assert demo_lcl.LABELS[a] in text
    per_step = json.loads((tmp_path / "runs" / "lcl_images_per_step_1.json").read_text())
    assert per_step["rows"] == 8 and per_step["mean"] > 8  # document rows hold several images
    flops = {a: demo_lcl.tower_flops_per_image(a) for a in ("clip", "lcl")}
    clip_cfg = (tmp_path / "runs" / "seed0" / "clip" / "config.yaml").read_text()
    assert f"batch_size: {demo_lcl.clip_batch_size(per_step, flops)}" in clip_cfg  # not the 8 given to every run
    assert demo_lcl.main(argv) == 0  # finds the finished runs
