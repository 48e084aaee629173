"""Optimizer factory: param groups, LAMB (foreach or torch-optimizer reference) / AdamW, schedule, clipping.

Which LAMB (``optim.lamb_variant``):

* ``deepspeed``: DeepSpeed's LAMB as EVA-CLIP's released runs configured it (``training/deepspeed_config.json``:
  bias correction, eps outside the square root, trust ratio clamped to [min_coeff=0.01, max_coeff=10]). The paper
  recipes (``recipes/eva*_clip_*.yaml``) use it to reproduce the published runs.
* ``torch_optimizer`` (default): the update of ``torch_optimizer.Lamb`` (no bias correction unless ``debias``, the
  *weight norm* clamped to ``clamp_value``, trust ratio unclamped), the well-tested reference that ``impl: reference``
  runs directly; the tiny demo recipe uses it.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from evaclip.optim.groups import build_param_groups, lock_towers, param_rule, tower_settings, unwrap_model
from evaclip.optim.lamb import Lamb, global_sq_norms, local_tensor
from evaclip.optim.schedule import Scheduler, lr_factor

__all__ = [
    "Lamb", "Scheduler", "build_optimizer", "build_param_groups", "build_scheduler", "clamp_logit_scale_",
    "clip_grad_norm_", "global_sq_norms", "lock_towers", "lr_factor", "param_rule", "tower_settings",
]

LOGIT_SCALE_MAX = math.log(100.0)


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """The param groups and the optimizer named by ``cfg.name`` / ``cfg.impl`` (the config's ``optim`` section, whose
    choices ``evaclip.config`` has checked). Towers are locked by the task before the model is wrapped
    (``lock_towers``), so frozen parameters are simply absent from the groups."""
    groups = build_param_groups(model, cfg)
    betas = tuple(cfg.betas)
    # The constructor's lr is only a default (every group has its own); keep it > 0 for torch_optimizer's check.
    default_lr = cfg.lr if cfg.lr > 0 else 1.0
    if cfg.name == "adamw":
        params = [p for g in groups for p in g["params"]]
        fused = all(p.is_cuda and type(p) is nn.Parameter for p in params)
        return torch.optim.AdamW(groups, lr=default_lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                 foreach=None if fused else True, fused=fused or None)
    if cfg.impl == "reference":
        import torch_optimizer

        return torch_optimizer.Lamb(groups, lr=default_lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                    clamp_value=cfg.clamp_value, debias=cfg.debias)
    return Lamb(groups, lr=default_lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                clamp_value=cfg.clamp_value, debias=cfg.debias, variant=cfg.lamb_variant)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg, total_steps: int) -> Scheduler:
    """The schedule of ``cfg.schedule`` over ``total_steps`` optimizer steps (lr for step 0 is set now)."""
    return Scheduler(optimizer, cfg.schedule, total_steps, cfg.warmup_steps, cfg.min_lr_ratio,
                     extend=cfg.extend)


@torch.no_grad()
def clip_grad_norm_(model_or_params, max_norm: float | None) -> torch.Tensor:
    """Scale all gradients so their global L2 norm is at most ``max_norm``; returns the norm before clipping.

    The norm stays a device tensor (no host sync): the loop reads it when it logs. DTensor (FSDP2) gradients are
    summed over their shards with batched collectives. ``max_norm`` None or <= 0 only measures. A non-finite norm is
    returned as is and the gradients are left for the loop's bad-step check.
    """
    if isinstance(model_or_params, nn.Module):
        params = list(unwrap_model(model_or_params).parameters())
    else:
        params = list(model_or_params)
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return torch.zeros(())
    grads = [p.grad for p in with_grad]
    total = global_sq_norms([local_tensor(g) for g in grads], grads).sum().sqrt()
    if max_norm is not None and max_norm > 0:
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        by_device: dict = {}
        for g in grads:
            g_l = local_tensor(g)
            by_device.setdefault((g_l.device, g_l.dtype), []).append(g_l)
        for (device, _), gs in by_device.items():
            torch._foreach_mul_(gs, coef.to(device))
    return total


@torch.no_grad()
def clamp_logit_scale_(model: nn.Module, max_value: float = LOGIT_SCALE_MAX) -> None:
    """Clamp the (log-space) ``logit_scale`` parameter to [0, ln(100)] after each optimizer step, as CLIP does."""
    model = unwrap_model(model)
    scale = getattr(model, "logit_scale", None)
    if scale is None:
        raise AttributeError(f"{type(model).__name__} has no logit_scale parameter to clamp")
    scale.clamp_(0, max_value)
