"""Weight EMA (evaclip/engine/ema.py): the averages equal timm's ModelEmaV3 (decay warmup included); in a run they do
not perturb training, are evaluated beside the raw weights and exported with --ema; a resume mid-run reproduces the
uninterrupted averages bitwise with 1 and 2 processes, DDP and FSDP2."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from subprocess_runs import TRAIN, env, torchrun
from torch import nn
from toy_task import ToyTask  # noqa: I001  (tests/engine/toy_task.py)

from evaclip.config import TASKS, EmaCfg, load_config
from evaclip.engine import train
from evaclip.engine.ema import WeightEMA


@pytest.mark.parametrize("warmup", [False, True])
def test_averages_equal_timm_model_ema_v3(warmup):
    from timm.utils.model_ema import ModelEmaV3

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 2))
    ours = WeightEMA(model, EmaCfg(decay=0.99, warmup=warmup, warmup_gamma=1.0, warmup_power=2 / 3))
    ref = ModelEmaV3(model, decay=0.99, use_warmup=warmup, warmup_gamma=1.0, warmup_power=2 / 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for n in range(1, 13):
        model(torch.randn(8, 6)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        ours.update(model)
        ref.update(model, step=n)
        assert ours.decay(n) == pytest.approx(ref.get_decay(n), rel=1e-12)
    expect = ref.module.state_dict()
    assert ours.shadow.keys() == {k for k, v in expect.items() if v.is_floating_point()}
    for k, v in ours.shadow.items():
        torch.testing.assert_close(v, expect[k], rtol=1e-6, atol=0)


def test_every_n_and_swap_restores_the_training_weights_bitwise():
    model = nn.Linear(3, 3)
    ema = WeightEMA(model, SimpleNamespace(decay=0.5, warmup=False, warmup_gamma=1.0, warmup_power=1.0, every=2))
    first = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)  # update 1 of every 2: no change
    assert torch.equal(ema.shadow["weight"], first)
    ema.update(model)  # the first average: a copy
    assert torch.equal(ema.shadow["weight"], model.weight)
    raw = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.mul_(3.0)
    trained = model.weight.detach().clone()
    with ema.swapped_in(model):
        assert torch.equal(model.weight, raw)
    assert torch.equal(model.weight, trained)


def _toy(tmp_path, name, *extra):
    base = ["task=toy", "data.batch_size=8", "max_steps=6", "device=cpu", f"output_dir={tmp_path}", f"name={name}",
            "log.every=1", "log.tensorboard=false", "optim.name=adamw", "optim.lr=1e-3", "optim.warmup_steps=1",
            "ckpt.every=3", "ckpt.keep_last=5", "eval.every=3"]
    return load_config(None, base + list(extra))


def test_in_a_run_it_leaves_training_alone_is_evaluated_and_resumes_exactly(tmp_path, monkeypatch):
    monkeypatch.setitem(TASKS, "toy", f"{ToyTask.__module__}:ToyTask")
    off = train(_toy(tmp_path, "off"), ToyTask)
    on = train(_toy(tmp_path, "on", "ema.decay=0.8", "ema.warmup=true"), ToyTask)
    raw_off = torch.load(off.checkpoint / "model.pt", weights_only=True)
    raw_on = torch.load(on.checkpoint / "model.pt", weights_only=True)
    assert all(torch.equal(raw_off[k], raw_on[k]) for k in raw_off)  # the averages never touch the training weights
    recs = [json.loads(line) for line in (on.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "eval/ema/toy/step" in r] == [3, 6]
    ema = torch.load(on.checkpoint / "ema.pt", weights_only=True)
    assert int(ema["updates"]) == 6 and not any(torch.equal(ema["shadow"][k], raw_on[k]) for k in ["decoder.weight"])

    shutil.rmtree(on.run_dir / "ckpt" / "step_00000006")
    again = train(_toy(tmp_path, "on", "ema.decay=0.8", "ema.warmup=true", "resume=auto"), ToyTask)
    back = torch.load(again.checkpoint / "ema.pt", weights_only=True)
    assert int(back["updates"]) == 6
    assert all(torch.equal(back["shadow"][k], ema["shadow"][k]) for k in ema["shadow"])  # bitwise


def _final_ema(run_dir: Path) -> dict:
    from evaclip.runs import ema_weights

    return ema_weights(run_dir / "ckpt" / "step_00000006")


@pytest.mark.slow
@pytest.mark.parametrize("nproc,strategy", [(1, "ddp"), (2, "ddp"), (2, "fsdp")])  # FSDP on 1 process: as DDP
def test_resume_mid_run_reproduces_the_uninterrupted_ema_bitwise(tmp_path, nproc, strategy, run_args):
    """A run killed after its step-3 checkpoint (its later checkpoint and log dropped) resumes to the same averages,
    bitwise, as the run that was never interrupted; then ``evaclip export --ema`` exports exactly those averages."""
    launch = TRAIN if nproc == 1 else torchrun(nproc)
    args = run_args(f"dist.strategy={strategy}", "model.token_drop=0.5", "max_steps=6", "ckpt.every=3",
                    "ckpt.keep_last=5", "ema.decay=0.9", "ema.warmup=true", "ema.eval=false")
    run = tmp_path / "run"

    def go(*extra):
        proc = subprocess.run(launch + args + list(extra), cwd=tmp_path, env=env(), capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    go()
    uninterrupted = _final_ema(run)
    shutil.copytree(run / "ckpt" / "step_00000006", tmp_path / "kept")
    shutil.rmtree(run / "ckpt" / "step_00000006")
    go("resume=auto")
    resumed = _final_ema(run)
    assert resumed.keys() == uninterrupted.keys() and len(resumed) > 10
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)

    from evaclip.export import export
    from evaclip.runs import load_model

    export(str(run), str(tmp_path / "out"), "safetensors", ema=True)
    model, _ = load_model(str(run), ema=True)
    sd = model.state_dict()
    assert all(torch.equal(sd[k], resumed[k]) for k in resumed)
    from safetensors.torch import load_file

    image = load_file(str(tmp_path / "out" / "image" / "model.safetensors"))
    name = next(k for k in resumed if k.startswith("visual.blocks.0.attn"))
    assert torch.equal(image[name[len("visual."):]], resumed[name])
