"""Parameter groups: per-tower lr / weight decay, layer-wise lr decay, weight-decay exclusions, tower locking.

The model tells us what each parameter is through its hooks (``param_tower``, ``layer_id``, ``num_layers``,
``no_weight_decay``); the rules below turn that into optimizer groups, merging parameters that share
(tower, lr_scale, weight_decay) so each group is one large multi-tensor batch.
"""
from __future__ import annotations

from torch import nn

from evaclip.distributed import unwrap as unwrap_model

TOWERS = ("visual", "text", "other")  # a task's own modules (a decoder, a head) may name further towers
_HOOKS = ("param_tower", "layer_id", "num_layers", "no_weight_decay")
# Name fragments that never take weight decay even if a model's no_weight_decay() forgets them (EVA-CLIP's rules).
_NO_WD_FRAGMENTS = ("pos_embed", "positional_embedding", "cls_token", "logit_scale", "logit_bias")


def _check_hooks(model: nn.Module) -> None:
    missing = [h for h in _HOOKS if not callable(getattr(model, h, None))]
    if missing:
        raise TypeError(
            f"{type(model).__name__} lacks the optimizer hooks {missing}; build the model with "
            "evaclip.create_model or implement them (see docs/ARCHITECTURE.md, 'Optimizer hooks')"
        )


def tower_settings(cfg, tower: str) -> tuple[float, float, float]:
    """(lr, weight_decay, layer_decay) of a tower; unset tower values fall back to the global ones. A task's own
    tower (``param_tower`` naming anything but visual / text / other: a decoder, a head) takes
    ``optim.tower_lr[tower]`` (default ``optim.lr``) in a group of its own, never the logit scale's."""
    if tower == "visual":
        return _or(cfg.visual_lr, cfg.lr), _or(cfg.visual_wd, cfg.weight_decay), cfg.visual_ld
    if tower == "text":
        return _or(cfg.text_lr, cfg.lr), _or(cfg.text_wd, cfg.weight_decay), cfg.text_ld
    if tower == "other":
        return cfg.lr, cfg.weight_decay, 1.0
    return (getattr(cfg, "tower_lr", None) or {}).get(tower, cfg.lr), cfg.weight_decay, 1.0


def _or(value, default):
    return default if value is None else value


def lock_towers(model: nn.Module, cfg) -> None:
    """Freeze the image tower (``lock_image``, LiT) and / or the text tower (``lock_text``, Locked-Text Tuning).

    Parameters the model lists in ``unlocked_params`` stay trainable: a text projection that the init dropped for
    its width (``create_model(text_init=...)`` sets it) is new, so freezing it would freeze a random map."""
    model = unwrap_model(model)
    locked = {t for t, on in (("visual", cfg.lock_image), ("text", cfg.lock_text)) if on}
    if not locked:
        return
    _check_hooks(model)
    keep = set(getattr(model, "unlocked_params", ()))
    for name, p in model.named_parameters():
        if model.param_tower(name) in locked and name not in keep:
            p.requires_grad_(False)


def param_rule(model: nn.Module, name: str, p, cfg, no_wd_names: set[str], wd_names: frozenset = frozenset()) -> dict:
    """The optimizer settings of one parameter: tower, layer_id, lr_scale, base_lr, weight_decay.

    ``no_wd_names`` is ``model.no_weight_decay()`` (full parameter names), computed once by the caller; ``wd_names``
    the model's optional ``weight_decay_names()``: parameters that decay although their names match the exclusion
    fragments (ViTamin's ``pos_embed``, as upstream trains it).
    """
    tower = model.param_tower(name)
    if not isinstance(tower, str) or not tower:
        raise ValueError(f"param_tower({name!r}) returned {tower!r}; expected a tower name such as {list(TOWERS)}")
    lr, wd, ld = tower_settings(cfg, tower)
    if not 0.0 < ld <= 1.0:
        raise ValueError(f"optim.{tower}_ld must be in (0, 1], got {ld}")
    if tower not in ("visual", "text"):  # the logit scale, a task's own decoder / head: no layer decay
        layer_id, scale = 0, 1.0
    else:
        depth = model.num_layers(tower)
        layer_id = model.layer_id(name)
        if not 0 <= layer_id <= depth + 1:
            raise ValueError(f"layer_id({name!r}) = {layer_id} is outside [0, {depth + 1}] for the {tower} tower")
        scale = ld ** (depth + 1 - layer_id)
    no_wd = (
        p.ndim <= 1
        or name.endswith(".bias")
        or name in no_wd_names
        or (any(f in name for f in _NO_WD_FRAGMENTS) and name not in wd_names)
    )
    return dict(tower=tower, layer_id=layer_id, lr_scale=scale, base_lr=lr, weight_decay=0.0 if no_wd else wd)


def build_param_groups(model: nn.Module, cfg) -> list[dict]:
    """Optimizer param groups for ``model`` (trainable parameters only, so frozen towers get no optimizer state).

    Each group has ``params``, ``param_names``, ``tower``, ``lr_scale``, ``base_lr``, ``lr`` (= base_lr * lr_scale),
    ``weight_decay`` and ``layer_id`` (the layer of every parameter in it, or None when layer decay is 1 and several
    layers share the group). Order (stable for checkpoints): by tower, then from the top layer down, decay first.
    """
    model = unwrap_model(model)
    _check_hooks(model)
    merged: dict = {}
    no_wd_names = set(model.no_weight_decay())
    wd_names = frozenset(getattr(model, "weight_decay_names", set)())
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        rule = param_rule(model, name, p, cfg, no_wd_names, wd_names)
        key = (rule["tower"], rule["lr_scale"], rule["weight_decay"])
        group = merged.get(key)
        if group is None:
            group = merged[key] = dict(rule, params=[], param_names=[], _layers=set())
        group["params"].append(p)
        group["param_names"].append(name)
        group["_layers"].add(rule["layer_id"])
    if not merged:
        raise ValueError("the model has no trainable parameters (are both towers locked?)")
    groups = []
    for g in merged.values():
        layers = g.pop("_layers")
        g["layer_id"] = next(iter(layers)) if len(layers) == 1 else None
        g["lr"] = g["base_lr"] * g["lr_scale"]
        groups.append(g)
    order = {t: (i, "") for i, t in enumerate(TOWERS)}  # a task's own towers last, by name
    groups.sort(key=lambda g: (order.get(g["tower"], (len(TOWERS), g["tower"])), -g["lr_scale"],
                               g["weight_decay"] == 0))
    return groups
