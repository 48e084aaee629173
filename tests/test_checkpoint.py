"""Checkpoints: round trip of every piece of state, atomic layout, keep-last-K, damaged newest skipped on resume."""
from __future__ import annotations

import json
import logging
import random

import numpy as np
import pytest
import torch
from torch import nn

from evaclip import checkpoint as ckpt


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))


def _trained(seed=0):
    torch.manual_seed(seed)
    model = Tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    for _ in range(3):
        model.lin(torch.randn(2, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return model, opt, sched


class Stateful:
    """A named checkpoint entry: anything with ``state_dict()`` / ``load_state_dict()``."""

    def __init__(self, state=None):
        self.state = dict(state or {})

    def state_dict(self):
        return dict(self.state)

    def load_state_dict(self, state):
        self.state = dict(state)


def _save(root, step, model, opt, sched=None, scaler=None, keep_last=3, **extra):
    states = {"trainer": Stateful({"epoch": 1, "batch_in_epoch": 7}), "scheduler": sched, "scaler": scaler, **extra}
    return ckpt.save_checkpoint(root, step, model, opt, states={k: v for k, v in states.items() if v is not None},
                                config_yaml="seed: 0\n", keep_last=keep_last)


def test_round_trip_restores_model_optimizer_schedule_scaler_and_rng(tmp_path):
    model, opt, sched = _trained()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=True)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = _save(tmp_path, 30, model, opt, sched, scaler)
    expect = (random.random(), np.random.rand(), torch.rand(2))

    assert path.name == "step_00000030" and (path / "meta.json").is_file()
    meta = ckpt.verify_checkpoint(path)
    assert set(meta["files"]) == {"model.pt", "optimizer.pt", "scheduler.pt", "scaler.pt", "trainer.pt",
                                  "config.yaml", "rng_rank0.pt"}
    assert meta["entries"] == ["scaler", "scheduler", "trainer"]
    for name in ("model.pt", "optimizer.pt", "scheduler.pt", "scaler.pt", "trainer.pt", "rng_rank0.pt"):
        torch.load(path / name, weights_only=True)  # only tensors and primitives stored

    model2, opt2, sched2 = _trained(seed=5)
    scaler2 = torch.amp.GradScaler("cpu", init_scale=2.0, enabled=True)
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    trainer = Stateful()
    state = ckpt.load_checkpoint(path, model2, opt2, states={"trainer": trainer, "scheduler": sched2,
                                                               "scaler": scaler2})
    assert trainer.state == state
    assert state["step"] == 30 and state["epoch"] == 1 and state["batch_in_epoch"] == 7
    assert state["config_yaml"] == "seed: 0\n"
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    for k in s1["state"]:
        torch.testing.assert_close(s1["state"][k]["exp_avg_sq"], s2["state"][k]["exp_avg_sq"], rtol=0, atol=0)
    assert sched2.state_dict() == sched.state_dict() and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert scaler2.get_scale() == 1024.0
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert got[0] == expect[0] and got[1] == expect[1]
    torch.testing.assert_close(got[2], expect[2], rtol=0, atol=0)


def test_keep_last_and_tmp_folders_are_ignored(tmp_path):
    model, opt, _ = _trained()
    for step in (10, 20, 30, 40):
        _save(tmp_path, step, model, opt, keep_last=2)
    (tmp_path / ".tmp_step_00000050").mkdir()  # a save killed half-way
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000040", "step_00000030"]
    assert ckpt.find_resume_checkpoint(tmp_path).name == "step_00000040"
    # the next save of that step clears the stale temporary folder
    _save(tmp_path, 50, model, opt, keep_last=2)
    assert not (tmp_path / ".tmp_step_00000050").exists()
    assert ckpt.find_resume_checkpoint(tmp_path).name == "step_00000050"


def test_a_save_the_disk_cannot_take_is_one_line_and_keeps_the_last_checkpoint(tmp_path):
    """A real failed write (a file size limit: the kernel refuses the write as a full disk does) in the middle of
    model.pt: CheckpointError says which step, why, the space left and what to resume from; the partial folder is
    gone and the earlier checkpoint still verifies."""
    import resource
    import signal

    model, opt, _ = _trained()
    model.big = nn.Linear(128, 128)  # model.pt about 68 kB
    _save(tmp_path, 10, model, opt)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails (EFBIG) instead of killing us
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, old_limit[1]))
    try:
        with pytest.raises(ckpt.CheckpointError) as err:
            _save(tmp_path, 20, model, opt)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"checkpoint save of step 20 under {tmp_path} failed (a file write failed: torch.save: "), msg
    assert "GiB free there" in msg and "step_00000010, is intact" in msg and "resume=auto" in msg, msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000010"]
    ckpt.verify_checkpoint(tmp_path / "step_00000010")


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_meta"])
def test_damaged_newest_checkpoint_is_reported_and_previous_used(tmp_path, caplog, damage):
    model, opt, _ = _trained()
    _save(tmp_path, 10, model, opt)
    newest = _save(tmp_path, 20, model, opt)
    target = newest / "model.pt"
    data = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        mid = len(data) // 2
        target.write_bytes(data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1:])
    else:
        (newest / "meta.json").unlink()
    with caplog.at_level(logging.WARNING, logger="evaclip"):
        chosen = ckpt.resolve_resume("auto", tmp_path)
    assert chosen.name == "step_00000010"
    reason = {"truncate": "truncated", "flip": "sha256", "no_meta": "no meta.json"}[damage]
    assert any("step_00000020" in r.getMessage() and reason in r.getMessage() for r in caplog.records), caplog.text


