"""Typed configuration schema: the single source of truth for every training knob.

A run is a recipe (YAML, stating only what differs from the defaults here) plus ``key.sub=value`` overrides.
``load_config`` merges them, checks every key and type, and fails early with a message that names the key.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml


class ConfigError(ValueError):
    """A recipe or override names an unknown key, has a wrong type, or an invalid value."""


@dataclass
class ModelCfg:
    name: str = "EVA02-CLIP-tiny"  # a registered architecture (evaclip.list_models())
    pretrained: Optional[str] = None  # whole-CLIP checkpoint (EVA-CLIP release, open_clip, evaclip)
    image_init: Optional[str] = None  # image-tower init: EVA MIM, EVA-CLIP, timm / open_clip EVA02 checkpoint
    text_init: Optional[str] = None  # text-tower init: OpenAI / open_clip / EVA-CLIP checkpoint
    attn_backend: str = "auto"  # auto | flash_attn | sdpa | eager
    token_drop: float = 0.0  # fraction of image patch tokens dropped in training (0.5 in the paper's big runs)
    token_drop_until: Optional[int] = None  # optimizer step where token dropping ends (FLIP-style unmasked tuning)
    grad_checkpointing: bool = False
    compile: bool = False  # torch.compile the towers
    overrides: dict = field(default_factory=dict)  # architecture overrides passed to create_model


@dataclass
class DataCfg:
    train: Optional[str] = None  # shard spec(s), brace-expanded; several sources joined with '::'
    train_weights: Optional[list] = None  # sampling weight per source (resampled mode)
    train_num_samples: Optional[int] = None  # samples per epoch (required for resampled mode)
    resampled: bool = False  # draw shards with replacement instead of each shard once per epoch
    batch_size: int = 32  # per process (per micro-batch when accumulating)
    workers: int = 2
    shuffle_buffer: int = 1000
    image_key: str = "jpg;png;jpeg;webp"
    text_key: str = "txt"
    synthetic: bool = False  # synthetic batches (benchmarks, smoke tests)
    # cut each text batch to its longest caption (rounded up to 8 tokens) on the host before the copy to the device:
    # exact, since the text tower is causal and pools at EOT; saves the text FLOPs spent on padding
    trim_text_padding: bool = True


@dataclass
class OptimCfg:
    name: str = "lamb"  # lamb | adamw
    impl: str = "foreach"  # foreach (evaclip.optim.Lamb) | reference (torch_optimizer.Lamb)
    lamb_variant: str = "torch_optimizer"  # torch_optimizer | deepspeed (bias correction, trust ratio in [0.01, 10])
    lr: float = 5e-4  # lr of the parameters outside the towers (logit scale)
    visual_lr: Optional[float] = None  # None: use lr
    text_lr: Optional[float] = None
    weight_decay: float = 0.05
    visual_wd: Optional[float] = None
    text_wd: Optional[float] = None
    visual_ld: float = 1.0  # layer-wise lr decay of the image tower (1.0: none)
    text_ld: float = 1.0
    betas: list = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    clamp_value: float = 10.0
    debias: bool = False
    grad_clip_norm: Optional[float] = 5.0
    lock_image: bool = False  # freeze the image tower (LiT)
    lock_text: bool = False  # freeze the text tower (locked-text tuning)
    schedule: str = "cosine"  # cosine | const
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of each group's peak lr


@dataclass
class LossCfg:
    name: str = "clip"  # clip | siglip
    local_loss: bool = True
    gather_with_grad: bool = True


@dataclass
class EvalCfg:
    every: int = 0  # steps between evaluations during training (0: only at the end, if data is given)
    zeroshot: Optional[str] = None  # clip_benchmark webdataset dir or ImageNet-style folder
    retrieval: Optional[str] = None  # image-text shards
    batch_size: int = 64
    workers: int = 2  # DataLoader workers for evaluation data
    classnames: Optional[str] = None  # zero-shot class-name file (default: the data's own, or open_clip's ImageNet)
    templates: Optional[str] = None  # zero-shot prompt-template file ({c} = class name)


@dataclass
class CkptCfg:
    every: int = 0  # steps between checkpoints (0: only at the end)
    keep_last: int = 2
    checksum: bool = True  # sha256 of every file in meta.json, verified on resume (catches silent corruption)


@dataclass
class LogCfg:
    every: int = 10  # steps between log lines
    wandb: bool = False
    wandb_mode: str = "offline"
    wandb_project: str = "evaclip"
    tensorboard: bool = True


@dataclass
class DistCfg:
    strategy: str = "ddp"  # ddp | fsdp
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    cpu_offload: bool = False  # fsdp: sharded params, grads and optimizer state on the host (step runs there)
    reshard_after_forward: bool = True  # fsdp: free gathered block weights after forward (False: keep to backward)


@dataclass
class TrainCfg:
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    loss: LossCfg = field(default_factory=LossCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    ckpt: CkptCfg = field(default_factory=CkptCfg)
    log: LogCfg = field(default_factory=LogCfg)
    dist: DistCfg = field(default_factory=DistCfg)
    precision: str = "fp32"  # fp32 | bf16 | fp16
    device: str = "auto"  # auto | cpu | cuda
    epochs: int = 1
    max_steps: Optional[int] = None  # stop after this many optimizer steps (overrides epochs)
    accum_freq: int = 1  # micro-batches per optimizer step (contrastive batch kept over all of them)
    global_batch: Optional[int] = None  # if set: data.batch_size * accum_freq * world size must equal it (recipes)
    seed: int = 0
    output_dir: str = "runs"
    name: Optional[str] = None  # run name (default: recipe name)
    resume: Optional[str] = None  # auto | path to a checkpoint
    max_bad_steps: int = 5  # consecutive NaN/Inf steps before the run stops


_CHOICES = {
    "model.attn_backend": ("auto", "flash_attn", "sdpa", "eager"),
    "optim.name": ("lamb", "adamw"),
    "optim.impl": ("foreach", "reference"),
    "optim.lamb_variant": ("torch_optimizer", "deepspeed"),
    "optim.schedule": ("cosine", "const"),
    "loss.name": ("clip", "siglip"),
    "dist.strategy": ("ddp", "fsdp"),
    "dist.backend": ("auto", "nccl", "gloo"),
    "precision": ("fp32", "bf16", "fp16"),
    "device": ("auto", "cpu", "cuda"),
    "log.wandb_mode": ("offline", "online", "disabled"),
}


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unwrap_optional(tp) -> tuple[Any, bool]:
    if typing.get_origin(tp) is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else Union[tuple(args)]), True
    return tp, False


def _parse_scalar(text: str) -> Any:
    """Parse a command-line value as YAML; also accept ``1e-3`` (YAML 1.1 reads it as a string)."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _coerce(key: str, value: Any, tp) -> Any:
    """Check ``value`` against the annotated type ``tp``; strings from the command line are parsed as YAML."""
    base, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config key '{key}' may not be null")
    if optional and isinstance(value, str) and value.strip() in ("null", "Null", "NULL", "~", "None"):
        return None  # `key=null` on the command line clears an optional key, whatever its type
    if isinstance(value, str) and base is not str:
        value = _parse_scalar(value)
        if value is None and optional:
            return None
    origin = typing.get_origin(base) or base
    if origin is bool:
        ok = isinstance(value, bool)
    elif origin is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif origin is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif origin is str:
        ok = isinstance(value, (str, int, float)) and not isinstance(value, bool)
        value = str(value) if ok else value
    elif origin in (list, dict):
        ok = isinstance(value, origin)
    else:
        ok = True
    if not ok:
        raise ConfigError(f"config key '{key}' expects {getattr(base, '__name__', base)}, got {value!r}")
    return value


