"""The benchmark harness (not the figures): FLOP counting, peak meter, report files, the train step on a tiny model.

No timing assertions: the machine is shared; figures live in docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import weakref

import pytest
import torch
from torch import nn

from evaclip.bench import flops, measure, report
from evaclip.bench import train as train_bench
from evaclip.bench.__main__ import ALL_ARGS, BENCHMARKS, GPU_CHECK_ARGS, GPU_CHECK_TRAIN_ARGS, parser
from evaclip.bench.__main__ import main as bench_main
from evaclip.models.attention import Attend


def test_count_flops_matches_the_analytic_linear_count():
    lin = nn.Linear(32, 16, bias=False)
    x = torch.randn(8, 32)

    def step():
        lin(x).sum().backward()

    # forward 2·B·in·out; backward: grad wrt weight (input has no grad) 2·B·in·out
    assert flops.count_flops(step) == 2 * (2 * 8 * 32 * 16)


def test_matmul_peak_and_mfu():
    peak = flops.matmul_peak_flops("cpu", torch.float32, size=128, min_seconds=0.01, rounds=1)
    assert peak > 0
    assert flops.mfu(1e9, 0.5, 4e9) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="positive"):
        flops.mfu(1e9, 0.0, 1e9)
    with pytest.raises(ValueError, match="size"):
        flops.matmul_peak_flops("cpu", torch.float32, size=8)


def test_peak_memory_sees_a_large_cpu_allocation():
    measure.release_host_memory()
    with measure.PeakMemory("cpu", interval_s=0.001) as mem:
        x = torch.ones(64 * 2 ** 20 // 4)  # 64 MiB, touched so it is resident
        x.add_(1)
        del x
    assert mem.peak_bytes >= 48 * 2 ** 20


def test_report_writes_json_and_markdown(tmp_path):
    sec = report.section("T", [("a", "A"), ("b", "B")], [{"a": 1.23456, "b": None}, {"a": 1234.5, "b": "x|y"}],
                         ["a note"])
    rep = {"title": "t", "machine": report.machine_info("cpu"), "sections": [sec], "command": "cmd"}
    j, m = report.write_report(rep, tmp_path, "t")
    assert json.loads(j.read_text())["sections"][0]["rows"][0]["a"] == 1.23456
    md = m.read_text()
    assert "| A | B |" in md and "| 1.23 | - |" in md and "| 1,234 | x\\|y |" in md and "- a note" in md
    assert rep["machine"]["cpu_cores"] >= 1 and rep["machine"]["torch"] == torch.__version__


class _FakeRunner:
    def __init__(self, b: int, fits_up_to: int):
        self.b, self.fits_up_to = b, fits_up_to

    def step(self):
        if self.b > self.fits_up_to:
            raise torch.cuda.OutOfMemoryError("fake OOM")


def test_find_max_batch_bisects_to_the_largest_fitting_multiple():
    tried = []

    def make(b):
        tried.append(b)
        return _FakeRunner(b, 300)

    # The device check is what stops CPU runs; the search itself only needs OutOfMemoryError.
    assert train_bench.find_max_batch(make, torch.device("cuda"), start=32, multiple=8) == 296
    assert tried[:5] == [32, 64, 128, 256, 512]
    with pytest.raises(ValueError, match="cuda"):
        train_bench.find_max_batch(make, torch.device("cpu"))


def test_bad_arguments_fail_with_a_clear_message():
    with pytest.raises(ValueError, match="token-drop"):
        train_bench.bench_train(train_bench.TrainBenchCfg(token_drop=[1.0]))
    with pytest.raises(ValueError, match="--vs"):
        train_bench.bench_train(train_bench.TrainBenchCfg(vs="timm"))
    with pytest.raises(ValueError, match="precision"):
        train_bench.resolve_dtype("fp8", torch.device("cpu"))
    with pytest.raises(SystemExit):
        bench_main(["nonsense"])


def test_every_benchmark_is_one_subcommand_of_one_parser():
    # add_args + DESCRIPTION + run(args) -> section: the whole interface; every option says what it does
    p = parser()
    subs = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(subs) == {*BENCHMARKS, "all", "gpu-check"}
    for name, sub in subs.items():
        assert sub.prog == f"evaclip bench {name}" and sub.description and "``" not in sub.description
        missing = [a.option_strings[0] for a in sub._actions if a.option_strings and not a.help]
        assert not missing, f"bench {name} options without help: {missing}"
    for name, mod in BENCHMARKS.items():
        assert callable(mod.run) and callable(mod.add_args) and "\n" not in mod.DESCRIPTION, name
    # what `all` and `gpu-check` run parses through the same parsers (a typo would only show on the big machine)
    for name, argvs in ALL_ARGS.items():
        for argv in argvs:
            assert p.parse_args([name, *argv]).what == name
    for name, argv in GPU_CHECK_ARGS.items():
        assert p.parse_args([name, *argv]).what == name
    check = p.parse_args(["gpu-check", "--batch", "64", "--out", "x"])
    assert (check.batch, check.precision, check.token_drop, check.out) == ("64", "bf16", [0.0, 0.5], "x")
    assert vars(check) == {**vars(p.parse_args(["train", *GPU_CHECK_TRAIN_ARGS, "--batch", "64", "--out", "x"])),
                           "what": "gpu-check"}


def test_attention_bench_through_the_cli_matches_eager(tmp_path):
    from evaclip.cli import main as evaclip_main

    assert evaclip_main(["bench", "attention", "--device", "cpu", "--seq", "17", "--head-dim", "8", "--batch", "1",
                         "--heads", "2", "--iters", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "attention.json").read_text())["sections"][0]["rows"]
    assert {r["backend"] for r in rows} == {"eager", "sdpa"}
    for r in rows:
        assert r["ms"] > 0 and r["gflops"] > 0 and r["max_err"] < 1e-5
    assert "| sdpa | 17 | 8 |" in (tmp_path / "attention.md").read_text()


@pytest.mark.slow
def test_mim_bench_smoke_on_the_tiny_model(tmp_path):
    rep = bench_main(["mim", "--student", "EVA02-CLIP-tiny", "--teacher", "EVA02-CLIP-tiny", "--batch", "2",
                      "--steps", "1", "--rounds", "1", "--device", "cpu", "--out", str(tmp_path)])
    (row,) = rep["sections"][0]["rows"]
    assert (row["student"], row["teacher"], row["precision"], row["batch"]) == ("EVA02-CLIP-tiny", "EVA02-CLIP-tiny",
                                                                                "fp32", 2)
    for key in ("images_per_s", "step_ms", "teacher_ms", "gflops_per_image", "mfu_pct"):
        assert row[key] > 0, (key, row)
    assert 0 < row["teacher_share_pct"] < 100
    assert json.loads((tmp_path / "mim.json").read_text())["sections"][0]["rows"][0]["student"] == "EVA02-CLIP-tiny"
    assert "MIM step: EVA02-CLIP-tiny student" in (tmp_path / "mim.md").read_text()


@pytest.mark.slow
def test_data_bench_side_runs_in_its_own_process(tmp_path):
    from PIL import Image

    from data_tools.common import ShardSink, encode_image
    from evaclip.bench import data as data_bench

    sink = ShardSink(str(tmp_path), 8, prefix="s")
    for i in range(16):
        sink.write({"__key__": f"{i:04d}", "png": encode_image(Image.new("RGB", (32, 32), (i * 15, 0, 0)), "png"),
                    "txt": f"red {i}"})
    sink.close()
    # `python evaclip/bench/data.py evaclip '{...}'`, as the open_clip venv runs it for the open_clip side
    got = data_bench._measure(sys.executable, "evaclip", spec=sink.shard_spec, num_samples=8, batch_size=2,
                              image_size=32, workers=1)
    assert got["images"] == 4 and got["images_per_s"] > 0, got


def test_data_bench_section_and_budget(tmp_path, monkeypatch):
    from evaclip.bench import data as data_bench
    from evaclip.bench.__main__ import data_budget

    (tmp_path / "demo.json").write_text(json.dumps({"train": "demo-{0..1}.tar"}))
    monkeypatch.setattr(data_bench, "make_large_source", lambda out: "large-{0..1}.tar")
    figures = {("evaclip", "demo-{0..1}.tar"): 400.0, ("open_clip", "demo-{0..1}.tar"): 200.0,
               ("evaclip", "large-{0..1}.tar"): 50.0}
    monkeypatch.setattr(data_bench, "_measure", lambda python, side, spec, **kw: (
        {"images_per_s": figures[side, spec]} if (side, spec) in figures else {"error": "ImportError: no open_clip"}))
    rep = bench_main(["data", "--demo", str(tmp_path), "--openclip-python", sys.executable, "--out", str(tmp_path)])
    sec = rep["sections"][0]
    assert sec["rows"] == [
        {"source": "demo 32x32 PNG", "samples": 2048, "evaclip": 400.0, "open_clip": 200.0, "ratio": 2.0},
        {"source": "1500x1000 JPEG", "samples": 192, "evaclip": 50.0, "open_clip": "ImportError: no open_clip"}]
    assert "| demo 32x32 PNG | 2048 | 400 | 200 | 2 |" in (tmp_path / "data.md").read_text()
    budget = data_budget(sec, cores=16)
    assert [r["decode_per_core"] for r in budget["rows"]] == [400.0, 50.0]
    assert [r["host_samples_s"] for r in budget["rows"]] == [6400.0, 800.0]


@pytest.mark.parametrize("ours,theirs", [("EVA02-CLIP-B-16", "EVA02-B-16"), ("ViTamin-S", "ViTamin-S")])
def test_open_clip_twin_is_open_clips_own_model(ours, theirs):
    """``bench train --vs open_clip`` builds its twin from evaclip's config; for a released shape it must be open_clip's
    own model (its config), key by key, with timm's patch dropout at the benchmarked ratio."""
    import open_clip

    twin = train_bench.open_clip_model(train_bench.model_dims(ours, {}), 0.5, torch.device("meta"))
    ref = open_clip.create_model(theirs, device="meta")
    assert {k: v.shape for k, v in twin.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert twin.visual.trunk.patch_drop.prob == 0.5


@pytest.mark.slow
def test_train_bench_smoke_on_the_tiny_model(tmp_path):
    rep = bench_main(["train", "--model", "EVA02-CLIP-tiny", "--batch", "4", "--token-drop", "0", "0.5", "--vs",
                      "open_clip", "--steps", "1", "--rounds", "2", "--warmup", "0", "--peak-size", "256",
                      "--set", "text.vocab_size=512", "--out", str(tmp_path)])  # small vocab: a fast smoke test
    data = json.loads((tmp_path / "train.json").read_text())
    md = (tmp_path / "train.md").read_text()
    assert data["machine"]["torch"] == torch.__version__ and "Training step: EVA02-CLIP-tiny" in md
    sec = data["sections"][0]
    assert sec == json.loads(json.dumps(rep["sections"][0], default=str))
    rows = sec["rows"]
    assert [(r["impl"], r["optimizer"], r["token_drop"]) for r in rows] == [
        (impl, opt, td) for td in (0.0, 0.5) for impl, opt in
        (("evaclip", "lamb (foreach)"), ("open_clip", "torch_optimizer.Lamb"), ("open_clip", "lamb (foreach)"))]
    for r in rows:
        for key in ("samples_per_s", "step_ms", "gflops_per_sample", "mfu_pct", "params_m"):
            assert r[key] > 0, (key, r)
        assert r["batch"] == 4 and len(r["step_ms_rounds"]) == 2
        if r["optimizer"] != "lamb (foreach)" or r["impl"] == "evaclip":
            assert r["peak_mem_mb"] > 0
    by = {(r["impl"], r["token_drop"]): r for r in rows}
    # Same shapes on both sides: same parameter count; dropping half the patches cuts the counted FLOPs.
    assert by[("evaclip", 0.0)]["params_m"] == pytest.approx(by[("open_clip", 0.0)]["params_m"])
    assert by[("evaclip", 0.5)]["gflops_per_sample"] < by[("evaclip", 0.0)]["gflops_per_sample"]
    assert set(sec["summary"]) == {"speedup_vs_open_clip@drop0.0", "speedup_vs_open_clip_same_optimizer@drop0.0",
                                   "speedup_vs_open_clip@drop0.5", "speedup_vs_open_clip_same_optimizer@drop0.5",
                                   "step_time_ratio_drop0.5_vs_0"}
    assert all(v > 0 for v in sec["summary"].values())


def test_count_flops_counts_attention_on_cpu():
    # torch's counter knows only the CUDA SDPA kernels; the CPU flash kernel must count with torch's SDPA formula:
    # forward 2 matmuls, backward 5 (the flash backward recomputes the scores), each 2·B·H·N²·D.
    b, h, n, d = 2, 3, 16, 8
    q, k, v = (torch.randn(b, h, n, d, requires_grad=True) for _ in range(3))

    def sdpa():
        torch.nn.functional.scaled_dot_product_attention(q, k, v).sum().backward()

    assert flops.count_flops(sdpa) == 7 * 2 * b * h * n * n * d


@pytest.mark.gpu
def test_train_bench_bf16_auto_batch_on_cuda(tmp_path):
    rep = bench_main(["train", "--model", "EVA02-CLIP-tiny", "--batch", "auto", "--precision", "bf16", "--device",
                      "cuda", "--token-drop", "0.5", "--vs", "open_clip", "--steps", "2", "--rounds", "1",
                      "--out", str(tmp_path)])
    rows = rep["sections"][0]["rows"]
    for r in rows:
        assert r["batch"] >= 32 and r["batch"] % 8 == 0
        assert r["samples_per_s"] > 0 and r["mfu_pct"] > 0 and r["host_syncs"] is not None
    # bf16 (no loss scaler): the step's one documented read, apply_update's finite / stop flags (engine/step.py);
    # LAMB, clipping and the forward / backward add none
    assert rows[0]["host_syncs"] == 1, "evaclip's step reads the device once (the bad-step / stop flags)"


@pytest.mark.gpu
def test_attention_bench_on_cuda_bf16():
    rep = bench_main(["attention", "--device", "cuda", "--precision", "bf16", "--seq", "197", "--head-dim", "64",
                      "88", "--iters", "2"])
    rows = rep["sections"][0]["rows"]
    assert {"eager", "sdpa"} <= {r["backend"] for r in rows}
    assert all(r["max_err"] < 5e-2 for r in rows)


# ------------------------------------------------------------------------ issue 15 on a CPU: bench: one model at a time
def _bench_cfg(monkeypatch, **kw):
    monkeypatch.setattr(train_bench, "matmul_peak_flops", lambda *a, **k: 1e12)  # not what these tests are about
    monkeypatch.setattr(train_bench, "_auto_batches", lambda *a, **k: {"evaclip": 2, "open_clip": 2})  # no CUDA

    base = dict(model="EVA02-CLIP-tiny", batch="auto", token_drop=[0.0], device="cpu", precision="fp32", vs="open_clip",
                steps=1, warmup=0, rounds=1, count_flops=False, peak_size=64, overrides={"text.vocab_size": 512})
    return train_bench.TrainBenchCfg(**{**base, **kw})


@pytest.mark.slow
def test_bench_auto_batch_frees_each_model_before_building_the_next(monkeypatch):
    ours, seen = [], []
    make_ours, make_theirs = train_bench._evaclip_model, train_bench.open_clip_model

    def evaclip_model(*a, **k):
        m = make_ours(*a, **k)
        ours.append(weakref.ref(m))
        return m

    def open_clip_model(*a, **k):
        seen.append(sum(r() is not None for r in ours))  # evaclip models alive when open_clip's is built
        return make_theirs(*a, **k)

    monkeypatch.setattr(train_bench, "_evaclip_model", evaclip_model)
    monkeypatch.setattr(train_bench, "open_clip_model", open_clip_model)
    sec = train_bench.bench_train(_bench_cfg(monkeypatch))
    assert seen == [0]  # before: the evaclip runner (weights + LAMB state) was still alive
    assert [(r["impl"], r["optimizer"]) for r in sec["rows"]] == [
        ("evaclip", "lamb (foreach)"), ("open_clip", "torch_optimizer.Lamb"), ("open_clip", "lamb (foreach)")]
    assert all(r["samples_per_s"] > 0 for r in sec["rows"])


@pytest.mark.slow
@pytest.mark.parametrize("batch", ["auto", 2])
def test_bench_out_of_memory_is_a_reported_row(monkeypatch, batch):
    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train_bench, "open_clip_model", oom)
    sec = train_bench.bench_train(_bench_cfg(monkeypatch, batch=batch))  # before: the error ended the run, no report
    rows = sec["rows"]
    assert rows[0]["impl"] == "evaclip" and rows[0]["samples_per_s"] > 0
    assert [r["impl"] for r in rows[1:]] == ["open_clip", "open_clip"]
    assert all(r["error"].startswith("out of memory") for r in rows[1:])
    assert ["error", "error"] in sec["columns"] and sec["summary"] == {}
    gc.collect()


