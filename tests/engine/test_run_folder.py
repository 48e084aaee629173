"""A run folder protects its work: a new run never starts over another run's checkpoints, ``resume=auto`` keeps the
run's stored config, a run that fails validation writes nothing, an interrupted checkpoint write is finished first
and its leftovers are cleaned at the next start. Tiny model, synthetic data, one process."""
from __future__ import annotations

import json
import os
import signal

import pytest

from evaclip import checkpoint as ckpt
from evaclip.config import ConfigError, load_config
from evaclip.engine.run_dir import reconcile_resume
from evaclip.engine.signals import StopSignal
from evaclip.train import cli

MODEL = "EVA02-CLIP-tiny"


@pytest.fixture
def train_args(run_args):
    """``train_args(*extra)``: tests/conftest.py's tiny run with a checkpoint every 2 steps."""
    return lambda *extra: run_args("ckpt.every=2", *extra)


def _steps(run):
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if "train/loss" in line]


def test_a_new_run_refuses_a_folder_holding_another_runs_checkpoints(tmp_path, capsys, train_args):
    assert cli(train_args("max_steps=4")) == 0
    run = tmp_path / "run"
    config_before = (run / "config.yaml").read_text()
    capsys.readouterr()
    assert cli(train_args("max_steps=2", "optim.lr=1e-3")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert str(run) in err and "resume=auto" in err and "name=" in err
    # nothing was touched: the old run's checkpoints and config are as they were
    assert [p.name for p in ckpt.list_checkpoints(run / "ckpt")] == ["step_00000004", "step_00000002"]
    assert (run / "config.yaml").read_text() == config_before
    assert cli(train_args("max_steps=2", "name=other")) == 0  # another name= is the way on


def test_resume_auto_keeps_the_stored_config(tmp_path, capsys, train_args):
    assert cli(train_args("max_steps=3", "optim.lr=1e-3")) == 0
    stored = str(tmp_path / "run" / "config.yaml")
    # named explicitly, the stored config is the config (the recipe demo_cpu says max_steps 300 and lr 3e-3)
    cfg = reconcile_resume(load_config(stored, ["resume=auto"]), {"resume": "auto"}, recipe=stored)
    assert cfg.max_steps == 3 and cfg.optim.lr == 1e-3
    capsys.readouterr()
    assert cli([stored, "resume=auto"]) == 0
    out = capsys.readouterr()
    assert "is finished (step 3 of 3)" in out.out + out.err
    # a key that may change on resume: applied with a warning that names it
    assert cli([stored, "resume=auto", "max_steps=5", "optim.extend=segment"]) == 0
    assert "max_steps 3 -> 5" in capsys.readouterr().out
    assert _steps(tmp_path / "run")[-2:] == [4, 5]
    # a key that makes another run: refused, naming it
    assert cli([stored, "resume=auto", "max_steps=6", "optim.lr=2e-3"]) == 2
    err = capsys.readouterr().err
    assert "optim.lr (0.001 -> 0.002)" in err and "max_steps" not in err.split("different")[1]


def test_resume_auto_with_another_recipe_or_task_is_refused_naming_both(tmp_path, capsys, train_args):
    """The recipe a resume names must be the run's: the demo_cpu recipe on a MIM run folder (or on a CLIP run
    started with other settings) is refused with the keys that differ; RUN/config.yaml continues the run."""
    mim = ["mim.teacher_model=EVA02-CLIP-tiny", "mim.teacher=" + str(tmp_path / "t")]
    assert cli(train_args("max_steps=2", "name=teacher")) == 0
    (tmp_path / "t").symlink_to(tmp_path / "teacher")
    assert cli(["demo_mim_cpu", *train_args("max_steps=2", "name=mimrun", *mim)[1:]]) == 0
    capsys.readouterr()
    assert cli(train_args("name=mimrun", "resume=auto", "max_steps=2")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "recipe demo_cpu (task clip)" in err and "(task mim)" in err and "task ('mim' -> 'clip')" in err, err
    assert f"evaclip train {tmp_path / 'mimrun' / 'config.yaml'} resume=auto" in err
    # the same recipe with a setting the run was not started with: refused too, naming the key
    assert cli(train_args("name=teacher", "resume=auto", "max_steps=2", "seed=1")) == 2
    assert "seed (0 -> 1)" in capsys.readouterr().err
    # asked for explicitly, the stored config continues the MIM run
    assert cli([str(tmp_path / "mimrun" / "config.yaml"), "resume=auto"]) == 0
    assert "is finished (step 2 of 2)" in capsys.readouterr().out


def test_extending_a_finished_run_says_what_happens_to_the_schedule(tmp_path, capsys, train_args):
    """max_steps past a finished run's schedule: refused until optim.extend says how; segment = a new warmup +
    cosine over the added steps (open_clip's cosine_lr over the segment), tail = the schedule's floor. The resume
    line says which."""
    from open_clip_train.scheduler import cosine_lr

    assert cli(train_args("max_steps=3", "optim.lr=1e-3")) == 0
    stored = str(tmp_path / "run" / "config.yaml")
    capsys.readouterr()
    assert cli([stored, "resume=auto", "max_steps=9"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "optim.extend=tail" in err and "optim.extend=segment" in err, err
    assert "past its lr schedule's end at step 3" in err
    assert cli([stored, "resume=auto", "max_steps=9", "optim.extend=segment"]) == 0
    assert "a new segment over steps 3..9: 1-step warmup, then cosine" in capsys.readouterr().out
    lrs = {json.loads(r)["step"]: json.loads(r)["train/lr/visual"]
           for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if "train/lr/visual" in r}

    class _Opt:
        param_groups = [{}]

    ref = cosine_lr(_Opt(), 1e-3, 1, 6)
    for step in range(4, 10):  # the lr logged at step s is the lr the next optimizer step (index s) runs with
        assert lrs[step] == pytest.approx(ref(step - 3), rel=1e-12), step
    assert cli([stored, "resume=auto", "max_steps=11", "optim.extend=tail"]) == 0
    assert "steps 9..11 run at its floor, min_lr_ratio 0 x peak lr (lr 0" in capsys.readouterr().out
    assert [json.loads(r)["train/lr/visual"] for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
            if "train/lr/visual" in r][-2:] == [0.0, 0.0]


def test_reconcile_refuses_changed_keys_with_their_list(train_args):
    assert cli(train_args("max_steps=2")) == 0
    cfg = load_config("demo_cpu", train_args("resume=auto", "data.batch_size=8", "seed=3")[1:])
    with pytest.raises(ConfigError, match=r"data\.batch_size \(4 -> 8\), seed \(0 -> 3\)"):
        reconcile_resume(cfg, {"resume": "auto", "data.batch_size": "8", "seed": "3"})


def test_a_run_that_fails_validation_writes_nothing(tmp_path, capsys, train_args):
    assert cli(train_args("max_steps=20", "optim.warmup_steps=50")) == 2
    assert "optim.warmup_steps" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    # the same in a folder of an earlier run: its files stay as they were
    assert cli(train_args("max_steps=2")) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    assert cli(train_args("resume=auto", "max_steps=4", "optim.warmup_steps=50", "optim.extend=segment")) == 2
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()} == before


def test_a_second_ctrl_c_waits_for_the_checkpoint_write(tmp_path, monkeypatch, train_args):
    """Ctrl-C twice, the second during the checkpoint write: the write completes (a verified checkpoint), then the
    run stops; the next start removes a leftover temporary folder with a log line."""
    real_save = ckpt.save_checkpoint
    calls = {"n": 0}

    def save_with_interrupts(*args, **kwargs):
        calls["n"] += 1
        os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C came earlier; this one lands mid-write
        return real_save(*args, **kwargs)

    from evaclip.engine import loop
    real_before = loop.StopSignal.__enter__

    def enter(self):
        out = real_before(self)
        self.requested = signal.SIGINT  # a first Ctrl-C already received
        return out

    monkeypatch.setattr(ckpt, "save_checkpoint", save_with_interrupts)
    monkeypatch.setattr(loop.StopSignal, "__enter__", enter)
    with pytest.raises(KeyboardInterrupt):
        from evaclip.train import main

        main(load_config("demo_cpu", train_args("max_steps=50")[1:]))
    (newest,) = ckpt.list_checkpoints(tmp_path / "run" / "ckpt")
    ckpt.verify_checkpoint(newest)
    assert calls["n"] == 1

    monkeypatch.undo()
    stale = tmp_path / "run" / "ckpt" / ".tmp_step_00000009"
    stale.mkdir()
    assert cli(train_args("resume=auto", "max_steps=2")) == 0
    assert not stale.exists()


def test_the_ctrl_c_line_names_the_step_that_saves(tmp_path, monkeypatch, capsys, train_args):
    """Ctrl-C during step 3 (its stop flag already read): the line says the checkpoint is step 4's, and it is."""
    from evaclip.engine import loop

    real_build, calls = loop.build_step, {"n": 0}

    def build_step_with_ctrl_c(*args, **kwargs):
        step = real_build(*args, **kwargs)
        real_call = step.task.forward_backward

        def forward_backward(*a, **k):
            calls["n"] += 1
            if calls["n"] == 3:
                os.kill(os.getpid(), signal.SIGINT)
            return real_call(*a, **k)

        step.task.forward_backward = forward_backward
        return step

    monkeypatch.setattr(loop, "build_step", build_step_with_ctrl_c)
    assert cli(train_args("max_steps=50")) == 128 + signal.SIGINT
    out = capsys.readouterr()
    assert "received SIGINT: saving a checkpoint at the end of step 4," in out.out + out.err
    assert "stopped by SIGINT at step 4" in out.err
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run" / "ckpt")][0] == "step_00000004"


def test_stop_signal_defers_a_second_interrupt_inside_critical():
    with StopSignal() as stop:
        stop._handle(signal.SIGINT, None)
        assert stop.requested == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            with stop.critical():
                stop._handle(signal.SIGINT, None)  # deferred, no exception here
                done = True
        assert done
        with pytest.raises(KeyboardInterrupt):
            stop._handle(signal.SIGINT, None)  # outside a write: at once


def test_a_run_stopped_after_its_final_checkpoint_gets_its_final_evaluation_on_resume(tmp_path, capsys, train_args,
                                                                                        digits):
    """Killed between its final checkpoint and the end of its final evaluation (the save comes first), a run's
    ``resume=auto`` evaluates the final weights and logs the end, instead of 'nothing to do' without the figure."""
    args = train_args("max_steps=2", f"eval.zeroshot={digits['zeroshot']}", "eval.every=0")
    assert cli(args) == 0
    path = tmp_path / "run" / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    final_eval = [r for r in records if "eval/zeroshot/top1" in r]
    assert [r["step"] for r in final_eval] == [2] and records[-1]["event"] == "end"
    cut = max(i for i, r in enumerate(records) if r.get("event") == "checkpoint") + 1
    path.write_text("".join(json.dumps(r) + "\n" for r in records[:cut]))  # what a kill during the eval leaves
    capsys.readouterr()

    assert cli(train_args("max_steps=2", f"eval.zeroshot={digits['zeroshot']}", "eval.every=0", "resume=auto")) == 0
    assert "stopped before its final evaluation; evaluating now" in capsys.readouterr().out
    after = [json.loads(line) for line in path.read_text().splitlines()][cut:]
    assert [r.get("event") for r in after if "event" in r] == ["resume", "end"]
    again = [r for r in after if "eval/zeroshot/top1" in r]
    assert len(again) == 1 and again[0]["step"] == 2
    assert again[0]["eval/zeroshot/top1"] == final_eval[0]["eval/zeroshot/top1"]  # the same weights, the same figure
    assert not any("train/loss" in r for r in after)  # no step was trained again

    assert cli(train_args("max_steps=2", f"eval.zeroshot={digits['zeroshot']}", "eval.every=0", "resume=auto")) == 0
    assert "is finished (step 2 of 2): nothing to do" in capsys.readouterr().out
