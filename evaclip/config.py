"""Typed configuration schema: the single source of truth for every training knob.

A run is a recipe (YAML, stating only what differs from the defaults here) plus ``key.sub=value`` overrides, merged
by OmegaConf onto these dataclasses (structured configs): an unknown key, a wrong type or a value outside a
``Literal``'s choices fails with one line naming the full key (and the nearest known key for a misspelling).
Architecture overrides (``model.overrides.vision.width=64``) are merged onto the model's own ``CLIPCfg`` so they are
checked the same way.

``TrainCfg`` holds the sections every task shares; each task declares its own schema extending it (``Task.Cfg``:
``ClipTrainCfg`` in ``evaclip/tasks/clip.py``, ``MIMTrainCfg`` in ``evaclip/tasks/mim.py``). ``load_config`` reads
``task`` first (override, else recipe, else ``clip``) and builds against that task's schema, so a key of another
task's section is an unknown key. Range and cross-key rules are the schema's own ``validate()`` (a subclass adds
its rules after ``super().validate()``), so ``evaclip config`` catches them before any run.

``TASKS`` is the task registry: a name -> the task class's import path. A new objective is its task file plus one
line there; the class is imported by name on first use (plugin loading: the config layer never imports a task
module statically, and neither does the engine).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from evaclip.errors import ConfigError

__all__ = ["TASKS", "CkptCfg", "ConfigError", "DataCfg", "DistCfg", "EmaCfg", "EvalCfg", "LogCfg", "ModelCfg",
           "OptimCfg", "TrainCfg", "apply_overrides", "flat_diff", "from_dict", "from_yaml", "get_task", "load_config",
           "schema_of", "to_dict", "to_yaml", "validate"]

# the task registry (see the module docstring): name -> "module:TaskClass"
TASKS = {
    "clip": "evaclip.tasks.clip:ClipTask",
    "mim": "evaclip.tasks.mim:MIMTask",
    "lcl": "evaclip.tasks.lcl:LCLTask",
}


def get_task(name: str):
    """The task class registered as ``name`` (imported on first use); ConfigError naming ``task`` otherwise."""
    import importlib

    if name not in TASKS:
        raise ConfigError(f"config key 'task': unknown task {name!r}; known: {sorted(TASKS)}")
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def schema_of(task: str) -> type:
    """The config schema of the task named ``task`` (its ``Cfg``, a ``TrainCfg`` subclass)."""
    return get_task(task).Cfg


@dataclass
class ModelCfg:
    name: str = "EVA02-CLIP-tiny"  # a registered architecture (evaclip.list_models())
    pretrained: Optional[str] = None  # whole-CLIP checkpoint (EVA-CLIP release, open_clip, evaclip)
    image_init: Optional[str] = None  # image-tower init: EVA MIM, EVA-CLIP, timm / open_clip EVA02 checkpoint
    text_init: Optional[str] = None  # text-tower init: OpenAI / open_clip / EVA-CLIP checkpoint
    attn_backend: Literal["auto", "flash_attn", "sdpa", "eager"] = "auto"
    token_drop: float = 0.0  # fraction of image patch tokens dropped in training (0.5 in the paper's big runs)
    token_drop_until: Optional[int] = None  # optimizer step where token dropping ends (FLIP-style unmasked tuning)
    grad_checkpointing: bool = False
    compile: bool = False  # torch.compile the towers
    # architecture overrides, merged onto the model's CLIPCfg and checked against it: e.g. vision.width=64,
    # vision.depth=4, text.layers=2, embed_dim=128 (model.overrides.vision.width=64 on the command line)
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataCfg:
    train: Optional[str] = None  # shard spec(s), brace-expanded; several sources joined with '::'
    train_weights: Optional[list[float]] = None  # sampling weight per source (resampled mode)
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
    name: Literal["lamb", "adamw"] = "lamb"
    impl: Literal["foreach", "reference"] = "foreach"  # evaclip.optim.Lamb | torch_optimizer.Lamb
    # torch_optimizer | deepspeed (bias correction, trust ratio in [0.01, 10])
    lamb_variant: Literal["torch_optimizer", "deepspeed"] = "torch_optimizer"
    lr: float = 5e-4  # lr of the parameters outside the towers (logit scale)
    visual_lr: Optional[float] = None  # None: use lr
    text_lr: Optional[float] = None
    weight_decay: float = 0.05
    visual_wd: Optional[float] = None
    text_wd: Optional[float] = None
    visual_ld: float = 1.0  # layer-wise lr decay of the image tower (1.0: none)
    text_ld: float = 1.0
    # lr of a task's own towers by the name its model's param_tower gives them (a decoder, a head: each its own
    # optimizer group); unset: optim.lr
    tower_lr: dict[str, float] = field(default_factory=dict)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    clamp_value: float = 10.0
    debias: bool = False
    grad_clip_norm: Optional[float] = 5.0
    lock_image: bool = False  # freeze the image tower (LiT)
    lock_text: bool = False  # freeze the text tower (locked-text tuning)
    schedule: Literal["cosine", "const"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of each group's peak lr
    # a resumed run that goes past its schedule's end (max_steps raised on a finished run): tail = keep the schedule
    # (the added steps run at its final lr), segment = a new warmup_steps warmup + schedule over the added steps
    extend: Optional[Literal["tail", "segment"]] = None


@dataclass
class CkptCfg:
    every: int = 0  # steps between checkpoints (0: only at the end)
    keep_last: int = 2
    checksum: bool = True  # sha256 of every file in meta.json, verified on resume (catches silent corruption)


@dataclass
class LogCfg:
    every: int = 10  # steps between log lines
    wandb: bool = False
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    wandb_project: str = "evaclip"
    tensorboard: bool = True


@dataclass
class DistCfg:
    strategy: Literal["ddp", "fsdp"] = "ddp"
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on CUDA, gloo on CPU
    cpu_offload: bool = False  # fsdp: sharded params, grads and optimizer state on the host (step runs there)
    reshard_after_forward: bool = True  # fsdp: free gathered block weights after forward (False: keep to backward)


@dataclass
class EmaCfg:
    """Weight EMA (``evaclip.engine.ema``): off at ``decay: 0``."""

    decay: float = 0.0  # e.g. 0.9998; 0: no EMA
    warmup: bool = False  # timm's warmup of the decay: min(decay, 1 - (1 + n / warmup_gamma) ** -warmup_power)
    warmup_gamma: float = 1.0
    warmup_power: float = 0.6667
    every: int = 1  # average every N applied optimizer updates
    eval: bool = True  # evaluate the EMA weights beside the raw ones (eval/ema/*)


@dataclass
class EvalCfg:
    """Evaluation cadence and loader settings every task shares (a task extends it with what it evaluates)."""

    every: int = 0  # steps between evaluations during training (0: only at the end, if there is anything to run)
    batch_size: int = 64
    workers: int = 2  # DataLoader workers for evaluation data


@dataclass
class TrainCfg:
    """The sections every task shares. A task's schema extends it (``Task.Cfg``); ``validate`` holds the rules."""

    task: str = "clip"  # the objective, a name in TASKS: contrastive CLIP, or EVA's masked image modeling (mim)
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    ckpt: CkptCfg = field(default_factory=CkptCfg)
    log: LogCfg = field(default_factory=LogCfg)
    dist: DistCfg = field(default_factory=DistCfg)
    ema: EmaCfg = field(default_factory=EmaCfg)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    tf32: bool = True  # precision=fp32 on CUDA: matmuls on TF32 tensor cores (false: exact fp32; evaclip/precision.py)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    epochs: int = 1
    max_steps: Optional[int] = None  # stop after this many optimizer steps (overrides epochs)
    accum_freq: int = 1  # micro-batches per optimizer step (contrastive batch kept over all of them)
    global_batch: Optional[int] = None  # if set: data.batch_size * accum_freq * world size must equal it (recipes)
    seed: int = 0
    output_dir: str = "runs"
    name: Optional[str] = None  # run name (default: recipe name)
    resume: Optional[str] = None  # auto | path to a checkpoint
    max_bad_steps: int = 5  # consecutive NaN/Inf steps before the run stops

    def validate(self) -> None:
        """Range and cross-key rules OmegaConf cannot express; ConfigError naming the key. Subclasses add theirs."""
        if self.task not in TASKS:
            raise ConfigError(f"config key 'task': unknown task {self.task!r}; known: {sorted(TASKS)}")
        if not 0.0 <= self.model.token_drop < 1.0:
            raise ConfigError(f"config key 'model.token_drop' must be in [0, 1), got {self.model.token_drop}")
        if self.accum_freq < 1:
            raise ConfigError(f"config key 'accum_freq' must be >= 1, got {self.accum_freq}")
        if self.model.token_drop_until is not None and self.model.token_drop_until < 0:
            raise ConfigError(f"config key 'model.token_drop_until' must be >= 0, got {self.model.token_drop_until}")
        if self.max_bad_steps < 1:
            raise ConfigError(f"config key 'max_bad_steps' must be >= 1, got {self.max_bad_steps}")
        if self.ckpt.every < 0:
            raise ConfigError(f"config key 'ckpt.every' must be >= 0, got {self.ckpt.every}")
        if self.log.every < 1:
            raise ConfigError(f"config key 'log.every' must be >= 1, got {self.log.every}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"config key 'max_steps' must be >= 1, got {self.max_steps}")
        until = self.model.token_drop_until
        if self.model.token_drop > 0 and until is not None and self.max_steps is not None and until >= self.max_steps:
            raise ConfigError(f"config key 'model.token_drop_until' ({until}) is not below max_steps "
                              f"({self.max_steps}): the unmasked phase would never run; set it below max_steps, or to "
                              "null to drop tokens to the end")
        if self.data.batch_size < 1:
            raise ConfigError(f"config key 'data.batch_size' must be >= 1, got {self.data.batch_size}")
        if self.data.resampled and not self.data.synthetic and not self.data.train_num_samples:
            raise ConfigError("config key 'data.train_num_samples' is required when 'data.resampled' is true")
        if len(self.optim.betas) != 2:
            raise ConfigError(f"config key 'optim.betas' expects two numbers, got {self.optim.betas!r}")
        if self.data.train and any(c in self.data.train for c in "*?"):
            raise ConfigError(f"config key 'data.train': {self.data.train!r} is a glob; name shards with braces "
                              "('shards/{00000..00099}.tar') or give the folder that holds them")
        if self.optim.impl == "reference" and self.optim.lamb_variant != "torch_optimizer":
            raise ConfigError("config key 'optim.lamb_variant': optim.impl=reference is torch_optimizer.Lamb, which "
                              "has no DeepSpeed variant; use optim.impl=foreach with optim.lamb_variant=deepspeed")
        if not 0.0 <= self.ema.decay < 1.0:
            raise ConfigError(f"config key 'ema.decay' must be in [0, 1), got {self.ema.decay}")
        if self.ema.every < 1:
            raise ConfigError(f"config key 'ema.every' must be >= 1, got {self.ema.every}")
        if self.ema.warmup_gamma <= 0 or self.ema.warmup_power <= 0:
            raise ConfigError("config keys 'ema.warmup_gamma' and 'ema.warmup_power' must be > 0")
        from evaclip.fsdp import check_fsdp_config

        check_fsdp_config(self.dist)  # the dist section's rules live with FSDP; checked here, before any work


# ----------------------------------------------------------------------------------------------------------------------
# OmegaConf errors -> one line naming the full key
# ----------------------------------------------------------------------------------------------------------------------
def _one_line(e: OmegaConfBaseException, prefix: str = "") -> ConfigError:
    key = prefix + (getattr(e, "full_key", None) or "")
    msg = (getattr(e, "msg", None) or str(e)).splitlines()[0].strip()
    where = getattr(getattr(e, "object_type", None), "__name__", None)
    if msg.startswith("Key '") and " not in " in msg:  # "Key 'lrr' not in 'OptimCfg'. Did you mean: 'lr'?"
        hint = msg.split("Did you mean:", 1)[1].strip().rstrip("?") if "Did you mean:" in msg else None
        cls = getattr(e, "object_type", None)
        if hint is None and dataclasses.is_dataclass(cls):  # OmegaConf suggests nothing for top-level keys
            import difflib

            close = difflib.get_close_matches(key.rsplit(".", 1)[-1], [f.name for f in dataclasses.fields(cls)], n=1)
            hint = f"'{close[0]}'" if close else None
        text = f"config key '{key}': not in {where or 'the config'}"
        return ConfigError(text + (f"; did you mean {hint}?" if hint else ""))
    return ConfigError(f"config key '{key}': {msg}")


def _merge(base, *others, prefix: str = ""):
    try:
        return OmegaConf.merge(base, *others)
    except OmegaConfBaseException as e:
        raise _one_line(e, prefix) from None


def _to_object(conf, prefix: str = ""):
    try:
        return OmegaConf.to_object(conf)
    except OmegaConfBaseException as e:
        raise _one_line(e, prefix) from None


def _yaml_mapping(text: str, source: str) -> dict:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{source}: not valid YAML ({problem} at{where or ' the end'})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: must be a YAML mapping of config keys, got {type(data).__name__}")
    return data


def parse_overrides(args: list[str]) -> dict[str, str]:
    """``['optim.lr=1e-3', 'precision=bf16']`` -> ``{'optim.lr': '1e-3', 'precision': 'bf16'}``."""
    out = {}
    for a in args:
        if "=" not in a:
            raise ConfigError(f"override '{a}' is not of the form key=value")
        k, v = a.split("=", 1)
        out[k.strip()] = v
    return out


def _check_path(key: str, schema: type) -> None:
    """``optim.lr.x``: a key below a value (not a section) is named as such (OmegaConf would report a type error)."""
    cls, parts = schema, key.split(".")
    for i, part in enumerate(parts[:-1]):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            return  # unknown key: OmegaConf names it with a suggestion
        value = getattr(cls(), part) if dataclasses.is_dataclass(cls) else None
        if isinstance(value, dict):
            return  # free-form mapping (model.overrides)
        if not dataclasses.is_dataclass(value):
            raise ConfigError(f"config key '{key}': '{'.'.join(parts[:i + 1])}' is a value, not a section")
        cls = type(value)


def _overrides_conf(overrides: dict[str, Any], schema: type):
    """Dotted overrides as one OmegaConf mapping; string values are parsed as YAML (``1e-3`` is a float)."""
    dotlist = []
    for key, value in overrides.items():
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override '{key}={value}': the key is not a dotted config key")
        _check_path(key, schema)
        if isinstance(value, str):
            try:
                conf = OmegaConf.from_dotlist([f"{key}={value}"])
            except yaml.YAMLError as e:
                problem = getattr(e, "problem", None) or "parse error"
                raise ConfigError(f"override '{key}={value}': the value is not valid YAML ({problem}); quote it or "
                                  "write e.g. [0.9,0.98]") from None
            dotlist.append(conf)
        else:
            conf = OmegaConf.create({})
            OmegaConf.update(conf, key, value, force_add=True)
            dotlist.append(conf)
    return dotlist


def _check_architecture(cfg: TrainCfg) -> None:
    """Merge ``model.overrides`` onto the model's own ``CLIPCfg`` (type-checked like the rest of the config)."""
    if not cfg.model.overrides:
        return
    from evaclip.models import get_model_config, list_models

    if cfg.model.name not in list_models():
        return  # named by the task's check, with the list of known models
    model_cfg = get_model_config(cfg.model.name)
    try:
        _merge(OmegaConf.structured(model_cfg), OmegaConf.create(cfg.model.overrides), prefix="model.overrides.")
    except ConfigError as e:
        towers = [t for t in ("vision", "text") if any(k in {f.name for f in dataclasses.fields(getattr(model_cfg, t))}
                                                       for k in cfg.model.overrides)]
        if towers and "not in CLIPCfg" in str(e):
            key = next(k for k in cfg.model.overrides if k not in {f.name for f in dataclasses.fields(model_cfg)})
            raise ConfigError(f"{e}; tower keys go under a tower: "
                              + " or ".join(f"model.overrides.{t}.{key}" for t in towers)) from None
        raise
    try:
        get_model_config(cfg.model.name, **cfg.model.overrides)
    except ValueError as e:
        raise ConfigError(f"config key 'model.overrides': {e}") from None


def validate(cfg: TrainCfg) -> TrainCfg:
    """The schema's rules (``cfg.validate()``) and the architecture overrides; raises ConfigError naming the key."""
    cfg.validate()
    _check_architecture(cfg)
    return cfg


def resolve_recipe(recipe: str | Path) -> Path:
    """A recipe is a YAML path, or the name of a file in the repository's ``recipes/`` folder."""
    p = Path(recipe)
    if p.is_file():
        return p
    cand = Path(__file__).resolve().parent.parent / "recipes" / str(recipe)
    for c in (cand, cand.with_suffix(".yaml")):
        if c.is_file():
            return c
    raise ConfigError(f"recipe not found: {recipe} (a YAML file, or a name in recipes/)")


def _build(schema: type, *layers) -> TrainCfg:
    conf = _merge(OmegaConf.structured(schema), *layers)
    return validate(_to_object(conf))


def _task_name(*mappings) -> str:
    """The ``task`` the last mapping that sets it names (``clip`` when none does)."""
    name = "clip"
    for m in mappings:
        if isinstance(m, dict) and m.get("task") is not None:
            name = m["task"]
    if not isinstance(name, str):
        raise ConfigError(f"config key 'task': expects a task name, got {name!r}")
    return name


def _refuse_other_tasks_sections(task: str, schema: type, keys: list[str]) -> None:
    """A top-level key that is no field of ``schema`` but a section of another task: say which task it belongs to."""
    own = {f.name for f in dataclasses.fields(schema)}
    for key in keys:
        if key in own:
            continue
        owners = [t for t in TASKS if t != task and key in {f.name for f in dataclasses.fields(schema_of(t))}]
        if owners:
            raise ConfigError(f"config key '{key}': a section of task {' / '.join(owners)}, not of task={task} "
                              f"({schema.__name__})")


def load_config(recipe: str | Path | None = None, overrides: dict | list | None = None) -> TrainCfg:
    """Defaults <- recipe YAML <- overrides (dict of dotted keys, or a list of ``key=value`` strings), built against
    the schema of the task they name (``task``: the override's, else the recipe's, else ``clip``)."""
    data, name = {}, None
    if recipe is not None:
        path = resolve_recipe(recipe)
        data = _yaml_mapping(path.read_text(), f"recipe {path}")
        name = path.stem
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    overrides = overrides or {}
    task = _task_name(data, {"task": overrides.get("task")})
    schema = schema_of(task)
    _refuse_other_tasks_sections(task, schema, [*data, *(k.split(".")[0] for k in overrides)])
    cfg = _build(schema, OmegaConf.create(data), *_overrides_conf(overrides, schema))
    if cfg.name is None and name is not None:
        cfg.name = name
    return cfg


def apply_overrides(cfg: TrainCfg, overrides: dict | list) -> TrainCfg:
    """A new config: ``cfg`` with dotted ``overrides`` applied (validated; a ``task`` override is refused: another
    task is another run)."""
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    if "task" in overrides and overrides["task"] != cfg.task:
        raise ConfigError(f"config key 'task': this config is task={cfg.task}; start a new run for another task")
    return _build(type(cfg), OmegaConf.structured(cfg), *_overrides_conf(overrides, type(cfg)))


def to_dict(cfg: TrainCfg) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: TrainCfg) -> str:
    """The resolved config as YAML (written into run folders and checkpoints; ``from_yaml`` reads it back)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _drop_other_tasks_keys(data: dict, schema: type) -> dict:
    """A stored config (a run's ``config.yaml``) as this task's schema reads it: runs written before the per-task
    schemas also hold the other tasks' sections (a CLIP run's ``mim``, a MIM run's ``loss`` and ``eval.zeroshot``...)
    at their defaults; they are dropped when they are no field of ``schema`` but one of another registered task's."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    others = [schema_of(t) for t in TASKS]
    out = {}
    for key, value in data.items():
        if key not in fields:
            if any(key in {f.name for f in dataclasses.fields(o)} for o in others):
                continue
        elif isinstance(value, dict) and dataclasses.is_dataclass(sub := getattr(schema(), key)):
            own = {f.name for f in dataclasses.fields(sub)}
            other_keys = {f.name for o in others for f in dataclasses.fields(getattr(o(), key, sub))}
            value = {k: v for k, v in value.items() if k in own or k not in other_keys or v is not None}
        out[key] = value
    return out


def from_dict(data: dict) -> TrainCfg:
    """A validated config from a mapping that names its task (a stored run config: see ``_drop_other_tasks_keys``)."""
    schema = schema_of(_task_name(data))
    return _build(schema, OmegaConf.create(_drop_other_tasks_keys(data, schema)))


def from_yaml(text: str, source: str = "config") -> TrainCfg:
    return from_dict(_yaml_mapping(text, source))


def _flat(obj, prefix: str = "") -> dict[str, Any]:
    if dataclasses.is_dataclass(obj):
        obj = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict) and (obj or not prefix):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def flat_diff(a: TrainCfg, b: TrainCfg) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (value in a, value in b)}`` for every key whose value differs."""
    fa, fb = _flat(a), _flat(b)
    return {k: (fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)}
