"""FSDP2 sharding of CLIP models: one FSDP unit per transformer block, one per tower, the root last.

``torch.distributed.fsdp.fully_shard`` turns every parameter into a DTensor sharded on dim 0 across the data-parallel
mesh; a unit's parameters are all-gathered (in ``param_dtype``) just before its forward / backward and freed after,
and its gradients are reduce-scattered (in ``reduce_dtype``) as soon as backward leaves it. So a rank holds 1/N of the
fp32 master weights, gradients and optimizer state, plus the unsharded weights of the one or two blocks in flight.

Unit layout (outermost last, as fully_shard needs bottom-up calls):

* each transformer block (``visual.blocks.N``, ``text.transformer.resblocks.N``): the all-gather / free granularity
  that bounds peak memory;
* each tower (``visual``, ``text``): its embeddings, final norm and projection, gathered for the whole tower pass;
* the root CLIP module: owns no sharded parameter; its policy casts the outputs to fp32 for the contrastive loss.
  The 0-d ``logit_scale`` / ``logit_bias`` (which ``fully_shard`` rejects) stay replicated fp32 tensors with their
  gradients averaged over ranks (``replicate_scalar_params``), so the exponentiated scale is never rounded to bf16.

Composition: per-block gradient checkpointing and token dropping need nothing from this module (the tower calls each
block, FSDP's hooks fire on every call, recompute included); ``torch.compile`` is applied per block *before*
sharding (``nn.Module.compile`` keeps parameter names), so each block is one graph and the FSDP hooks stay eager.
The optimizer must be built *after* ``shard_model`` (it has to hold the DTensor parameters).
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

# evaclip.checkpoint imports this module for dist.strategy=fsdp; importing the sharded format registers it there.
from evaclip import checkpoint_sharded  # noqa: F401
from evaclip.config import ConfigError, TrainCfg

_PRECISION_DTYPE = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _fsdp_api():
    """The FSDP2 entry points; a clear error on torch builds that predate them (fully_shard is public from 2.6)."""
    try:
        from torch.distributed.fsdp import (
            CPUOffloadPolicy,
            FSDPModule,
            MixedPrecisionPolicy,
            OffloadPolicy,
            fully_shard,
        )
    except ImportError as e:  # pragma: no cover - depends on the torch build
        raise RuntimeError(
            f"dist.strategy=fsdp needs torch.distributed.fsdp.fully_shard (torch >= 2.6); this is torch "
            f"{torch.__version__}: {e}"
        ) from e
    return fully_shard, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, CPUOffloadPolicy


def check_fsdp_config(cfg: TrainCfg) -> None:
    """Reject FSDP settings that cannot work, before any model is built; raises ConfigError naming the key."""
    if cfg.dist.strategy != "fsdp":
        if cfg.dist.cpu_offload:
            raise ConfigError("config key 'dist.cpu_offload' needs dist.strategy=fsdp (DDP keeps full replicas)")
        return
    if cfg.dist.cpu_offload and cfg.dist.backend == "nccl":
        raise ConfigError(
            "config key 'dist.backend': dist.cpu_offload keeps sharded weights and optimizer state on the CPU, whose "
            "collectives (clip_grad_norm_, LAMB norms) need gloo; use dist.backend=auto (cpu:gloo,cuda:nccl)"
        )


def process_group_backend(cfg: TrainCfg, device: torch.device) -> str:
    """The ``init_process_group`` backend string for ``cfg`` on ``device``.

    CPU offload keeps parameters, gradients and optimizer state on the host, so the host-side collectives (the
    gradient-norm and LAMB trust-ratio all_reduces) need gloo beside NCCL: ``"cpu:gloo,cuda:nccl"``.
    """
    if device.type != "cuda":
        return "gloo"
    if cfg.dist.backend == "gloo":
        return "gloo"
    if cfg.dist.strategy == "fsdp" and cfg.dist.cpu_offload:
        return "cpu:gloo,cuda:nccl"
    return "nccl"


def mixed_precision(precision: str, *, root: bool = False):
    """FSDP2 ``MixedPrecisionPolicy`` for a training precision (``fp32 | bf16 | fp16``).

    bf16 / fp16: parameters all-gathered and used in the low precision, gradients reduced in fp32, master weights stay
    fp32 (the sharded parameters keep their dtype; fp16 also needs ``make_grad_scaler``). ``root=True`` gives the
    root unit's policy: its own parameters stay fp32 and its floating outputs are cast to fp32 for the loss.
    """
    _, _, policy_cls, _, _ = _fsdp_api()
    if precision not in _PRECISION_DTYPE:
        raise ConfigError(f"config key 'precision' must be one of {list(_PRECISION_DTYPE)}, got {precision!r}")
    dtype = _PRECISION_DTYPE[precision]
    if dtype is None:
        return policy_cls()
    if root:
        return policy_cls(param_dtype=None, reduce_dtype=torch.float32, output_dtype=torch.float32,
                          cast_forward_inputs=False)
    return policy_cls(param_dtype=dtype, reduce_dtype=torch.float32)


def offload_policy(cpu_offload: bool, device: torch.device):
    """``CPUOffloadPolicy`` (sharded params, grads and optimizer state on the host; the step runs there) or none."""
    _, _, _, none_cls, cpu_cls = _fsdp_api()
    if not cpu_offload:
        return none_cls()
    # Pinned host memory makes the copies asynchronous; it only means something with a CUDA device.
    return cpu_cls(pin_memory=device.type == "cuda")


def make_grad_scaler(precision: str, strategy: str, device: torch.device):
    """The loss scaler of a run: enabled for fp16 only; FSDP2 runs get ``ShardedGradScaler``.

    With sharded gradients each rank sees only its shard, so an overflow may show on one rank alone; the sharded
    scaler max-reduces the inf flag over the process group, so every rank skips the same steps (a plain GradScaler
    would let the ranks' parameters diverge).
    """
    enabled = precision == "fp16"
    if strategy == "fsdp" and enabled:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device=device.type)
    return torch.amp.GradScaler(device.type, enabled=enabled)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of ``model``: the children of every ``nn.ModuleList`` whose members share one class.

    This matches ``visual.blocks`` and ``text.transformer.resblocks`` without naming them, so a new tower layout
    needs no change here. Lists nested inside an already found block are left to that block's unit.
    """
    blocks: list[nn.Module] = []
    inside: set[int] = set()
    for _, mod in model.named_modules():
        if id(mod) in inside or not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        kinds = {type(m) for m in mod}
        if len(kinds) != 1 or not any(True for _ in mod.parameters()):
            continue
        for blk in mod:
            blocks.append(blk)
            inside.update(id(m) for m in blk.modules())
    return blocks


def towers(model: nn.Module, blocks: Iterable[nn.Module]) -> list[nn.Module]:
    """Direct children of ``model`` that hold at least one block (the image and text towers), in module order."""
    block_ids = {id(b) for b in blocks}
    out = []
    for child in model.children():
        # Bare containers have no forward for FSDP's hooks to wrap; their blocks are units already.
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)) or id(child) in block_ids:
            continue
        if any(id(m) in block_ids for m in child.modules()):
            out.append(child)
    return out


