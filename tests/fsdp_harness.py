"""Multi-process workers for tests/test_fsdp.py (gloo on CPU), and the optimizer-state memory measurement.

Not collected by pytest (no ``test_`` prefix). Each worker trains a tiny CLIP on a deterministic *global* batch of
which rank r takes rows [r*B, (r+1)*B), and logs the global mean loss (all-reduced), so runs with different world
sizes and strategies are comparable step by step.

Shapes: B local batch, G global batch, C channels, H/W image side, L context length.

Memory figure (the command quoted in docs/FSDP.md):
    .venv/bin/python tests/fsdp_harness.py memory --world 2 --width 512 --depth 8
"""
from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from evaclip.config import OptimCfg  # noqa: E402
from evaclip.losses import LossCfg  # noqa: E402

MODEL = "EVA02-CLIP-tiny"
IMAGE, CONTEXT, VOCAB = 32, 16, 64


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(fn, world: int, *args) -> None:
    """Run ``fn(rank, world, port, *args)`` in ``world`` spawned processes with a gloo group."""
    port = free_port()
    mp.spawn(_entry, args=(fn, world, port, args), nprocs=world, join=True)


def _entry(rank: int, fn, world: int, port: int, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        gc.collect()  # free FSDP2 / DTensor cycles while the group lives (see evaclip.distributed.cleanup)
        dist.barrier()  # nobody tears the group down while a peer is still in a collective
    finally:
        dist.destroy_process_group()
    # Success: results are already on disk. Leave without interpreter teardown, where a C++ thread destructor of the
    # gloo / DTensor stack occasionally aborts ("terminate called without an active exception", seen ~1 run in 10).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ----------------------------------------------------------------------------------------------------------------------
# model, data, one training loop
# ----------------------------------------------------------------------------------------------------------------------
def make_model(seed: int = 0, name: str = MODEL, **overrides) -> nn.Module:
    """A registered tiny CLIP (the EVA02 one by default) with a fixed init (same weights on every rank and run)."""
    from evaclip.models import create_model

    torch.manual_seed(seed)
    overrides.setdefault("attn_backend", "eager")
    return create_model(name, **overrides)


def global_batch(step: int, G: int, vocab: int = VOCAB, context: int = CONTEXT):
    """Deterministic (images_GCHW, tokens_GL) of ``step``: the same on every rank and for every world size."""
    g = torch.Generator().manual_seed(1000 + step)
    images = torch.randn(G, 3, IMAGE, IMAGE, generator=g)
    tokens = torch.randint(1, vocab - 1, (G, context), generator=g)
    tokens[:, -1] = vocab - 1  # EOT (the highest id) last, where the text tower pools
    return images, tokens


def wrap(model: nn.Module, strategy: str, **fsdp_kwargs) -> nn.Module:
    if strategy == "fsdp":
        from evaclip.fsdp import apply_fsdp

        return apply_fsdp(model, **fsdp_kwargs)
    if strategy == "ddp":
        return nn.parallel.DistributedDataParallel(model) if dist.get_world_size() > 1 else model
    raise ValueError(strategy)


def optim_cfg(name: str) -> OptimCfg:
    return OptimCfg(name=name, lr=5e-4, weight_decay=0.05, betas=[0.9, 0.98], grad_clip_norm=1.0, visual_ld=0.8,
                    schedule="const")


def train_steps(model, optimizer, steps: range, G: int, vocab: int = VOCAB, context: int = CONTEXT,
                bf16: bool = False) -> list[float]:
    """Train on the global batches of ``steps`` (``bf16``: under CPU autocast, as train.py runs precision=bf16);
    returns the global mean loss of each step."""
    import contextlib

    from evaclip.losses import build_loss
    from evaclip.optim import clamp_logit_scale_, clip_grad_norm_

    rank, world = dist.get_rank(), dist.get_world_size()
    B = G // world
    loss_fn = build_loss(LossCfg(name="clip", local_loss=True, gather_with_grad=True))
    losses = []
    model.train()
    for step in steps:
        images, tokens = global_batch(step, G, vocab, context)
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            out = model(images[rank * B:(rank + 1) * B], tokens[rank * B:(rank + 1) * B])
            loss = loss_fn(out.image_features, out.text_features, out.logit_scale)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_grad_norm_(model, 1.0)
        optimizer.step()
        clamp_logit_scale_(model)
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
    return losses


def _write(out: str, rank: int, payload: dict) -> None:
    if rank == 0:
        Path(out).write_text(json.dumps(payload))


# ----------------------------------------------------------------------------------------------------------------------
# workers
# ----------------------------------------------------------------------------------------------------------------------
def parity_worker(rank: int, world: int, out: str, ckpt: str, steps: int, G: int) -> None:
    """DDP vs FSDP2 losses for LAMB and AdamW; optimizer-state bytes per rank; a sharded checkpoint mid-run."""
    from evaclip.checkpoint_sharded import full_model_state_dict, save_sharded
    from evaclip.fsdp import optimizer_state_bytes
    from evaclip.optim import build_optimizer

    res: dict = {"losses": {}, "state_bytes": {}, "lamb": lamb_norm_check(rank, world),
                 "fp16_skip": fp16_skip_check(rank, world)}
    half = steps // 2
    for opt in ("lamb", "adamw"):
        for strategy in ("ddp", "fsdp"):
            model = wrap(make_model(), strategy)
            optimizer = build_optimizer(model, optim_cfg(opt))
            losses = train_steps(model, optimizer, range(half), G)
            if strategy == "fsdp" and opt == "lamb":
                save_sharded(ckpt, model, optimizer)
                full = full_model_state_dict(model)
                if rank == 0:
                    torch.save(full, Path(ckpt).parent / "full_at_save.pt")
            losses += train_steps(model, optimizer, range(half, steps), G)
            res["losses"][f"{strategy}/{opt}"] = losses
            state = torch.tensor([optimizer_state_bytes(optimizer)], dtype=torch.float64)
            gathered = [torch.zeros_like(state) for _ in range(world)]
            dist.all_gather(gathered, state)
            res["state_bytes"][f"{strategy}/{opt}"] = [int(t.item()) for t in gathered]
    res["gathered_eval"] = gathered_eval_check(rank, model, optimizer, G)
    res["losses"][f"resumed/{world}"] = resume_losses(ckpt, half, steps, G)
    res["losses"].update(composition_losses(rank))
    _write(out, rank, res)


def composition_losses(rank: int, steps: int = 3, G: int = 8) -> dict:
    """FSDP2 composed with per-block gradient checkpointing, 50% token dropping, CPU offload and per-block
    torch.compile (aot_eager: dynamo + autograd tracing without a C++ compile) vs DDP with the same model options;
    and bf16 (FSDP2 bf16 parameters + autocast) vs DDP + autocast. Same per-rank RNG stream (token-drop masks) in
    each pair."""
    from evaclip.optim import build_optimizer

    runs = {
        "compose/ddp": ("ddp", dict(token_drop=0.5, grad_checkpointing=True), {}, False),
        "compose/fsdp": ("fsdp", dict(token_drop=0.5, grad_checkpointing=True),
                         dict(cpu_offload=True, compile=True, compile_kwargs=dict(backend="aot_eager")), False),
        "bf16/ddp": ("ddp", {}, {}, True),
        "bf16/fsdp": ("fsdp", {}, dict(precision="bf16"), True),
    }
    res = {}
    for name, (strategy, model_kw, fsdp_kw, bf16) in runs.items():
        model = wrap(make_model(**model_kw), strategy, **fsdp_kw)
        optimizer = build_optimizer(model, optim_cfg("lamb"))
        torch.manual_seed(100 + rank)
        res[name] = train_steps(model, optimizer, range(steps), G, bf16=bf16)
    return res


def gathered_eval_check(rank: int, model, optimizer, G: int) -> dict:
    """Evaluation inside ``evaclip.fsdp.gathered``: ranks call the sharded model a different number of times (as
    uneven eval splits do) and get the same features as a normal sharded forward; training continues after."""
    from evaclip.fsdp import gathered

    images, tokens = global_batch(0, G)
    model.eval()
    with torch.no_grad():
        ref_img, ref_txt = model.encode_image(images[:2]), model.encode_text(tokens[:2])  # per-call all-gathers
        with gathered(model):
            calls = [(model.encode_image(images[:2]), model.encode_text(tokens[:2])) for _ in range(1 + 2 * rank)]
    diff = max(max((a - ref_img).abs().max().item(), (b - ref_txt).abs().max().item()) for a, b in calls)
    model.train()
    after = train_steps(model, optimizer, range(1), G)
    return {"max_diff": diff, "calls": len(calls), "loss_after": after[0]}


def resume_losses(ckpt: str, start: int, steps: int, G: int) -> list[float]:
    """Load the mid-run sharded checkpoint into a fresh FSDP2 model + LAMB and train steps [start, steps)."""
    from evaclip.checkpoint_sharded import load_sharded
    from evaclip.optim import build_optimizer

    model = wrap(make_model(seed=123), "fsdp")  # a different init: everything must come from the checkpoint
    optimizer = build_optimizer(model, optim_cfg("lamb"))
    load_sharded(ckpt, model, optimizer)
    return train_steps(model, optimizer, range(start, steps), G)


def tower_worker(rank: int, world: int, out: str, ckpt: str, steps: int, G: int, name: str) -> None:
    """Another image tower (``name``, e.g. ViTamin-tiny) through the EVA towers' checks, LAMB throughout: DDP losses
    (with ``world`` 1 the single-process reference), and with 2 ranks FSDP2 losses, a sharded checkpoint at
    ``steps // 2`` resumed into a differently initialised FSDP2 model, and FSDP2 + grad checkpointing + 50 % token
    dropping + per-unit torch.compile (aot_eager) vs DDP with the same model options."""
    from evaclip.checkpoint_sharded import load_sharded, save_sharded
    from evaclip.optim import build_optimizer

    half, res = steps // 2, {}
    model = wrap(make_model(name=name), "ddp")
    res["ddp"] = train_steps(model, build_optimizer(model, optim_cfg("lamb")), range(steps), G)
    if world > 1:
        model = wrap(make_model(name=name), "fsdp")
        optimizer = build_optimizer(model, optim_cfg("lamb"))
        res["fsdp"] = train_steps(model, optimizer, range(half), G)
        save_sharded(ckpt, model, optimizer)
        res["fsdp"] += train_steps(model, optimizer, range(half, steps), G)
        model = wrap(make_model(seed=123, name=name), "fsdp")
        optimizer = build_optimizer(model, optim_cfg("lamb"))
        load_sharded(ckpt, model, optimizer)
        res["resumed"] = train_steps(model, optimizer, range(half, steps), G)
        compose = dict(token_drop=0.5, grad_checkpointing=True)
        for strategy, kw in (("ddp", {}), ("fsdp", dict(compile=True, compile_kwargs=dict(backend="aot_eager")))):
            model = wrap(make_model(name=name, **compose), strategy, **kw)
            optimizer = build_optimizer(model, optim_cfg("lamb"))
            torch.manual_seed(100 + rank)
            res[f"compose/{strategy}"] = train_steps(model, optimizer, range(3), G)
    _write(out, rank, res)


def resume_worker(rank: int, world: int, out: str, ckpt: str, start: int, steps: int, G: int) -> None:
    """``resume_losses`` with ``world`` ranks (the checkpoint was written by 2)."""
    _write(out, rank, {"losses": resume_losses(ckpt, start, steps, G)})


def lamb_norm_check(rank: int, world: int) -> dict:
    """One LAMB step on FSDP2-sharded parameters vs on an unsharded copy with the same (averaged) gradients.

    Shapes are chosen so dim 0 does not divide evenly by the world size (uneven and empty shards) and the trust
    ratio is far from 1, so a norm of the local shard instead of the whole parameter changes the update.
    """
    from evaclip.fsdp import apply_fsdp
    from evaclip.optim import Lamb

    class Block(nn.Module):
        def __init__(self, d_in, d_out):
            super().__init__()
            self.fc = nn.Linear(d_in, d_out)

        def forward(self, x):
            return torch.tanh(self.fc(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block(6, 7), Block(7, 5), Block(5, 1)])
            self.scale = nn.Parameter(torch.tensor(0.5))

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return x * self.scale

    torch.manual_seed(0)
    init = Net()
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(3))
    B = 8 // world
    opt_kw = dict(lr=0.05, weight_decay=0.1, betas=(0.9, 0.99))

    def run(variant: str, sharded_run: bool) -> dict:
        net = Net()
        net.load_state_dict(init.state_dict())
        if sharded_run:
            apply_fsdp(net)
        opt = Lamb(net.parameters(), variant=variant, **opt_kw)
        for _ in range(3):
            xb = x[rank * B:(rank + 1) * B] if sharded_run else x  # full-batch grad == the rank-averaged one
            (net(xb) ** 2).mean().backward()
            opt.step()
            opt.zero_grad()
        return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach() for n, p in net.named_parameters()}

    def max_diff(a: dict, b: dict) -> float:
        return max((a[n] - b[n]).abs().max().item() for n in a)

    import evaclip.optim.lamb as lamb_mod

    res = {}
    start = {n: p.detach() for n, p in init.named_parameters()}
    for variant in ("torch_optimizer", "deepspeed"):
        full = run(variant, False)
        res[variant] = {"sharded_vs_full": max_diff(run(variant, True), full), "moved": max_diff(full, start)}
        # Negative control: norms of the local shard only (the bug the batched reduction prevents) must differ.
        lamb_mod.global_sq_norms = functools.partial(_local_norms_only, lamb_mod.global_sq_norms)
        try:
            res[variant]["local_norm_vs_full"] = max_diff(run(variant, True), full)
        finally:
            lamb_mod.global_sq_norms = lamb_mod.global_sq_norms.args[0]
    return res


