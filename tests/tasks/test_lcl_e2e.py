"""LCL end to end, launched as users do (subprocesses, real torchrun with 2 gloo processes) on the digits' pairs and
interleaved documents (``data_tools.make_demo`` / ``make_demo_docs``), tiny model: a run SIGKILLed after a checkpoint
and resumed with ``resume=auto`` logs the uninterrupted run's losses bitwise; the finished run's monitors (zero-shot
through the LM, captioning loss, k-NN of the pooled latent); ``evaclip eval`` and ``evaclip export`` of the run
(the LCL model from the run's config, encoders ``load_encoder`` reads back); the run as a CLIP's ``model.image_init``.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import torch
from subprocess_runs import MODEL, env, records, torchrun

pytestmark = pytest.mark.slow

STEPS, EVERY = 10, 4


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    from data_tools.make_demo_docs import make_demo_docs

    return make_demo_docs(str(tmp_path_factory.mktemp("docs")), seed=0, docs_per_digit=1, samples_per_shard=200)


def _overrides(digits, docs, out_dir, name, *extra):
    return ["demo_lcl_cpu", f"model.name={MODEL}", "model.token_drop=0.5", f"data.train={digits['train']}",
            f"lcl_data.docs={docs['docs']}", "lcl_data.context_length=48", "data.batch_size=8", "data.workers=1",
            "data.shuffle_buffer=64", "device=cpu", f"output_dir={out_dir}", f"name={name}", "log.every=1",
            "log.tensorboard=false", "optim.warmup_steps=2", f"max_steps={STEPS}", f"ckpt.every={EVERY}",
            "ckpt.keep_last=3", f"eval.zeroshot={digits['zeroshot']}", f"lcl.caption_val={digits['retrieval']}",
            f"lcl.knn_train={digits['knn_train']}", f"lcl.knn_val={digits['zeroshot']}", "lcl.knn_k=5",
            "eval.batch_size=64", "eval.workers=1", *extra]


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc): torchrun starts each rank in a session of its own, so neither a
    signal to torchrun nor one to its process group reaches them."""
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids = [int(c) for c in f.read().split()]
        except OSError:
            continue
        for k in kids:
            out += [k] + _descendants(k)
    return out


def _kill_all_ranks_after_checkpoint(ref_cmd, victim_cmd, target, cwd) -> None:
    """Run ``ref_cmd`` to its end beside ``victim_cmd``; SIGKILL the victim's launcher and every rank (a machine lost)
    as soon as its checkpoint folder ``target`` exists (renamed into place: complete)."""
    ref = subprocess.Popen(ref_cmd, cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    victim = subprocess.Popen(victim_cmd, cwd=cwd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 400
    while not target.is_dir() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    ranks = _descendants(victim.pid)
    for pid in ranks + [victim.pid]:
        os.kill(pid, signal.SIGKILL)
    assert victim.wait(timeout=30) == -signal.SIGKILL, "the run finished before it could be killed"
    assert len(ranks) >= 2, f"torchrun had {len(ranks)} worker processes"
    ref_out, _ = ref.communicate(timeout=600)
    assert ref.returncode == 0, ref_out[-3000:]


@pytest.fixture(scope="module")
def runs(digits, docs, tmp_path_factory):
    """An uninterrupted 2-process run ``ref`` and a ``victim`` SIGKILLed once its step-4 checkpoint exists, then
    resumed with resume=auto to the end."""
    out = tmp_path_factory.mktemp("lcl_runs")
    target = out / "victim" / "ckpt" / f"step_{EVERY:08d}"
    _kill_all_ranks_after_checkpoint(torchrun(2) + _overrides(digits, docs, out, "ref"),
                          torchrun(2) + _overrides(digits, docs, out, "victim"), target, out)
    resumed = subprocess.run(torchrun(2) + _overrides(digits, docs, out, "victim", "resume=auto"), cwd=out, env=env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    return out


def _by_step(run_dir) -> dict:
    return {r["step"]: r for r in records(run_dir) if "train/loss" in r}


def test_sigkill_and_resume_auto_reproduce_the_losses_bitwise(runs):
    ref, victim = _by_step(runs / "ref"), _by_step(runs / "victim")
    recs = records(runs / "victim")
    resumes = [r for r in recs if r.get("event") == "resume"]
    assert resumes and resumes[-1]["step"] == EVERY  # killed right after its step-4 checkpoint
    start = resumes[-1]["step"]
    assert sorted(s for s in victim if s > start) == list(range(start + 1, STEPS + 1))
    for step in range(start + 1, STEPS + 1):
        for key in ("train/loss", "train/generation", "train/contrastive", "train/pairs"):
            assert victim[step][key] == ref[step][key], (step, key)  # bitwise: same process layout, same data
    assert all(ref[s]["train/pairs"] > 0 for s in ref)
    start_event = next(r for r in records(runs / "ref") if r.get("event") == "start")
    assert start_event["world_size"] == 2


def test_the_monitors_run_at_the_end(runs, digits):
    ev = [r for r in records(runs / "ref") if "eval/caption_loss" in r][-1]
    assert ev["eval/zeroshot/num_samples"] == digits["zeroshot_num_samples"]
    assert 0 < ev["eval/caption_loss"] < 12 and ev["eval/caption_tokens"] > 0
    assert ev["eval/knn/num_train"] == digits["knn_train_num_samples"]
    assert 0.0 <= ev["eval/knn/top1"] <= 1.0


def test_evaclip_eval_builds_the_lcl_model_from_the_run(runs, digits, tmp_path):
    from evaclip.evals import main

    out = tmp_path / "eval.json"
    assert main([str(runs / "ref"), "--zeroshot", digits["zeroshot"], "--retrieval", digits["retrieval"],
                 "--device", "cpu", "--workers", "1", "--quiet", "--out", str(out)]) == 0
    res = json.loads(out.read_text())["results"]
    assert res["zeroshot/num_samples"] == digits["zeroshot_num_samples"]
    assert "retrieval/class_i2t_R@1" in res


def test_export_gives_encoders_that_load_encoder_reads(runs, tmp_path):
    import evaclip
    from evaclip.export import export
    from evaclip.runs import load_model

    export(str(runs / "ref"), str(tmp_path / "export"), "safetensors")
    model, _ = load_model(str(runs / "ref"), device="cpu", attn_backend="sdpa")
    image, text = evaclip.load_encoder(tmp_path / "export", "image"), evaclip.load_encoder(tmp_path / "export", "text")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(image(x, normalize=True), model.encode_image(x, normalize=True))
    tokens = text.tokenizer(["a handwritten seven", "the number two"])
    torch.testing.assert_close(text(tokens, normalize=True), model.encode_text(tokens, normalize=True))
    assert image.patch_features(x).shape == (2, 16, 64)
    with pytest.raises(ValueError, match="LCL run exports as --format safetensors"):
        export(str(runs / "ref"), str(tmp_path / "oc"), ["open_clip"])


def test_the_run_is_a_clip_image_init(runs):
    from evaclip.models import create_model
    from evaclip.runs import load_model

    lcl, _ = load_model(str(runs / "ref"), device="cpu", attn_backend="sdpa")
    clip = create_model(MODEL, image_init=str(runs / "ref"), attn_backend="sdpa")
    own = clip.visual.state_dict()
    for k, v in lcl.visual.state_dict().items():
        torch.testing.assert_close(own[k], v, msg=k)