def _unknown(key: str, candidates) -> ConfigError:
    hint = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(candidates), n=1)
    msg = f"unknown config key '{key}'"
    return ConfigError(msg + (f" (did you mean '{hint[0]}'?)" if hint else ""))


def _apply(obj, data: dict, prefix: str = "") -> None:
    types = _field_types(type(obj))
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in types:
            raise _unknown(key, types)
        current = getattr(obj, k)
        if dataclasses.is_dataclass(current):
            if not isinstance(v, dict):
                raise ConfigError(f"config key '{key}' is a section; expected a mapping, got {v!r}")
            _apply(current, v, key + ".")
        elif k == "overrides" and isinstance(current, dict) and isinstance(v, dict):
            current.update(v)
        else:
            setattr(obj, k, _coerce(key, v, types[k]))


def _set_dotted(obj, key: str, value: Any) -> None:
    parts = key.split(".")
    target = obj
    for i, p in enumerate(parts[:-1]):
        if not dataclasses.is_dataclass(target) or p not in _field_types(type(target)):
            known = _field_types(type(target)) if dataclasses.is_dataclass(target) else []
            raise _unknown(".".join(parts[: i + 1]), known)
        target = getattr(target, p)
        if isinstance(target, dict):  # free-form mapping, e.g. model.overrides.width=64
            target[".".join(parts[i + 1 :])] = _parse_scalar(value) if isinstance(value, str) else value
            return
    if not dataclasses.is_dataclass(target):
        raise ConfigError(f"unknown config key '{key}': '{'.'.join(parts[:-1])}' is a value, not a section")
    _apply(target, {parts[-1]: value}, ".".join(parts[:-1]) + "." if len(parts) > 1 else "")