def fp16_skip_check(rank: int, world: int) -> dict:
    """An fp16 overflow in one rank's gradient shard only: every rank must skip the step and lower the scale."""
    from evaclip.fsdp import apply_fsdp
    from evaclip.precision import make_grad_scaler

    model = apply_fsdp(make_model(), precision="fp32")
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scaler = make_grad_scaler("fp16", "fsdp", torch.device("cpu"))
    scaler._init_scale = 4.0
    images, tokens = global_batch(0, 2 * world)
    out = model(images[rank * 2:(rank + 1) * 2], tokens[rank * 2:(rank + 1) * 2])
    scaler.scale(out.image_features.sum() + out.text_features.sum()).backward()
    p = next(q for q in model.parameters() if q.ndim >= 2 and q.shape[0] >= 2 * world)  # non-empty shards
    if rank == world - 1:
        p.grad.to_local().view(-1)[0] = float("inf")  # lives in this rank's shard only
    before = p.full_tensor().clone()
    scaler.step(optimizer)
    scaler.update()
    stepped = torch.tensor([float(not torch.equal(before, p.full_tensor()))])
    scale = torch.tensor([scaler.get_scale()])
    got = [torch.zeros(2) for _ in range(world)]
    dist.all_gather(got, torch.cat([scale, stepped]))
    return {"scale": [g[0].item() for g in got], "stepped": [bool(g[1].item()) for g in got]}


