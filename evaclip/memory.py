"""Computed GPU memory per rank of a recipe (``python -m evaclip.memory RECIPE --world 8,16``): a planner for choosing
the strategy (DDP / FSDP2), batch size, precision and gradient checkpointing before launching.
"""
from __future__ import annotations

import torch

from evaclip.fsdp import towers, transformer_blocks

_GIB = 2**30
_CUDA_OVERHEAD = 1.5 * _GIB  # CUDA context, cuBLAS / flash workspaces, NCCL buffers (typical, not measured here)


def _block_activation_bytes_per_token(width: int, hidden: int, swiglu: bool, subln: bool, act_bytes: int) -> int:
    """Tensors one transformer block keeps for backward, per token (fused SDPA / flash attention: no N x N scores).

    ~11 width-sized tensors (norm in/out x2, q, k, v, RoPE'd q/k or attention out, sub-LN, projection in) plus the
    MLP's hidden-sized ones: 2 for GELU (fc1 out, activation out), 5 for SwiGLU with sub-LN (w1, w2, silu, product,
    ffn_ln). An estimate, good to ~20%.
    """
    mlp = (4 + int(subln)) if swiglu else 2
    return (11 * width + mlp * hidden) * act_bytes


def estimate_memory(cfg, world_size: int) -> dict[str, float]:
    """Computed GPU memory per rank (GiB) of one training step of ``cfg`` on ``world_size`` ranks.

    Exact parts: parameter counts (the model is built on the meta device) and the sharded fp32 state (master
    weights, gradients, two optimizer moments: 16 bytes per parameter, / ranks with FSDP). Estimated parts: activations
    (``_block_activation_bytes_per_token``; with gradient checkpointing one saved input per block plus one block's
    recompute), the gathered weights of the blocks in flight, the contrastive logits, and a fixed CUDA overhead.
    """
    from evaclip.models import create_model, get_model_config

    mc = get_model_config(cfg.model.name, **cfg.model.overrides)
    with torch.device("meta"):
        model = create_model(cfg.model.name, attn_backend="eager", **cfg.model.overrides)
    n_params = sum(p.numel() for p in model.parameters())
    fsdp = cfg.dist.strategy == "fsdp"
    shard = world_size if fsdp else 1
    low = cfg.precision in ("bf16", "fp16")
    act_bytes = 2 if low else 4
    param_bytes = 2 if (low and fsdp) else 4
    out = {"params_billion": n_params / 1e9}
    state = 16 * n_params / shard
    out["weights_grads_optimizer"] = 0.0 if (fsdp and cfg.dist.cpu_offload) else state / _GIB
    out["host_offloaded"] = state / _GIB if (fsdp and cfg.dist.cpu_offload) else 0.0
    blocks = transformer_blocks(model)
    biggest_block = max(sum(p.numel() for p in b.parameters()) for b in blocks)
    tower_own = max(sum(p.numel() for p in t.parameters()) - sum(sum(p.numel() for p in b.parameters())
                    for b in transformer_blocks(t)) for t in towers(model, blocks))
    if fsdp:  # current + prefetched block gathered, one block's unsharded grad and its fp32 reduce-scatter input
        gathered = 2 * biggest_block * param_bytes + biggest_block * (param_bytes + 4) + tower_own * param_bytes
    else:  # autocast keeps a low-precision copy of every weight during forward
        gathered = n_params * 2 if low else 0
    out["gathered_weights"] = gathered / _GIB
    B = cfg.data.batch_size
    v, t = mc.vision, mc.text
    keep = 1.0 - cfg.model.token_drop
    towers_shape = [  # (tokens, width, hidden, depth, swiglu, subln)
        (1 + round(v.grid**2 * keep), v.width, v.mlp_hidden, v.depth, v.swiglu, v.subln),
        (t.context_length, t.width, int(t.width * t.mlp_ratio), t.layers, False, False),
    ]
    acts = 0
    recompute_peak = 0
    for tokens, width, hidden, depth, swiglu, subln in towers_shape:
        per_block = B * tokens * _block_activation_bytes_per_token(width, hidden, swiglu, subln, act_bytes)
        if cfg.model.grad_checkpointing:
            acts += depth * B * tokens * width * act_bytes
            recompute_peak = max(recompute_peak, per_block)
        else:
            acts += depth * per_block
    out["activations"] = (acts + recompute_peak) / _GIB
    G = B * world_size
    out["loss_logits"] = 4 * B * G * 4 / _GIB  # image and text logits (B x G, fp32) and their gradients
    out["cuda_overhead"] = _CUDA_OVERHEAD / _GIB
    out["total"] = sum(v for k, v in out.items() if k not in ("params_billion", "host_offloaded"))
    return out


def _main(argv=None) -> int:
    import argparse

    from evaclip.config import load_config

    p = argparse.ArgumentParser(prog="python -m evaclip.memory",
                                description="Computed GPU memory per rank of a recipe.")
    p.add_argument("recipe")
    p.add_argument("--world", required=True, help="number of ranks; several comma-separated give one row each")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = p.parse_intermixed_args(argv)
    cfg = load_config(args.recipe, args.overrides)
    try:
        worlds = [int(w) for w in args.world.split(",")]
    except ValueError:
        p.error(f"--world expects comma-separated integers, got {args.world!r}")
    rows = [(n, estimate_memory(cfg, n)) for n in worlds]
    keys = [k for k in rows[0][1] if k != "params_billion"]
    print(f"{cfg.model.name}: {rows[0][1]['params_billion']:.2f}B params, {cfg.dist.strategy}, {cfg.precision}, "
          f"batch {cfg.data.batch_size}/GPU, token_drop {cfg.model.token_drop}, "
          f"grad_checkpointing {cfg.model.grad_checkpointing} (GiB per GPU, computed)")
    print("| GPUs | " + " | ".join(keys) + " |")
    print("|" + "---|" * (len(keys) + 1))
    for n, r in rows:
        print(f"| {n} | " + " | ".join(f"{r[k]:.1f}" for k in keys) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
