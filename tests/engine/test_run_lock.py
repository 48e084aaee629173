"""One run at a time writes a run folder: the run holds ``RUN/run.lock`` (host, pid, torchrun job) while it runs, a
second process refuses in one line naming the holder, and a lock left by a killed process is taken over with a line.

The fast tests hold the lock in a helper process; the slow ones start two ``evaclip train`` processes 2 s apart into
one folder, as a user would (CLIP, MIM, and a 2-process torchrun beside a single process): the second refuses, the
first finishes with its own config and checkpoints.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from subprocess_runs import TRAIN, env, overrides, records, torchrun

from evaclip import checkpoint as ckpt
from evaclip.engine.run_dir import LOCK_NAME, RunFolderInUse, RunLock
from evaclip.train import cli

_HOLD = ("import sys, time; from evaclip.engine.run_dir import RunLock; RunLock(sys.argv[1]).acquire(); "
         "print('held', flush=True); time.sleep(600)")


def _holder(run_dir: Path) -> subprocess.Popen:
    """A process that takes ``run_dir``'s lock and keeps it until killed."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(run_dir)], env=env(), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


# The holder forks a child that outlives it (as DataLoader workers do for a few seconds after their parent is killed)
_HOLD_AND_FORK = ("import os, sys, time; from evaclip.engine.run_dir import RunLock; RunLock(sys.argv[1]).acquire(); "
                  "pid = os.fork()\n"
                  "if pid == 0: time.sleep(60); os._exit(0)\n"
                  "print(pid, flush=True); time.sleep(600)")


def test_a_forked_child_of_the_holder_does_not_keep_the_lock_after_the_holder_is_killed(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_AND_FORK, str(run)], env=env(), stdout=subprocess.PIPE,
                              text=True)
    child = int(holder.stdout.readline())
    try:
        with pytest.raises(RunFolderInUse):
            RunLock(run).acquire()
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        os.kill(child, 0)  # the child is still alive ...
        lock = RunLock(run)
        lock.acquire()  # ... and the folder is free: it was the old code's RunFolderInUse
        lock.release()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


def test_a_second_process_refuses_a_held_folder_naming_the_holder_then_takes_over_a_stale_lock(tmp_path, caplog):
    run = tmp_path / "run"
    holder = _holder(run)
    try:
        info = json.loads((run / LOCK_NAME).read_text())
        assert info["pid"] == holder.pid and info["host"] == socket.gethostname()
        with pytest.raises(RunFolderInUse, match=rf"run folder {run} is in use by process {holder.pid} on "
                                                 rf"{socket.gethostname()}"):
            RunLock(run).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the killed holder could not remove its lock file: the next run sees it is stale and takes it over, saying so
    assert (run / LOCK_NAME).is_file()
    lock = RunLock(run)
    with caplog.at_level(logging.WARNING):
        lock.acquire()
    assert f"taking over the lock left by process {holder.pid}" in caplog.text and "no longer running" in caplog.text
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (run / LOCK_NAME).exists()


def test_train_and_resume_into_a_live_runs_folder_refuse_in_one_line_and_touch_nothing(tmp_path, capsys, run_args):
    assert cli(run_args("max_steps=2", "ckpt.every=1", "ckpt.keep_last=5")) == 0
    run = tmp_path / "run"
    assert not (run / LOCK_NAME).exists()  # released at the end
    (run / "ckpt" / ".tmp_step_00000003").mkdir()  # a live run's checkpoint being written
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    holder = _holder(run)
    try:
        for extra in (["resume=auto", "max_steps=4"], ["name=run", "optim.lr=1e-3"]):
            capsys.readouterr()
            assert cli(run_args(*extra)) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and f"is in use by process {holder.pid}" in err, err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    after.pop(Path(LOCK_NAME))
    assert after == before and (run / "ckpt" / ".tmp_step_00000003").is_dir()  # run_info.json and temp files kept