def compile_blocks(blocks: Iterable[nn.Module], **compile_kwargs) -> None:
    """``torch.compile`` each block in place (``nn.Module.compile``: parameter names and the module tree unchanged).

    Done before ``fully_shard`` so every block is one graph and FSDP's all-gather / reduce-scatter hooks, which run
    around the block, stay in eager mode (the layout torchtitan uses for FSDP2 + compile).
    """
    for blk in blocks:
        blk.compile(**compile_kwargs)


def apply_fsdp(
    model: nn.Module,
    mesh=None,
    *,
    precision: str = "fp32",
    cpu_offload: bool = False,
    reshard_after_forward: bool = True,
    compile: bool = False,
    compile_kwargs: Optional[dict] = None,
) -> nn.Module:
    """Shard ``model`` in place with FSDP2 (block units, tower units, root unit) and return it.

    Args:
        model: a CLIP model (or any module whose towers hold ``nn.ModuleList``s of blocks), on its training device.
        mesh: 1-D data-parallel ``DeviceMesh``; default: all ranks of the default process group on the model's device.
        precision: ``fp32``, ``bf16`` or ``fp16`` (low-precision parameters and compute, fp32 gradient reduction and
            master weights).
        cpu_offload: keep sharded parameters, gradients and optimizer state on the host (FSDP2 ``CPUOffloadPolicy``).
        reshard_after_forward: free gathered block weights after forward (ZeRO-3); False keeps them to backward
            (ZeRO-2-like: more memory, one all-gather fewer per block).
        compile: ``torch.compile`` each block before sharding (``compile_kwargs`` are passed on).

    The returned module is ``model`` itself (its class becomes an ``FSDPModule`` subclass); parameter names are
    unchanged, so optimizer groups, checkpoints and the model's hooks work as before.
    """
    fully_shard, fsdp_module_cls, _, _, _ = _fsdp_api()
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("apply_fsdp needs an initialized process group (run under torchrun; see "
                           "evaclip.distributed)")
    if isinstance(model, fsdp_module_cls):
        raise RuntimeError(f"{type(model).__name__} is already sharded with FSDP2; apply_fsdp must run once")
    if any(isinstance(m, nn.parallel.DistributedDataParallel) for m in model.modules()):
        raise RuntimeError("apply_fsdp got a DDP-wrapped model; shard the bare model instead of wrapping it in DDP")
    blocks = transformer_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of transformer blocks to shard")
    try:
        param = next(model.parameters())
    except StopIteration as e:
        raise ValueError(f"{type(model).__name__} has no parameters to shard") from e
    device = param.device
    if mesh is None:
        mesh = default_mesh(device)
    if compile:
        compile_blocks(blocks, **(compile_kwargs or {}))
    scalars = replicate_scalar_params(model)
    common = dict(mesh=mesh, offload_policy=offload_policy(cpu_offload, device), ignored_params=scalars or None)
    unit_mp = mixed_precision(precision)
    for blk in blocks:
        fully_shard(blk, mp_policy=unit_mp, reshard_after_forward=reshard_after_forward, **common)
    for tower in towers(model, blocks):
        fully_shard(tower, mp_policy=unit_mp, reshard_after_forward=reshard_after_forward, **common)
    # The root's parameters are needed again right at the start of backward: keeping them gathered is free.
    fully_shard(model, mp_policy=mixed_precision(precision, root=True), reshard_after_forward=False, **common)
    model._evaclip_reshard_after_forward = reshard_after_forward  # restored by gathered() after evaluation
    return model


