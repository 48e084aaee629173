"""Masked image modeling end to end, launched as users launch it (``python -m evaclip.train ... task=mim``, torchrun):
SIGKILL mid-run then ``resume=auto`` continuing exactly like an uninterrupted run, and 2-process gloo runs (DDP and
FSDP2) through the real command line that finish, monitor and write checkpoints a MIM student loads from.

Real shards (the digits, image-text shards whose captions MIM ignores) and a real teacher: a tiny CLIP trained for two
steps by evaclip itself, used as its run folder (the EVA-02 loop's second MIM: the new CLIP teaches) and as its
``evaclip export`` folder. Subprocess helpers: tests/subprocess_runs.py (shared with tests/test_torchrun.py).
"""
from __future__ import annotations

import json
import subprocess

import pytest
from subprocess_runs import (
    MODEL,
    TRAIN,
    assert_continues_like,
    env,
    kill_after_checkpoint,
    overrides,
    records,
    torchrun,
)

pytestmark = pytest.mark.slow


def _mim(digits, out_dir, name, teacher, *extra) -> list[str]:
    """The shared overrides on the MIM demo recipe: a MIM run of the tiny student from ``teacher``."""
    return ["demo_mim_cpu", *overrides(digits, out_dir, name, f"mim.teacher={teacher}", *extra)[1:]]


def test_mim_sigkill_then_resume_auto_continues_exactly(digits, teacher_run, tmp_path):
    """Kill a MIM run once its step-8 checkpoint exists, resume=auto: it continues from its newest checkpoint and every
    later step's loss and lr equal an uninterrupted run's (drop path on and 2 micro-batches a step,
    so the RNG state, the data position and the masks drawn in the data worker must all be restored)."""
    from evaclip.checkpoint import list_checkpoints

    common = ["max_steps=14", "ckpt.every=4", "ckpt.keep_last=3", "accum_freq=2",
              "model.overrides.vision.drop_path=0.1"]
    victim = tmp_path / "victim"
    kill_after_checkpoint(TRAIN + _mim(digits, tmp_path, "ref", teacher_run, *common),
                          TRAIN + _mim(digits, tmp_path, "victim", teacher_run, *common),
                          victim / "ckpt" / "step_00000008", tmp_path)
    newest = list_checkpoints(victim / "ckpt")[0]
    assert newest.name in ("step_00000008", "step_00000012")
    assert not any(r.get("event") == "end" for r in records(victim))  # killed mid-run

    resumed = subprocess.run(TRAIN + _mim(digits, tmp_path, "victim", teacher_run, *common, "resume=auto"),
                             cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed from {newest}" in resumed.stdout
    assert_continues_like(victim, tmp_path / "ref", resumed_at=int(newest.name[5:]), last_step=14)
    losses = [r["train/loss"] for r in records(tmp_path / "ref") if "train/loss" in r]
    assert len(losses) == 14 and all(-1.0 <= v <= 1.0 for v in losses)  # a mean negative cosine


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_mim_torchrun_two_processes_gloo_finishes_and_writes_checkpoints(digits, teacher_run, tmp_path, strategy):
    """2 gloo processes through the real CLI, teacher = an `evaclip export` folder (sharded over the ranks under
    FSDP2): every step logged, both monitors (fixed-mask val loss, k-NN over all of both labelled sets), checkpoints
    of both ranks, and the run loads as a MIM student and as an EVA-CLIP image-tower init."""
    from evaclip.export import export
    from evaclip.models import create_model
    from evaclip.models.convert import load_pretrained
    from evaclip.runs import load_student

    teacher = tmp_path / "teacher_export"
    export(str(teacher_run), str(teacher), "safetensors")
    cmd = torchrun(2) + _mim(digits, tmp_path, "mim", teacher, "max_steps=4", "ckpt.every=2", "ckpt.keep_last=3",
                             f"dist.strategy={strategy}", f"mim.teacher_shard={strategy == 'fsdp'}",
                             f"mim.val={digits['zeroshot']}", f"mim.knn_train={digits['knn_train']}",
                             f"mim.knn_val={digits['knn_val']}", "eval.batch_size=128")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "mim"
    assert sorted(p.name for p in (run / "ckpt").iterdir()) == ["step_00000002", "step_00000004"]
    meta = json.loads((run / "ckpt" / "step_00000004" / "meta.json").read_text())
    weights = {"ddp": "model.pt", "fsdp": "dcp/.metadata"}[strategy]
    assert meta["world_size"] == 2 and {"rng_rank0.pt", "rng_rank1.pt", weights} <= set(meta["files"])

    recs = records(run)
    start = next(r for r in recs if r.get("event") == "start")
    assert start["world_size"] == 2 and start["global_batch"] == 16 and start["task"] == "mim"
    steps = [r for r in recs if "train/loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(-1.0 <= r["train/loss"] <= 1.0 and 0 < r["train/masked_frac"] <= 0.4 for r in steps)
    ev = [r for r in recs if "eval/knn/top1" in r][-1]
    assert ev["eval/knn/num_train"] == digits["knn_train_num_samples"]
    assert ev["eval/knn/num_val"] == digits["zeroshot_num_samples"]
    assert -1.0 <= next(r for r in recs if "eval/val_loss" in r)["eval/val_loss"] <= 1.0
    assert "step 4/4" in proc.stdout and "[rank 1]" not in proc.stdout  # progress from rank 0 only

    student = load_student(run)  # the architecture from the run's config.yaml
    assert student.target_dim == create_model(MODEL).visual.head.out_features
    report = load_pretrained(create_model(MODEL, attn_backend="sdpa"), image_init=str(run))
    assert report.formats["image_init"] == "eva_mim"
    assert sorted(report.ignored) == ["lm_head.bias", "lm_head.weight", "mask_token"]
