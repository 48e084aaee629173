"""FSDP2 sharded training on CPU with 2 gloo processes: parity with DDP, LAMB on shards, sharded checkpoints with
N -> M resharding, and an elastic restart under torchrun.

The multi-process workers live in tests/fsdp_harness.py (spawned) and tests/fsdp_elastic_worker.py (torchrun).
Tolerances: DDP and FSDP2 compute the same math, but FSDP reduce-scatters flat shards where DDP all-reduces buckets
and sums norms in another order, so weights agree to fp32 rounding (~3e-7 relative after a step, ~2e-6 after four);
through 10 steps of a tiny model on random batches that reaches ~3e-5 in the LAMB loss (~5e-7 with AdamW), hence
LOSS_RTOL = 1e-4. A real sharding error is far larger: shard-local LAMB norms move weights by ~7e-3 (the negative
control below). Resuming with the world size that saved is bitwise equal; with another world size the reductions
regroup, so LOSS_RTOL again.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import fsdp_harness as h
import pytest
import torch

from evaclip.config import ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent
WORLD, STEPS, G = 2, 10, 8  # 2 ranks, 10 steps, global batch 8 (4 per rank)
LOSS_RTOL = 1e-4  # DDP vs FSDP2, and resumed with another world size vs uninterrupted (fp32, CPU); see above


# ----------------------------------------------------------------------------------------------------------------------
# config, policies, unit discovery (no process group)
# ----------------------------------------------------------------------------------------------------------------------
def test_config_checks_name_the_key():
    from evaclip.config import DistCfg
    from evaclip.fsdp import check_fsdp_config

    # the config rejects both at load time, naming the key; the FSDP module's own check says the same
    with pytest.raises(ConfigError, match="dist.cpu_offload"):
        load_config(None, {"dist.cpu_offload": "true"})
    with pytest.raises(ConfigError, match="dist.backend"):
        load_config(None, {"dist.strategy": "fsdp", "dist.cpu_offload": "true", "dist.backend": "nccl"})
    with pytest.raises(ConfigError, match="dist.cpu_offload"):
        check_fsdp_config(DistCfg(cpu_offload=True))
    with pytest.raises(ConfigError, match="dist.backend"):
        check_fsdp_config(DistCfg(strategy="fsdp", cpu_offload=True, backend="nccl"))
    check_fsdp_config(load_config(None, {"dist.strategy": "fsdp", "precision": "bf16",
                                         "dist.cpu_offload": "true"}).dist)


def test_backend_policies_and_scaler():
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    from evaclip.distributed import backend_for
    from evaclip.fsdp import mixed_precision
    from evaclip.precision import make_grad_scaler

    cfg = load_config(None, {"dist.strategy": "fsdp", "dist.cpu_offload": "true"})
    assert backend_for(cfg.dist, torch.device("cuda", 0)) == "cpu:gloo,cuda:nccl"
    assert backend_for(cfg.dist, torch.device("cpu")) == "gloo"
    mp = mixed_precision("bf16")
    assert (mp.param_dtype, mp.reduce_dtype) == (torch.bfloat16, torch.float32)
    root = mixed_precision("bf16", root=True)
    assert root.param_dtype is None and root.output_dtype == torch.float32
    assert mixed_precision("fp32").param_dtype is None
    with pytest.raises(ConfigError, match="precision"):
        mixed_precision("fp8")
    assert isinstance(make_grad_scaler("fp16", "fsdp", torch.device("cpu")), ShardedGradScaler)
    assert not make_grad_scaler("bf16", "fsdp", torch.device("cpu")).is_enabled()
    assert type(make_grad_scaler("fp16", "ddp", torch.device("cpu"))) is torch.amp.GradScaler


def test_units_are_blocks_then_towers():
    from evaclip.fsdp import towers, transformer_blocks
    from evaclip.models import get_model_config

    model = h.make_model()
    blocks = transformer_blocks(model)
    names = {id(m): n for n, m in model.named_modules()}
    block_names = [names[id(b)] for b in blocks]
    assert any(n.startswith("visual.") for n in block_names) and any(n.startswith("text.") for n in block_names)
    cfg = get_model_config(h.MODEL)
    assert len(blocks) == cfg.vision.depth + cfg.text.depth
    assert [names[id(t)] for t in towers(model, blocks)] == ["visual", "text"]


def test_memory_estimate_shards_the_state(capsys):
    from evaclip.memory import _main, estimate_memory

    n_params = sum(p.numel() for p in h.make_model().parameters())
    cfg = load_config(None, {"model.name": h.MODEL, "dist.strategy": "fsdp", "precision": "bf16",
                             "model.grad_checkpointing": "true", "model.token_drop": "0.5"})
    fsdp = estimate_memory(cfg, 4)
    ddp = estimate_memory(load_config(None, {"model.name": h.MODEL, "precision": "bf16"}), 4)
    assert fsdp["weights_grads_optimizer"] * 2**30 == pytest.approx(16 * n_params / 4)
    assert ddp["weights_grads_optimizer"] * 2**30 == pytest.approx(16 * n_params)
    assert 0 < fsdp["activations"] < ddp["activations"]  # checkpointing + dropping keep less
    assert fsdp["total"] < ddp["total"]
    assert _main(["eva02_clip_bige14_plus", "--world", "8,144"]) == 0
    assert "| 144 |" in capsys.readouterr().out


def test_apply_fsdp_without_process_group_is_a_clear_error():
    from evaclip.fsdp import apply_fsdp

    with pytest.raises(RuntimeError, match="process group"):
        apply_fsdp(h.make_model())


# ----------------------------------------------------------------------------------------------------------------------
# 2 gloo processes: DDP vs FSDP2, LAMB on shards, optimizer memory, checkpoint mid-run
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    d = tmp_path_factory.mktemp("fsdp_parity")
    out, ckpt = d / "parity.json", d / "ckpt"
    h.launch(h.parity_worker, WORLD, str(out), str(ckpt), STEPS, G)
    return json.loads(out.read_text()), ckpt


@pytest.mark.slow
@pytest.mark.parametrize("opt", ["lamb", "adamw"])
def test_fsdp_matches_ddp_losses(parity, opt):
    losses = parity[0]["losses"]
    ddp, fsdp = losses[f"ddp/{opt}"], losses[f"fsdp/{opt}"]
    assert len(ddp) == len(fsdp) == STEPS
    assert ddp[-1] < ddp[0]  # it trains
    assert fsdp == pytest.approx(ddp, rel=LOSS_RTOL)


@pytest.mark.slow
def test_fsdp_composes_with_grad_checkpointing_token_drop_offload_and_compile(parity):
    losses = parity[0]["losses"]
    assert losses["compose/fsdp"] == pytest.approx(losses["compose/ddp"], rel=LOSS_RTOL)


@pytest.mark.slow
def test_fsdp_bf16_mixed_precision_tracks_ddp_autocast(parity):
    """bf16 parameters in FSDP2 vs fp32 parameters under autocast in DDP: the same math at bf16 resolution, not the
    same rounding (weights are rounded to bf16 before use, not at each matmul); 3 steps stay within 2%."""
    losses = parity[0]["losses"]
    assert all(math.isfinite(v) for v in losses["bf16/fsdp"])
    assert losses["bf16/fsdp"] == pytest.approx(losses["bf16/ddp"], rel=2e-2)


@pytest.mark.slow
def test_evaluation_with_uneven_calls_per_rank_inside_gathered(parity):
    r = parity[0]["gathered_eval"]  # rank 0's view: it made 1 call, rank 1 made 3, and nothing hung
    assert r["calls"] == 1 and r["max_diff"] == 0.0 and math.isfinite(r["loss_after"])


@pytest.mark.slow
def test_lamb_on_shards_equals_lamb_on_full_params(parity):
    """Uneven / empty shards, both LAMB variants: whole-parameter trust-ratio norms, so sharded == full; the
    negative control (norms of the local shard) moves the weights visibly differently."""
    for variant in ("torch_optimizer", "deepspeed"):
        r = parity[0]["lamb"][variant]
        assert r["moved"] > 1e-2
        assert r["sharded_vs_full"] < 1e-6
        assert r["local_norm_vs_full"] > 1e-4


@pytest.mark.slow
def test_optimizer_state_per_rank_is_one_over_n(parity):
    for opt in ("lamb", "adamw"):
        ddp = max(parity[0]["state_bytes"][f"ddp/{opt}"])
        fsdp = max(parity[0]["state_bytes"][f"fsdp/{opt}"])
        # dim-0 shards round up per parameter, so a tiny model lands slightly above 1/N
        assert fsdp / ddp == pytest.approx(1 / WORLD, abs=0.03), (opt, fsdp, ddp)


@pytest.mark.slow
def test_fp16_overflow_on_one_shard_skips_every_rank(parity):
    assert parity[0]["fp16_skip"] == {"scale": [2.0, 2.0], "stepped": [False, False]}


# ----------------------------------------------------------------------------------------------------------------------
# sharded checkpoint: 2 ranks -> 2 and -> 1, and a full state dict without a process group
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_resume_sharded_checkpoint_with_same_world_size_is_exact(parity):
    """Saved by 2 ranks at step 5, loaded into a differently initialised 2-rank model + optimizer (in the parity
    processes): the next 5 losses are bitwise those of the uninterrupted run."""
    res, _ = parity
    assert res["losses"]["resumed/2"] == res["losses"]["fsdp/lamb"][STEPS // 2:]


@pytest.mark.slow
def test_resume_sharded_checkpoint_with_one_rank(parity, tmp_path):
    res, ckpt = parity
    out = tmp_path / "resume.json"
    h.launch(h.resume_worker, 1, str(out), str(ckpt), STEPS // 2, STEPS, G)
    resumed = json.loads(out.read_text())["losses"]
    assert resumed == pytest.approx(res["losses"]["fsdp/lamb"][STEPS // 2:], rel=LOSS_RTOL)


@pytest.mark.slow
def test_load_full_state_dict_matches_the_live_model(parity):
    from evaclip.checkpoint_sharded import load_full_state_dict

    _, ckpt = parity
    ref = torch.load(ckpt.parent / "full_at_save.pt", weights_only=True)
    got = load_full_state_dict(ckpt)
    assert sorted(got) == sorted(ref)
    for k, v in ref.items():
        assert got[k].shape == v.shape and torch.equal(got[k], v), k
    model = h.make_model()
    model.load_state_dict(got, strict=True)  # an exportable, plain CLIP state dict


@pytest.mark.slow
def test_sharded_checkpoint_errors_name_the_problem(parity, tmp_path):
    from evaclip.checkpoint_sharded import load_full_state_dict

    _, ckpt = parity
    with pytest.raises(FileNotFoundError, match="not found"):
        load_full_state_dict(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="metadata"):
        load_full_state_dict(tmp_path)
    with pytest.raises(KeyError, match="has no 'weights' section"):
        load_full_state_dict(ckpt, prefix="weights")


# ----------------------------------------------------------------------------------------------------------------------
# evaclip.train end to end: torchrun elastic restart, then 2 -> 1 resume of the same run
# ----------------------------------------------------------------------------------------------------------------------
def _env():
    # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: torchrun then gives every restart round a fresh store. Its default shares
    # one store across rounds, where a restarted rank can read a dead peer's gloo address (pytorch/pytorch#135712):
    # a flaky "connectFullMesh ... Connection refused" on restart. docs/FSDP.md tells users the same.
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1", WANDB_MODE="disabled",
               TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _train_args(out_dir: Path, *extra: str) -> list[str]:
    return ["demo_cpu", f"model.name={h.MODEL}", "data.synthetic=true", "data.batch_size=4", "device=cpu",
            "dist.strategy=fsdp", f"output_dir={out_dir}", "name=elastic", "log.every=1", "log.tensorboard=false",
            "optim.warmup_steps=1", "model.token_drop_until=null", "model.token_drop=0.5", "ckpt.every=3",
            "ckpt.keep_last=2", "resume=auto", *extra]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_torchrun_restarts_a_killed_worker_and_finishes(tmp_path):
    """Rank 1 dies (SIGKILL) before its 5th step on the first attempt; torchrun restarts both workers, resume=auto
    picks up the step-3 sharded checkpoint, and the run ends with every step done (2 -> 1 ranks is
    test_resume_sharded_checkpoint_with_one_rank)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
           str(REPO / "tests" / "fsdp_elastic_worker.py"), "1", "5", *_train_args(tmp_path, "max_steps=6")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "elastic"
    recs = _records(run)
    resumes = [r for r in recs if r.get("event") == "resume"]
    assert len(resumes) == 1 and resumes[0]["step"] == 3, [r for r in recs if "event" in r]
    assert [r for r in recs if r.get("event") == "end"][-1]["step"] == 6
    steps = sorted({r["step"] for r in recs if "train/loss" in r})
    assert steps == [1, 2, 3, 4, 5, 6]
    # step 4 ran twice: before the kill (rank 0 logged it) and after the restart; model, optimizer, RNG (token-drop
    # masks) and data position all come back from the checkpoint, so both give the same loss
    step4 = [r["train/loss"] for r in recs if r.get("step") == 4 and "train/loss" in r]
    assert len(step4) == 2 and step4[0] == pytest.approx(step4[1], rel=1e-6)
    last = run / "ckpt" / "step_00000006"
    meta = json.loads((last / "meta.json").read_text())
    assert meta["strategy"] == "fsdp" and {"dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp"} <= set(
        meta["files"])

    # `evaclip export` reads the sharded checkpoint folder (no process group)
    from evaclip.checkpoint_sharded import load_full_state_dict
    from evaclip.export import export
    from evaclip.runs import load_model

    model, name = load_model(str(last))
    full = load_full_state_dict(last / "dcp")
    assert name == h.MODEL and sorted(full) == sorted(model.state_dict())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in full.items())
    assert export(str(last), str(tmp_path / "export"), "safetensors", check=False)
