"""The engine on its own: a toy task defined here (regress a fixed random target from the image tower) trains through
``evaclip.engine.train`` with accumulation, checkpoints and exact resume, with no change to the engine; SIGTERM saves
before any evaluation; the package has no import cycle and every module imports on its own."""
from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from torch import nn

from evaclip import checkpoint as ckpt
from evaclip.config import load_config
from evaclip.engine import train
from evaclip.engine.step import accumulate
from evaclip.engine.task import Task

REPO = Path(__file__).resolve().parent.parent
MODEL = "EVA02-CLIP-tiny"


class _Regressor(nn.Module):
    """The tiny image tower plus a linear read-out, with the optimizer hooks the engine's optimizer factory reads."""

    def __init__(self):
        super().__init__()
        from evaclip.models import build_tower

        self.visual = build_tower(MODEL, "visual", attn_backend="eager")
        self.out = nn.Linear(self.visual(torch.zeros(1, 3, 32, 32)).shape[-1], 4)

    def forward(self, images_BCHW):
        return self.out(self.visual(images_BCHW))

    def no_weight_decay(self):
        return set()

    def param_tower(self, name):
        return "visual" if name.startswith("visual.") else "other"

    def layer_id(self, name):
        return 0

    def num_layers(self, tower):
        return 1


class _SampleData:
    """Sample ``j`` of epoch ``e`` is a pure function of (e, j): K micro-batches of B hold the same samples as one
    batch of K*B, and ``set_epoch(e, i)`` resumes at micro-batch ``i``."""

    def __init__(self, batch_size, num_batches):
        self.batch_size, self.num_batches = batch_size, num_batches
        self.epoch = self.start = 0

    def set_epoch(self, epoch, start_step=0):
        self.epoch, self.start = epoch, start_step

    def _sample(self, j):
        g = torch.Generator().manual_seed(1000 * self.epoch + j)
        return torch.randn(3, 32, 32, generator=g)

    @property
    def loader(self):
        B = self.batch_size
        return iter([torch.stack([self._sample(i * B + b) for b in range(B)])
                     for i in range(self.start, self.num_batches)])

    def skipped(self):
        return 0


class ToyTask(Task):
    """Regress a fixed random target vector from each image: a second objective, defined outside evaclip."""

    name = "toy"
    evaluations: list = []

    @classmethod
    def check(cls, cfg):
        pass

    def build_data(self, steps_hint):
        per_epoch = 64 // self.cfg.data.batch_size  # 64 samples per epoch
        return _SampleData(self.cfg.data.batch_size, per_epoch)

    def build_model(self):
        self.target = torch.randn(4, generator=torch.Generator().manual_seed(7))
        return _Regressor()

    def to_device(self, batch):
        return batch.to(self.env.device)

    def forward_backward(self, model, micro, ctx):
        def loss_of(m, images):
            return ((m(images) - self.target) ** 2).mean(), {"pred_mean": m(images).mean()}

        return accumulate(model, micro, ctx, loss_of)

    def metrics(self, out):
        return {"pred_mean": float(out["pred_mean"])}

    def evaluate(self, model, step):
        run = Path(self.cfg.output_dir) / self.cfg.name
        ToyTask.evaluations.append((step, (run / "ckpt" / ckpt.step_dir_name(step)).is_dir()))
        return {"toy/step": step}


def _cfg(tmp_path, name, *overrides):
    base = ["data.batch_size=8", "max_steps=6", "device=cpu", f"output_dir={tmp_path}", f"name={name}",
            "log.every=1", "log.tensorboard=false", "optim.name=adamw", "optim.lr=1e-3", "optim.warmup_steps=1",
            "model.token_drop=0.0", "eval.zeroshot=null", "ckpt.keep_last=10"]
    return load_config("demo_cpu", base + list(overrides))


def _losses(run_dir):
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in recs if "train/loss" in r}


def test_a_toy_task_trains_accumulates_and_resumes_exactly(tmp_path):
    one = train(_cfg(tmp_path, "one"), ToyTask)
    acc = train(_cfg(tmp_path, "acc", "data.batch_size=4", "accum_freq=2", "ckpt.every=3"), ToyTask)
    assert one.status == acc.status == "finished" and one.step == acc.step == 6
    ref, got = _losses(one.run_dir), _losses(acc.run_dir)
    assert sorted(ref) == list(range(1, 7)) and ref[6] < ref[1]  # it learns
    for step in ref:  # 2 micro-batches of 4 == one batch of 8 (plain loss / K accumulation)
        assert got[step] == pytest.approx(ref[step], rel=1e-5), step

    # kill after step 3: drop the later checkpoint and the log, resume=auto continues exactly
    shutil.rmtree(acc.run_dir / "ckpt" / "step_00000006")
    (acc.run_dir / "metrics.jsonl").unlink()
    again = train(_cfg(tmp_path, "acc", "data.batch_size=4", "accum_freq=2", "ckpt.every=3", "resume=auto"), ToyTask)
    resumed = _losses(again.run_dir)
    assert again.step == 6 and sorted(resumed) == [4, 5, 6]
    for step in resumed:
        assert resumed[step] == pytest.approx(got[step], rel=1e-6), step
    a = torch.load(again.checkpoint / "model.pt", weights_only=True)
    b = torch.load(acc.checkpoint / "model.pt", weights_only=True) if acc.checkpoint.exists() else None
    assert b is None or all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_saves_before_any_evaluation(tmp_path, monkeypatch):
    ToyTask.evaluations = []
    real = ToyTask.before_step

    def term_at_3(self, model, step, logger):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, model, step, logger)

    monkeypatch.setattr(ToyTask, "before_step", term_at_3)
    result = train(_cfg(tmp_path, "term", "eval.every=1"), ToyTask)
    assert result.status == "preempted" and result.step == 4 and result.signal == signal.SIGTERM
    assert result.checkpoint == result.run_dir / "ckpt" / "step_00000004"
    ckpt.verify_checkpoint(result.checkpoint)
    # periodic evaluations ran at steps 1-3; at the preempted step the checkpoint came first and no eval followed
    assert [s for s, _ in ToyTask.evaluations] == [1, 2, 3]
    ToyTask.evaluations = []
    monkeypatch.setattr(ToyTask, "before_step", real)
    done = train(_cfg(tmp_path, "end", "max_steps=2"), ToyTask)
    assert done.status == "finished" and ToyTask.evaluations == [(2, True)]  # final: saved, then evaluated
