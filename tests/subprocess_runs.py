"""Shared pieces of the end-to-end tests that launch evaclip as users do, in subprocesses: tests/test_torchrun.py
(CLIP), tests/tasks/test_mim_e2e.py (MIM) and tests/engine/test_run_lock.py. Not collected by pytest (no ``test_``
prefix); the ``digits`` data they run on is a fixture of tests/conftest.py.

Runs use the ``demo_cpu`` recipe with the tiny model on the digits (``data_tools.make_demo``, one copy per digit),
batch 8, one data worker, one thread per process, logging every step.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MODEL = "EVA02-CLIP-tiny"
# Same-process-layout runs are bitwise reproducible on the CPU; the tolerance only absorbs libm/BLAS differences.
LOSS_RTOL = 1e-5
TRAIN = [sys.executable, "-m", "evaclip.train"]


def torchrun(nproc: int) -> list[str]:
    """The launcher prefix of an ``nproc``-process run on this machine (``TRAIN``'s module)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *TRAIN[1:]]


def env() -> dict:
    """The subprocess environment: CPU only, one thread, unbuffered output, no wandb, this checkout importable."""
    out = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    out["PYTHONPATH"] = str(REPO) + os.pathsep + out.get("PYTHONPATH", "")
    return out


def overrides(digits, out_dir, name, *extra) -> list[str]:
    """``demo_cpu`` on the digits shards with the tiny model, run ``out_dir/name``; ``extra`` overrides come last."""
    return ["demo_cpu", f"model.name={MODEL}", f"data.train={digits['train']}", "data.batch_size=8",
            "data.workers=1", "data.shuffle_buffer=64", "device=cpu", f"output_dir={out_dir}", f"name={name}",
            "log.every=1", "log.tensorboard=false", "optim.warmup_steps=2", "model.token_drop_until=null",
            *extra]


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def kill_after_checkpoint(ref_cmd: list[str], victim_cmd: list[str], target: Path, cwd) -> str:
    """Start an uninterrupted reference run and a victim run side by side; SIGKILL the victim as soon as its
    checkpoint folder ``target`` exists (renamed into place: complete), then wait for the reference to finish.
    Returns the reference's output."""
    ref = subprocess.Popen(ref_cmd, cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    victim = subprocess.Popen(victim_cmd, cwd=cwd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not target.is_dir() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=30) == -signal.SIGKILL, "the run finished before it could be killed"
    ref_out, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, ref_out[-3000:]
    return ref_out


def assert_continues_like(run_dir, ref_dir, resumed_at: int, last_step: int, keys=("train/loss",)) -> None:
    """The run's last ``resume`` event is at step ``resumed_at`` and every later step up to ``last_step`` logged the
    reference run's lr (to 1e-12), samples seen (exactly) and ``keys`` (to ``LOSS_RTOL``)."""
    recs = records(run_dir)
    last_resume = max(i for i, r in enumerate(recs) if r.get("event") == "resume")
    assert recs[last_resume]["step"] == resumed_at
    after = {r["step"]: r for r in recs[last_resume:] if "train/loss" in r}
    reference = {r["step"]: r for r in records(ref_dir) if "train/loss" in r}
    assert sorted(after) == list(range(resumed_at + 1, last_step + 1))
    for step, r in after.items():
        assert r["train/lr/visual"] == pytest.approx(reference[step]["train/lr/visual"], rel=1e-12), step
        assert r["train/samples_seen"] == reference[step]["train/samples_seen"]
        for key in keys:
            assert r[key] == pytest.approx(reference[step][key], rel=LOSS_RTOL), (step, key)