def test_resume_errors_name_the_problem(tmp_path):
    assert ckpt.resolve_resume(None, tmp_path) is None
    assert ckpt.resolve_resume("auto", tmp_path / "nothing") is None  # first launch of a run
    with pytest.raises(ckpt.CheckpointError, match="no such checkpoint"):
        ckpt.resolve_resume(str(tmp_path / "missing"), tmp_path)
    model, opt, _ = _trained()
    path = _save(tmp_path, 10, model, opt)
    meta = json.loads((path / "meta.json").read_text())
    meta["files"]["trainer.pt"]["size"] += 1
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ckpt.CheckpointError, match="trainer.pt"):
        ckpt.resolve_resume(str(path), tmp_path)


def test_model_mismatch_names_keys(tmp_path):
    model, opt, _ = _trained()
    path = _save(tmp_path, 10, model, opt)

    class Other(Tiny):
        def __init__(self):
            super().__init__()
            self.extra = nn.Linear(2, 2)

    with pytest.raises(ckpt.CheckpointError, match="extra.weight"):
        ckpt.load_checkpoint(path, Other())


def test_named_entries_round_trip_and_a_missing_one_starts_fresh(tmp_path, caplog):
    """A new engine feature is one more named entry: saved as its own file, restored into its object; an entry the
    folder lacks (a feature switched on at resume) keeps its fresh state, with a warning naming it."""
    model, opt, _ = _trained()
    shadow = {"w": torch.randn(3, 4), "count": torch.tensor(7)}
    path = _save(tmp_path, 10, model, opt, ema=Stateful(shadow))
    assert "ema.pt" in ckpt.verify_checkpoint(path)["files"]
    back, fresh = Stateful(), Stateful({"n": 1})
    with caplog.at_level(logging.WARNING, logger="evaclip"):
        ckpt.load_checkpoint(path, _trained(seed=5)[0], states={"ema": back, "other": fresh})
    assert back.state.keys() == shadow.keys() and all(torch.equal(back.state[k], shadow[k]) for k in shadow)
    assert fresh.state == {"n": 1} and "has no 'other' state" in caplog.text


def test_a_folder_written_before_named_entries_still_loads(tmp_path):
    """Checkpoints of existing runs: scheduler and scaler inside optim.pt, the task's state inside trainer.pt."""
    model, opt, sched = _trained()
    scaler = torch.amp.GradScaler("cpu", init_scale=512.0, enabled=True)
    path = _save(tmp_path, 10, model, opt)
    for name in ("scheduler.pt", "trainer.pt"):
        (path / name).unlink(missing_ok=True)
    torch.save({"scheduler": sched.state_dict(), "scaler": scaler.state_dict()}, path / "optim.pt")
    torch.save({"step": 10, "epoch": 1, "task": {"phase": 2}, "config_yaml": "seed: 0\n"}, path / "trainer.pt")
    sched2, scaler2, task = _trained(seed=5)[2], torch.amp.GradScaler("cpu", init_scale=2.0), Stateful()
    state = ckpt.load_checkpoint(path, _trained(seed=5)[0], states={"scheduler": sched2, "scaler": scaler2,
                                                                     "task": task})
    assert state["step"] == 10 and task.state == {"phase": 2}
    assert sched2.state_dict() == sched.state_dict() and scaler2.get_scale() == 512.0
    assert ckpt.saved_schedule(path) == sched.state_dict()