@contextlib.contextmanager
def gathered(model: nn.Module):
    """Context: every FSDP2 unit of ``model`` all-gathered once (a collective on entry) and kept for the block.

    Inside, forward calls run no collectives, so ranks may call the model a different number of times (evaluation
    splits its data unevenly over ranks; with per-call all-gathers that would hang). Costs the full model in the
    compute dtype on every rank while inside. A no-op for models that are not FSDP2-sharded.
    """
    if not is_fsdp(model):
        yield model
        return
    _, fsdp_module_cls, _, _, _ = _fsdp_api()
    units = [m for m in model.modules() if isinstance(m, fsdp_module_cls)]
    # The root initialises FSDP lazily in its first forward; evaluating (encode_image -> the tower) before any
    # training step would make a tower its own root and break the next training forward. Initialise from the root.
    model._get_fsdp_state()._lazy_init()
    model.set_reshard_after_forward(False, recurse=True)
    for m in units:
        m.unshard()
    try:
        yield model
    finally:
        for m in units:
            m.reshard()
        model.set_reshard_after_forward(getattr(model, "_evaclip_reshard_after_forward", True), recurse=True)
        model.set_reshard_after_forward(False, recurse=False)


def replicate_scalar_params(model: nn.Module) -> set[nn.Parameter]:
    """Keep 0-d parameters (``logit_scale``, ``logit_bias``) out of FSDP and average their gradients over ranks.

    ``fully_shard`` rejects scalar parameters, and reshaping them to (1,) would change the model's checkpoint format.
    They stay plain replicated fp32 tensors instead; a post-accumulate-grad hook all-reduces each one's gradient as
    soon as backward produces it (averaging per micro-batch sums to the average of the accumulated gradient), so the
    replicas stay identical, as DDP would keep them. Returns the set to pass as ``ignored_params``.
    """
    scalars = {p for p in model.parameters() if p.ndim == 0}
    world = dist.get_world_size()

    def _average(p: torch.Tensor) -> None:
        if world > 1:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(world)

    for p in scalars:
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(_average)
    return scalars