def test_cuda_launch_count_reads_the_multi_tensor_route():
    from torch.profiler import ProfilerActivity, profile

    u = [torch.empty(s, device="meta") for s in ((4, 3), (5,), (2, 2, 2))]
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        torch._foreach_mul_(u, [torch.empty((), device="meta") for _ in u])  # 0-d factors: per tensor
    assert measure.cuda_launches(prof) == (3, {"aten::_foreach_mul_": 3})
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        torch._foreach_mul_(u, 0.5)
        torch._foreach_addcmul_(u, u, u, value=2.0)
    assert measure.cuda_launches(prof) == (2, {})


# ---------------------------------------------------------------------------- issue 15 on a CPU: FLOPs of FA4 attention
def test_count_flops_sees_flash_attention_4(fake_cuda, fake_flash):
    fake_flash(fa2=False, fa4=True)
    b, h, n, d = 2, 3, 16, 8
    q, k, v = (torch.empty(b, n, h, d, device="meta", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    att = Attend("flash_attn")

    def fwd_bwd():
        att(q, k, v).sum().backward()

    # forward 2 matmuls, backward 5, each 2·B·H·N²·D: SDPA's formulas, registered for evaclip's FA4 ops (before
    # issue 22 Attend tallied them; before issue 15: 0, no torch op to see)
    assert flops.count_flops(fwd_bwd) == 7 * 2 * b * h * n * n * d
    with torch.no_grad():
        assert flops.count_flops(lambda: att(q, k, v)) == 2 * 2 * b * h * n * n * d
