"""The engine's loop driving the CLIP task in one process: NaN/Inf steps skipped and counted (and a run that keeps
diverging stopped), the run folder it writes, mixed precision, the token-drop phase switch. Tiny model
(EVA02-CLIP-tiny), synthetic data, a few steps each. The CLIP task's own step: tests/tasks/test_clip_task.py."""
from __future__ import annotations

import json
import math

import pytest
import torch
from subprocess_runs import records

from evaclip import checkpoint as ckpt
from evaclip.config import load_config
from evaclip.data.synthetic import SyntheticDataInfo
from evaclip.engine import TrainingStopped
from evaclip.tasks.clip import ClipTask
from evaclip.train import main

BASE = ("optim.lr=1e-3", "model.token_drop=0.0")  # on top of tests/conftest.py's tiny run


class _Poisoned:
    """Synthetic DataInfo whose batches at the given global batch indices hold NaN pixels (a corrupt input)."""

    def __init__(self, inner: SyntheticDataInfo, bad: set[int], per_epoch: int):
        self.inner, self.bad, self.per_epoch = inner, bad, per_epoch
        self.num_batches, self.num_samples = inner.num_batches, inner.num_samples
        self.epoch = self.start = 0

    def set_epoch(self, epoch, start_step=0):
        self.epoch, self.start = epoch, start_step
        self.inner.set_epoch(epoch, start_step)

    @property
    def loader(self):
        def gen():
            for i, (images, tokens) in enumerate(self.inner.loader, start=self.start):
                if self.epoch * self.per_epoch + i in self.bad:
                    images = images.clone()
                    images[0, 0, 0, 0] = float("nan")
                yield images, tokens
        return gen()

    def skipped(self):
        return 0


def _poison(monkeypatch, bad):
    real = ClipTask.build_data

    def build(self, steps_hint):
        inner = real(self, steps_hint)
        return _Poisoned(inner, bad, inner.num_batches)

    monkeypatch.setattr(ClipTask, "build_data", build)


def test_nan_steps_are_skipped_counted_and_the_run_goes_on(monkeypatch, run_cfg):
    _poison(monkeypatch, {2, 3})
    result = main(run_cfg(*BASE, "max_steps=6", "max_bad_steps=3", "ckpt.every=2"))
    assert result.status == "finished" and result.step == 6 and result.bad_steps == 2
    recs = records(result.run_dir)
    last = [r for r in recs if "train/loss" in r][-1]
    assert last["train/bad_steps"] == 2 and last["step"] == 6
    # the optimizer stepped only on the 4 good steps; the logged losses are finite but for the 2 poisoned batches'
    state = torch.load(result.checkpoint / "optimizer.pt", weights_only=True)["state"]
    assert {int(s["step"]) for s in state.values()} == {4}
    losses = {r["step"]: r["train/loss"] for r in recs if "train/loss" in r}
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert {step for step, loss in losses.items() if not math.isfinite(loss)} == {3, 4}
    # the bad_step events name the steps whose logged loss is not finite (0-based batches 2, 3 are steps 3, 4)
    assert [r["step"] for r in recs if r.get("event") == "bad_step"] == [3, 4]


def test_too_many_bad_steps_stop_with_a_clear_message_and_keep_the_last_good_checkpoint(tmp_path, monkeypatch,
                                                                                        run_cfg):
    _poison(monkeypatch, set(range(4, 100)))
    with pytest.raises(TrainingStopped, match=r"3 consecutive steps .* \(steps 5\.\.7; .*step_00000004"):
        main(run_cfg(*BASE, "max_steps=12", "max_bad_steps=3", "ckpt.every=2"))
    root = tmp_path / "run" / "ckpt"
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_00000004", "step_00000002"]
    ckpt.verify_checkpoint(root / "step_00000004")


def test_run_folder_has_config_git_metrics_checkpoints_and_token_drop_phase(tmp_path, run_cfg):
    result = main(run_cfg(*BASE, "max_steps=4", "ckpt.every=2", "ckpt.keep_last=5", "log.every=2",
                          "log.tensorboard=true", "accum_freq=2", "model.token_drop=0.5", "model.token_drop_until=3"))
    run = tmp_path / "run"
    assert load_config(run / "config.yaml").accum_freq == 2  # the resolved config reloads as is
    info = json.loads((run / "run_info.json").read_text())
    assert "commit" in info["git"] and info["world_size"] == 1
    assert [p.name for p in ckpt.list_checkpoints(run / "ckpt")] == ["step_00000004", "step_00000002"]
    recs = [r for r in records(run) if "train/loss" in r]
    assert [r["step"] for r in recs] == [2, 4]
    for key in ("train/loss", "train/samples_per_s", "train/eta_s", "train/logit_scale", "train/lr/visual",
                "train/lr/text", "train/skipped_samples"):
        assert key in recs[-1], key
    assert recs[-1]["train/samples_seen"] == 4 * 2 * 4
    assert any((run / "tensorboard").iterdir())
    assert result.checkpoint == run / "ckpt" / "step_00000004"
    # the unmasked tuning phase starts at model.token_drop_until
    events = [r for r in records(run) if r.get("event") == "token_drop"]
    assert events == [{"event": "token_drop", "step": 3, "ratio": 0.0}]
    assert result.status == "finished"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_train(precision, run_cfg):
    result = main(run_cfg(*BASE, f"precision={precision}", "max_steps=2", "model.grad_checkpointing=true"))
    recs = [r for r in records(result.run_dir) if "train/loss" in r]
    assert result.step == 2 and [r["step"] for r in recs] == [1, 2]
    assert all(math.isfinite(r["train/loss"]) for r in recs)
    if precision == "fp16":
        assert "train/loss_scale" in recs[-1]