def default_mesh(device: torch.device):
    """1-D data-parallel mesh over every rank of the default process group, on ``device``'s type."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=("dp",))


def shard_model(model: nn.Module, cfg: TrainCfg, device: torch.device) -> nn.Module:
    """The ``dist.strategy: fsdp`` path of ``evaclip.distributed.wrap_model``: ``apply_fsdp`` with ``cfg``'s knobs.

    ``model`` must already be on ``device`` (or on the host with ``dist.cpu_offload``, which FSDP2 also accepts).
    """
    check_fsdp_config(cfg)
    model.to(device)
    return apply_fsdp(
        model,
        default_mesh(device),
        precision=cfg.precision,
        cpu_offload=cfg.dist.cpu_offload,
        reshard_after_forward=cfg.dist.reshard_after_forward,
        compile=cfg.model.compile,
    )


def is_fsdp(model: nn.Module) -> bool:
    """True when ``model`` (the root) was sharded with FSDP2."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - depends on the torch build
        return False
    return isinstance(model, FSDPModule)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer-state tensors held by this rank (the local shards of sharded states)."""
    total = 0
    for state in optimizer.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                loc = _local(v)
                total += loc.numel() * loc.element_size()
    return total


def param_bytes(model: nn.Module) -> int:
    """Bytes of parameter tensors held by this rank (the local shards of sharded parameters)."""
    return sum(_local(p).numel() * _local(p).element_size() for p in model.parameters())



# ----------------------------------------------------------------------------------------------------------------------
# memory per GPU, computed (docs/FSDP.md): python -m evaclip.fsdp RECIPE --world N [key=value ...]
# ----------------------------------------------------------------------------------------------------------------------
_GIB = 2**30
_CUDA_OVERHEAD = 1.5 * _GIB  # CUDA context, cuBLAS / flash workspaces, NCCL buffers (typical, not measured here)


def _block_activation_bytes_per_token(width: int, hidden: int, swiglu: bool, subln: bool, act_bytes: int) -> int:
    """Tensors one transformer block keeps for backward, per token (fused SDPA / flash attention: no T x T scores).

    ~11 width-sized tensors (norm in/out x2, q, k, v, RoPE'd q/k or attention out, sub-LN, projection in) plus the
    MLP's hidden-sized ones: 2 for GELU (fc1 out, activation out), 5 for SwiGLU with sub-LN (w1, w2, silu, product,
    ffn_ln). An estimate, good to ~20%.
    """
    mlp = (4 + int(subln)) if swiglu else 2
    return (11 * width + mlp * hidden) * act_bytes


def estimate_memory(cfg: TrainCfg, world_size: int) -> dict[str, float]:
    """Computed GPU memory per rank (GiB) of one training step of ``cfg`` on ``world_size`` ranks.

    Exact parts: parameter counts (the model is built on the meta device) and the sharded fp32 state (master
    weights, gradients, two optimizer moments: 16 bytes per parameter, / N with FSDP). Estimated parts: activations
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

    p = argparse.ArgumentParser(prog="python -m evaclip.fsdp", description="Computed GPU memory per rank of a recipe.")
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