def test_a_run_that_fails_after_taking_the_lock_leaves_no_folder(tmp_path, capsys, run_args):
    # global_batch is checked once the process group is up (after the lock): the folder the lock created goes again
    assert cli(run_args("global_batch=7")) == 2
    assert "global_batch" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------------------------------
# two processes 2 s apart, as users start them
# ----------------------------------------------------------------------------------------------------------------------
def _launch(prefix: list[str], args: list[str], cwd) -> subprocess.Popen:
    return subprocess.Popen(prefix + args, cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _while_running(b: subprocess.Popen, a: subprocess.Popen, run: Path, last_step: int) -> tuple[str, str]:
    """Wait for ``b`` while ``a`` trains; on a busy machine ``a`` could finish before ``b`` even starts, so ``a`` is
    paused (SIGSTOP: still alive, still holding its folder) near its last step until ``b`` has exited."""
    paused = False
    deadline = time.time() + 300
    while b.poll() is None and time.time() < deadline:
        if not paused and any(r.get("step", 0) >= last_step - 2 for r in _records_so_far(run)):
            os.killpg(a.pid, signal.SIGSTOP)
            paused = True
        time.sleep(0.05)
    out, err = b.communicate(timeout=60)
    if paused:
        os.killpg(a.pid, signal.SIGCONT)
    return out, err


def _records_so_far(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(line) for line in lines[:-1]]  # the last line may be half written


@pytest.mark.slow
@pytest.mark.parametrize("first,second,task", [("single", "single", "clip"), ("single", "single", "mim"),
                                               ("torchrun", "single", "clip"), ("single", "torchrun", "clip")])
def test_two_trains_started_2s_apart_into_one_folder(digits, teacher_run, tmp_path, first, second, task):
    launch = {"single": TRAIN, "torchrun": torchrun(2)}
    extra = [f"mim.teacher={teacher_run}"] if task == "mim" else []
    mine = overrides(digits, tmp_path, "shared", *extra, "max_steps=16", "ckpt.every=4", "ckpt.keep_last=10",
                     "optim.lr=1e-3", "eval.every=0")
    theirs = overrides(digits, tmp_path, "shared", *extra, "max_steps=4", "ckpt.every=1", "optim.lr=2e-3")
    if task == "mim":  # the MIM demo recipe (its schema has no CLIP sections)
        mine, theirs = ["demo_mim_cpu", *mine[1:]], ["demo_mim_cpu", *theirs[1:]]
    run = tmp_path / "shared"
    a = _launch(launch[first], mine, tmp_path)
    deadline = time.time() + 240
    while not (run / LOCK_NAME).is_file() and a.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert a.poll() is None, a.communicate()[1][-3000:]
    holder = json.loads((run / LOCK_NAME).read_text())
    time.sleep(2)
    b = _launch(launch[second], theirs, tmp_path)
    b_out, b_err = _while_running(b, a, run, last_step=16)
    a_out, a_err = a.communicate(timeout=600)
    assert a.returncode == 0, a_err[-3000:]
    # the second refuses in one line (each of its ranks, under torchrun) naming the holder
    refusals = [line for line in b_err.splitlines() if "is in use by" in line]
    assert b.returncode != 0 and refusals, b_err[-3000:]
    assert all(line == refusals[0] for line in refusals) and f"process {holder['pid']} on" in refusals[0]
    if second == "single":
        assert b.returncode == 2 and b_err.strip() == refusals[0], b_err[-3000:]
    if first == "torchrun":
        assert holder["job"] and holder["world_size"] == 2 and "torchrun job" in refusals[0]
    # the first run finished with its own config and every checkpoint it wrote
    assert "lr: 0.001" in (run / "config.yaml").read_text()
    assert [p.name for p in ckpt.list_checkpoints(run / "ckpt")] == [f"step_{s:08d}" for s in (16, 12, 8, 4)]
    events = [r["event"] for r in records(run) if "event" in r and r["event"] in ("start", "resume", "end")]
    assert events == ["start", "end"]
    assert not (run / LOCK_NAME).exists()
    print(f"\n[{first} then {second}, {task}] second process: {refusals[0]}")
