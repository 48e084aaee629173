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

from evaclip.errors import ConfigError
from evaclip.precision import amp_dtype


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


def check_fsdp_config(dist_cfg) -> None:
    """Reject FSDP settings (the config's ``dist`` section) that cannot work, before any model is built."""
    if dist_cfg.strategy != "fsdp":
        if dist_cfg.cpu_offload:
            raise ConfigError("config key 'dist.cpu_offload' needs dist.strategy=fsdp (DDP keeps full replicas)")
        return
    if dist_cfg.cpu_offload and dist_cfg.backend == "nccl":
        raise ConfigError(
            "config key 'dist.backend': dist.cpu_offload keeps sharded weights and optimizer state on the CPU, whose "
            "collectives (clip_grad_norm_, LAMB norms) need gloo; use dist.backend=auto (cpu:gloo,cuda:nccl)"
        )


def mixed_precision(precision: str, *, root: bool = False):
    """FSDP2 ``MixedPrecisionPolicy`` for a training precision (``fp32 | bf16 | fp16``).

    bf16 / fp16: parameters all-gathered and used in the low precision, gradients reduced in fp32, master weights stay
    fp32 (the sharded parameters keep their dtype; fp16 also needs ``make_grad_scaler``). ``root=True`` gives the
    root unit's policy: its own parameters stay fp32 and its floating outputs are cast to fp32 for the loss.
    """
    _, _, policy_cls, _, _ = _fsdp_api()
    dtype = amp_dtype(precision)
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


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of ``model``: the children of every ``nn.ModuleList`` whose members share one class,
    or what a module's own ``fsdp_units()`` lists (a timm tower: its conv stages as one unit, then each block).

    This matches ``visual.blocks`` and ``text.transformer.resblocks`` without naming them, so a new tower layout
    needs no change here. Lists nested inside an already found block are left to that block's unit.
    """
    blocks: list[nn.Module] = []
    inside: set[int] = set()
    for _, mod in model.named_modules():
        if id(mod) in inside:
            continue
        if callable(getattr(mod, "fsdp_units", None)):
            units = list(mod.fsdp_units())
        elif isinstance(mod, nn.ModuleList) and len(mod) and len({type(m) for m in mod}) == 1 \
                and any(True for _ in mod.parameters()):
            units = list(mod)
        else:
            continue
        for blk in units:
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


def shard_model(model: nn.Module, dist_cfg, device: torch.device, *, precision: str = "fp32",
                compile: bool = False) -> nn.Module:
    """The ``dist.strategy: fsdp`` path of ``evaclip.parallel.wrap_model``: ``apply_fsdp`` with the ``dist`` section's
    knobs. ``model`` goes to ``device`` first (FSDP2 with ``cpu_offload`` moves the shards back to the host)."""
    check_fsdp_config(dist_cfg)
    model.to(device)
    return apply_fsdp(
        model,
        default_mesh(device),
        precision=precision,
        cpu_offload=dist_cfg.cpu_offload,
        reshard_after_forward=dist_cfg.reshard_after_forward,
        compile=compile,
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
