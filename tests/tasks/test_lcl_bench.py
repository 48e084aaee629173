"""``evaclip bench lcl``: the LCL step beside the CLIP step on the tiny model (the harness, not the figures)."""
from __future__ import annotations

from evaclip.bench import lcl as lcl_bench
from evaclip.bench.__main__ import main as bench_main
from evaclip.models.lcl_tokens import LCLTokens


def test_synthetic_rows_are_loader_rows_that_fill_the_context():
    ids = LCLTokens()
    images, tokens, L = lcl_bench.synthetic_rows(3, 2, 5, image_tokens=4, image_size=8)
    assert images.shape == (6, 3, 8, 8) and tokens.shape == (3, L) and L == 2 + 2 * (5 + 6) + 5
    for r in tokens.tolist():
        assert r[0] == ids.sot and r[-1] == ids.eot and r.count(ids.boi) == 2 and r.count(ids.image) == 8
        assert ids.pad not in r


def test_lcl_bench_rows_on_the_tiny_model(tmp_path):
    rep = bench_main(["lcl", "--model", "EVA02-CLIP-tiny", "--rows", "2", "--images-per-row", "2",
                      "--text-per-image", "4", "--steps", "1", "--rounds", "1", "--device", "cpu",
                      "--out", str(tmp_path)])
    (sec,) = rep["sections"]
    lcl, clip = sec["rows"]
    assert (lcl["task"], clip["task"]) == ("lcl", "clip")
    assert lcl["images"] == clip["images"] == 4 and lcl["rows"] == 2 and clip["rows"] == 4
    for r in (lcl, clip):
        assert r["images_per_s"] > 0 and r["step_ms"] > 0 and r["gflops_per_image"] > 0 and r["mfu_pct"] > 0
    assert 0 < lcl["lm_ms"] and 0 < lcl["lm_share_pct"] < 100
    # the LCL step runs the LM over whole rows and a vocabulary-wide head: more work per image than CLIP's
    assert lcl["gflops_per_image"] > clip["gflops_per_image"]
    assert (tmp_path / "lcl.md").is_file() and "LM % of step" in (tmp_path / "lcl.md").read_text()