def _local_norms_only(orig, tensors, like):
    return orig(tensors, tensors)  # plain local tensors as "like": no reduction over the shard group


def memory_worker(rank: int, world: int, out: str, width: int, depth: int, strategies: list) -> None:
    """Optimizer-state bytes per rank after one LAMB step, DDP vs FSDP2, for a mid-sized tower."""
    from evaclip.fsdp import optimizer_state_bytes, param_bytes
    from evaclip.optim import build_optimizer

    res = {}
    G = 2 * world
    for strategy in strategies:
        over = {"vision.width": width, "vision.depth": depth, "text.width": width, "text.layers": depth}
        model = wrap(make_model(**over), strategy)
        optimizer = build_optimizer(model, optim_cfg("lamb"))
        train_steps(model, optimizer, range(1), G)
        local = torch.tensor([optimizer_state_bytes(optimizer), param_bytes(model)], dtype=torch.float64)
        peak = local.clone()
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        res[strategy] = {"optimizer_state_bytes_max_rank": int(peak[0]), "param_bytes_max_rank": int(peak[1]),
                         "params": sum(p.numel() for p in model.parameters())}
        del model, optimizer
    _write(out, rank, res)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("memory", help="optimizer-state bytes per rank, DDP vs FSDP2")
    m.add_argument("--world", type=int, default=2)
    m.add_argument("--width", type=int, default=512)
    m.add_argument("--depth", type=int, default=8)
    m.add_argument("--out", default=None, help="JSON result file (default: a temporary file)")
    args = p.parse_args(argv)
    if args.out is None:
        import tempfile

        args.out = str(Path(tempfile.mkdtemp()) / "fsdp_memory.json")
    launch(memory_worker, args.world, args.out, args.width, args.depth, ["ddp", "fsdp"])
    res = json.loads(Path(args.out).read_text())
    for k, v in res.items():
        print(f"{k}: params {v['params']:,}  optimizer state / rank {v['optimizer_state_bytes_max_rank'] / 2**20:.2f} "
              f"MiB  params / rank {v['param_bytes_max_rank'] / 2**20:.2f} MiB")
    ratio = res["fsdp"]["optimizer_state_bytes_max_rank"] / res["ddp"]["optimizer_state_bytes_max_rank"]
    print(f"fsdp / ddp optimizer state per rank: {ratio:.3f} (1/N = {1 / args.world:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
