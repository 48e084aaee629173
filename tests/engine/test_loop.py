"""The engine on its own: a toy task added with one file (``toy_task.py``: config class, model, data, loss) and one
registry line trains through ``evaclip train`` / ``evaclip.engine.train`` with accumulation, checkpoints and exact
resume, its extras logged and its own tower in its own optimizer group; SIGTERM saves before any evaluation."""
from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from toy_task import ToyTask  # noqa: I001  (tests/engine/toy_task.py: the toy task's one file)

from evaclip import checkpoint as ckpt
from evaclip.config import TASKS, load_config
from evaclip.engine import train
from evaclip.train import cli

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def toy_registered(monkeypatch):
    """The toy task's one registry line."""
    monkeypatch.setitem(TASKS, "toy", f"{ToyTask.__module__}:ToyTask")


def _cfg(tmp_path, name, *overrides):
    base = ["task=toy", "data.batch_size=8", "max_steps=6", "device=cpu", f"output_dir={tmp_path}", f"name={name}",
            "log.every=1", "log.tensorboard=false", "optim.name=adamw", "optim.lr=1e-3", "optim.warmup_steps=1",
            "ckpt.keep_last=10"]
    return load_config(None, base + list(overrides))


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

    # kill after step 3: drop the later checkpoint and the log, resume=auto continues exactly; the uninterrupted
    # run's final weights are kept aside first (the resumed run writes the same folder)
    uninterrupted = torch.load(acc.checkpoint / "model.pt", weights_only=True)
    shutil.rmtree(acc.run_dir / "ckpt" / "step_00000006")
    (acc.run_dir / "metrics.jsonl").unlink()
    again = train(_cfg(tmp_path, "acc", "data.batch_size=4", "accum_freq=2", "ckpt.every=3", "resume=auto"), ToyTask)
    resumed = _losses(again.run_dir)
    assert again.step == 6 and sorted(resumed) == [4, 5, 6]
    for step in resumed:
        assert resumed[step] == pytest.approx(got[step], rel=1e-6), step
    final = torch.load(again.checkpoint / "model.pt", weights_only=True)
    assert final.keys() == uninterrupted.keys()
    assert all(torch.equal(final[k], uninterrupted[k]) for k in final)  # bitwise


def test_the_first_log_after_a_mid_window_resume_averages_the_same_steps(tmp_path):
    """A log step's ``train/loss`` is the mean over the steps since the previous log step; a run resumed from a
    checkpoint inside that window logs the same mean as the uninterrupted run (the window is in the checkpoint)."""
    args = ("max_steps=8", "log.every=4", "ckpt.every=2")
    ref = _losses(train(_cfg(tmp_path, "win", *args), ToyTask).run_dir)
    assert sorted(ref) == [4, 8]
    run_dir = tmp_path / "win"
    for later in ("step_00000004", "step_00000006", "step_00000008"):  # killed after step 2's checkpoint
        shutil.rmtree(run_dir / "ckpt" / later)
    (run_dir / "metrics.jsonl").unlink()
    resumed = _losses(train(_cfg(tmp_path, "win", *args, "resume=auto"), ToyTask).run_dir)
    assert resumed[4] == pytest.approx(ref[4], rel=1e-6)  # steps 1-4, not only 3-4
    assert resumed[8] == pytest.approx(ref[8], rel=1e-6)


def test_a_checkpoint_from_before_the_loss_window_resumes_with_a_fresh_window():
    """``trainer.pt`` files written before the window was checkpointed have no ``loss_window``: they load, and the
    first log averages the steps after the resume (what every resume did then)."""
    from evaclip.engine.state import TrainerState

    old = {"step": 6, "epoch": 0, "batch_in_epoch": 6, "steps_per_epoch": 10, "samples_seen": 48,
           "bad_steps_total": 0, "bad_steps_in_a_row": 0}
    state = TrainerState(steps_per_epoch=10, global_batch=8)
    state.load_state_dict(old)
    assert state.step == 6 and state.loss_n == 0 and state.loss_sum is None
    state.add_loss(torch.tensor(2.0))
    state.add_loss(torch.tensor(4.0))
    assert state.pop_mean_loss() == 3.0 and state.loss_n == 0
    assert state.state_dict()["loss_window"] == [0.0, 0]


def test_a_task_in_one_file_and_one_registry_line_runs_from_the_command_line(tmp_path, capsys):
    """Nothing in evaclip names the toy task: its schema is found by its name, its ``toy`` section is checked by its
    own rule, the default step accumulates its ``loss``, its ``pred_mean`` extra is logged, its ``decoder`` tower
    gets its own optimizer group (``optim.tower_lr.decoder``), not the logit scale's."""
    args = ["task=toy", "data.batch_size=8", "max_steps=2", "device=cpu", f"output_dir={tmp_path}", "name=run",
            "log.every=1", "log.tensorboard=false", "optim.name=adamw", "optim.lr=1e-3", "optim.warmup_steps=1",
            "optim.tower_lr.decoder=2e-2"]
    recipe = tmp_path / "toy.yaml"
    recipe.write_text("task: toy\ntoy:\n  outputs: 3\n")
    assert cli([str(recipe), *args, "toy.outputs=0"]) == 2
    assert capsys.readouterr().err.strip() == "evaclip train: config key 'toy.outputs' must be >= 1, got 0"
    assert cli([str(recipe), *args]) == 0
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "train/loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and all("train/pred_mean" in r for r in steps)
    assert steps[-1]["train/lr/decoder"] == pytest.approx(2e-2 * steps[-1]["train/lr/visual"] / 1e-3)
    saved = torch.load(tmp_path / "run" / "ckpt" / "step_00000002" / "model.pt", weights_only=True)
    assert saved["decoder.weight"].shape[0] == 3  # the recipe's toy section


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