def validate(cfg: TrainCfg) -> TrainCfg:
    """Check value ranges and choices; raises ConfigError naming the key."""
    for key, choices in _CHOICES.items():
        obj = cfg
        for p in key.split("."):
            obj = getattr(obj, p)
        if obj not in choices:
            raise ConfigError(f"config key '{key}' must be one of {list(choices)}, got {obj!r}")
    if not 0.0 <= cfg.model.token_drop < 1.0:
        raise ConfigError(f"config key 'model.token_drop' must be in [0, 1), got {cfg.model.token_drop}")
    if cfg.accum_freq < 1:
        raise ConfigError(f"config key 'accum_freq' must be >= 1, got {cfg.accum_freq}")
    if cfg.model.token_drop_until is not None and cfg.model.token_drop_until < 0:
        raise ConfigError(f"config key 'model.token_drop_until' must be >= 0, got {cfg.model.token_drop_until}")
    if cfg.max_bad_steps < 1:
        raise ConfigError(f"config key 'max_bad_steps' must be >= 1, got {cfg.max_bad_steps}")
    if cfg.ckpt.every < 0 or cfg.log.every < 1:
        raise ConfigError("config keys 'ckpt.every' must be >= 0 and 'log.every' >= 1")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise ConfigError(f"config key 'max_steps' must be >= 1, got {cfg.max_steps}")
    if cfg.data.batch_size < 1:
        raise ConfigError(f"config key 'data.batch_size' must be >= 1, got {cfg.data.batch_size}")
    if cfg.data.resampled and not cfg.data.synthetic and not cfg.data.train_num_samples:
        raise ConfigError("config key 'data.train_num_samples' is required when 'data.resampled' is true")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"config key 'optim.betas' expects two numbers, got {cfg.optim.betas!r}")
    return cfg


def parse_overrides(args: list[str]) -> dict[str, str]:
    """``['optim.lr=1e-3', 'precision=bf16']`` -> ``{'optim.lr': '1e-3', 'precision': 'bf16'}``."""
    out = {}
    for a in args:
        if "=" not in a:
            raise ConfigError(f"override '{a}' is not of the form key=value")
        k, v = a.split("=", 1)
        out[k.strip()] = v
    return out


def resolve_recipe(recipe: str | Path) -> Path:
    """A recipe is a YAML path, or the name of a file in the repository's ``recipes/`` folder."""
    p = Path(recipe)
    if p.is_file():
        return p
    cand = Path(__file__).resolve().parent.parent / "recipes" / str(recipe)
    for c in (cand, cand.with_suffix(".yaml")):
        if c.is_file():
            return c
    raise ConfigError(f"recipe not found: {recipe}")


def load_config(recipe: str | Path | None = None, overrides: dict | list | None = None) -> TrainCfg:
    """Defaults <- recipe YAML <- overrides (dict of dotted keys, or a list of ``key=value`` strings)."""
    cfg = TrainCfg()
    if recipe is not None:
        path = resolve_recipe(recipe)
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"recipe {path} must be a YAML mapping")
        _apply(cfg, data)
        if cfg.name is None:
            cfg.name = path.stem
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    for k, v in (overrides or {}).items():
        _set_dotted(cfg, k, v)
    return validate(cfg)


def to_dict(cfg: TrainCfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> TrainCfg:
    cfg = TrainCfg()
    _apply(cfg, data)
    return validate(cfg)
