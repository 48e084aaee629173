"""End-to-end runs in subprocesses, as users launch them: a 2-process torchrun (gloo) run, and SIGKILL mid-run then
``resume=auto`` (with the newest checkpoint corrupted) continuing exactly like an uninterrupted run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from subprocess_runs import MODEL, TRAIN, assert_continues_like, kill_after_checkpoint, torchrun
from subprocess_runs import env as _env
from subprocess_runs import overrides as _overrides
from subprocess_runs import records as _records

pytestmark = pytest.mark.slow


def test_torchrun_two_processes_gloo_finishes_and_writes_checkpoints(digits, tmp_path):
    cmd = torchrun(2) + _overrides(digits, tmp_path, "ddp", "max_steps=4", "ckpt.every=2", "ckpt.keep_last=3",
                                   f"eval.zeroshot={digits['zeroshot']}", "eval.batch_size=128")
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "ddp"
    ckpts = sorted(p.name for p in (run / "ckpt").iterdir())
    assert ckpts == ["step_00000002", "step_00000004"]
    meta = json.loads((run / "ckpt" / "step_00000004" / "meta.json").read_text())
    assert meta["world_size"] == 2 and {"rng_rank0.pt", "rng_rank1.pt", "model.pt"} <= set(meta["files"])
    recs = _records(run)
    start = next(r for r in recs if r.get("event") == "start")
    assert start["world_size"] == 2 and start["global_batch"] == 16
    losses = [r["train/loss"] for r in recs if "train/loss" in r]
    assert len(losses) == 4 and all(0 < v < 20 for v in losses)
    zs = [r for r in recs if "eval/zeroshot/top1" in r]
    assert zs and zs[-1]["eval/zeroshot/num_samples"] == digits["zeroshot_num_samples"]
    assert "step 4/4" in proc.stdout and "[rank 1]" not in proc.stdout  # progress from rank 0 only


def test_sigkill_then_resume_auto_continues_exactly(digits, tmp_path):
    """Kill a run after its step-8 checkpoint, corrupt that checkpoint, resume=auto: the run goes back to step 4 (and
    says why), then every later step's loss and lr equal an uninterrupted run's (token dropping on, so the RNG state
    and the data position must both be restored)."""
    common = ["max_steps=14", "ckpt.every=4", "ckpt.keep_last=3", "model.token_drop=0.5"]
    target = tmp_path / "victim" / "ckpt" / "step_00000008"
    kill_after_checkpoint(TRAIN + _overrides(digits, tmp_path, "ref", *common),
                          TRAIN + _overrides(digits, tmp_path, "victim", *common), target, tmp_path)

    model_pt = target / "model.pt"
    data = model_pt.read_bytes()
    model_pt.write_bytes(data[: len(data) // 3])  # truncated, as by a crash during a copy
    resumed = subprocess.run(TRAIN + _overrides(digits, tmp_path, "victim", *common, "resume=auto"), cwd=tmp_path,
                             env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "skipping checkpoint step_00000008" in resumed.stdout and "truncated" in resumed.stdout

    assert_continues_like(tmp_path / "victim", tmp_path / "ref", resumed_at=4, last_step=14)


def _signal_at_step_2(proc: subprocess.Popen, metrics, send) -> None:
    """Wait (at most 2 min) until the run has logged step 2, then ``send()`` its signal; a run that ended before
    that fails here with its own output."""
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline and '"step": 2,' not in (
            metrics.read_text() if metrics.is_file() else ""):
        time.sleep(0.05)
    if proc.poll() is not None:
        raise AssertionError(f"the run ended (exit {proc.returncode}) before the signal:\n{proc.stdout.read()[-3000:]}")
    send()


def test_sigterm_saves_a_checkpoint_then_exits(tmp_path):
    """A scheduler's SIGTERM: the current step finishes, a checkpoint is written, the exit code says 'not finished'."""
    cmd = [sys.executable, "-m", "evaclip.train", "demo_cpu", f"model.name={MODEL}", "data.synthetic=true",
           "data.batch_size=4", "device=cpu", f"output_dir={tmp_path}", "name=term", "log.every=1",
           "log.tensorboard=false", "max_steps=100000", "optim.warmup_steps=1", "model.token_drop_until=null"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _signal_at_step_2(proc, tmp_path / "term" / "metrics.jsonl", lambda: proc.send_signal(signal.SIGTERM))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    end = _records(tmp_path / "term")[-1]
    assert end["event"] == "end" and end["status"] == "preempted" and end["step"] >= 2
    from evaclip.checkpoint import list_checkpoints, verify_checkpoint

    (newest,) = list_checkpoints(tmp_path / "term" / "ckpt")
    assert newest.name == f"step_{end['step']:08d}"
    verify_checkpoint(newest)


@pytest.mark.parametrize("under_torchrun", [True, False])
def test_exit_process_flushes_and_keeps_the_code(under_torchrun):
    """Under torchrun the process leaves with os._exit (no teardown aborts) after flushing; else a normal exit."""
    code = ("import atexit, sys; from evaclip.distributed import exit_process; "
            "atexit.register(lambda: print('atexit ran')); print('done', end=''); sys.stderr.write('err'); "
            "exit_process(3)")
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHELASTIC_RUN_ID", "WORLD_SIZE")}
    if under_torchrun:
        env["TORCHELASTIC_RUN_ID"] = "test"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 3
    assert out.stdout.startswith("done") and out.stderr == "err"
    assert ("atexit ran" in out.stdout) is not under_torchrun  # os._exit skips interpreter teardown


def test_ctrl_c_saves_once_says_how_to_resume_and_exits_130(digits, tmp_path):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it, DataLoader workers included): one message, a
    checkpoint, exit code 130, and the last line says how to continue."""
    cmd = [sys.executable, "-m", "evaclip.train", *_overrides(digits, tmp_path, "ctrlc", "max_steps=100000")]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    _signal_at_step_2(proc, tmp_path / "ctrlc" / "metrics.jsonl", lambda: os.killpg(proc.pid, signal.SIGINT))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, out[-3000:]
    assert out.count("received SIGINT") == 1, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert "resume=auto" in last and "ctrlc/config.yaml" in last, last
    from evaclip.checkpoint import list_checkpoints

    assert list_checkpoints(tmp_path / "ctrlc" / "ckpt")
    # the command it prints continues the run (here: max_steps set to where it stopped, so the run is at its end
    # without its final evaluation, which it runs, then ends)
    step = _records(tmp_path / "ctrlc")[-1]["step"]
    again = subprocess.run([sys.executable, "-m", "evaclip.train", str(tmp_path / "ctrlc" / "config.yaml"),
                            "resume=auto", f"max_steps={step}"], cwd=tmp_path, env=_env(), capture_output=True,
                           text=True, timeout=240)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "stopped before its final evaluation; evaluating now" in again.stdout + again.stderr
    end = _records(tmp_path / "ctrlc")[-1]
    assert (end["event"], end["step"], end["status"]) == ("end", step, "finished")
