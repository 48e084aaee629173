"""Runs and released files -> the models they hold: find a run's config and newest checkpoint, and build the CLIP, the
MIM student or the MIM teacher a run folder, checkpoint, export or released file holds (strict loads).

It sits above ``evaclip.models`` (architecture only, no run folders) and below evaluation, export and the tasks, which
all load through it.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Optional, Union

import torch

from evaclip.checkpoint import resolve_checkpoint
from evaclip.models.mim import MIMStudent, MIMTeacher, Resize, build_student
from evaclip.models.openai_vit import Act, is_openai_vit, openai_vision_tower

__all__ = ["ema_weights", "find_run_config", "load_model", "load_student", "load_teacher"]

_WEIGHT_FILES = ("model.pt", "model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin")


def find_run_config(path: Path) -> Optional[dict]:
    """The resolved training config (``config.yaml``) saved in a checkpoint folder, or beside a weights file."""
    import yaml

    f = (path if path.is_dir() else path.parent) / "config.yaml"
    if f.is_file():
        cfg = yaml.safe_load(f.read_text()) or {}
        if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict):
            return cfg
    return None


def ema_weights(checkpoint_folder: Union[str, Path]) -> dict[str, torch.Tensor]:
    """The weight-EMA averages a training checkpoint holds (its ``ema`` entry: ``ema.pt``, or a DCP folder ``ema/``
    for a ``dist.strategy=fsdp`` run) as a full ``{name: fp32 tensor}``; FileNotFoundError when it has none."""
    from evaclip.checkpoint import torch_load
    from evaclip.checkpoint_sharded import is_sharded_checkpoint, load_full_state_dict

    folder = Path(checkpoint_folder)
    if (folder / "ema.pt").is_file():
        return dict(torch_load(folder / "ema.pt")["shadow"])
    if is_sharded_checkpoint(folder / "ema"):
        return load_full_state_dict(folder / "ema", prefix="state.shadow")
    raise FileNotFoundError(f"{folder} holds no weight EMA (the run trained with ema.decay=0)")


def load_model(checkpoint: str, model_name: Optional[str] = None, device="cpu", attn_backend: str = "auto",
               amp: bool = True, ema: bool = False):
    """Build the model a checkpoint was trained as and load its weights strictly; returns ``(model, name)``.

    The model is built for ``device`` and for the precision ``autocast(device, amp)`` runs it in (bf16 on CUDA with
    ``amp``, else fp32), so ``attn_backend=auto`` picks flash-attn only for a bf16 CUDA evaluation.

    ``checkpoint`` is a run folder (its newest complete checkpoint is used), a training checkpoint folder (``model.pt``
    + the run's ``config.yaml``; a ``task: lcl`` run builds its ``evaclip.models.lcl.LCL``, whose ``encode_image`` /
    ``encode_text`` are the pooled latent and the LM at ``<boi>``), or a state-dict file
    (safetensors / torch) with ``model_name`` naming the architecture (or a ``config.yaml`` beside it). ``ema``: the
    weight-EMA averages of a training checkpoint instead of its raw weights.
    """
    from evaclip.checkpoint_sharded import checkpoint_weights, load_full_state_dict
    from evaclip.models import create_model
    from evaclip.models.convert import load_pretrained, load_state_dict_file

    path = resolve_checkpoint(checkpoint)
    sharded = checkpoint_weights(path) if path.is_dir() else None  # dist.strategy=fsdp checkpoints (DCP shards)
    if sharded is not None:
        weights = sharded
    elif path.is_dir():
        weights = next((path / f for f in _WEIGHT_FILES if (path / f).is_file()), None)
        if weights is None:
            raise FileNotFoundError(f"checkpoint folder {path} has none of {', '.join(_WEIGHT_FILES)}")
    elif path.is_file():
        weights = path
    else:
        raise FileNotFoundError(f"checkpoint not found: {path}")
    overrides = {}
    run_cfg = find_run_config(path)
    if run_cfg is not None:
        overrides = dict(run_cfg["model"].get("overrides") or {})
        if model_name is None:
            model_name = run_cfg["model"].get("name")
    if model_name is None:
        raise ValueError(f"cannot tell which architecture {path} is: pass --model NAME (see evaclip.list_models())")
    precision = "bf16" if amp and torch.device(device).type == "cuda" else "fp32"  # what autocast() runs
    lcl = run_cfg is not None and run_cfg.get("task") == "lcl"
    if lcl:  # an LCL run: its image tower + pooler and its LM (evaluated as a CLIP's two towers)
        from evaclip.models.lcl import create_lcl

        model = create_lcl(model_name, run_cfg["lcl_data"]["context_length"], attn_backend=attn_backend,
                           device=device, precision=precision, **overrides)
    else:
        model = create_model(model_name, attn_backend=attn_backend, device=device, precision=precision, **overrides)
    sd = load_full_state_dict(weights) if sharded is not None else load_state_dict_file(weights)
    if ema:
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: --ema needs a training checkpoint folder (or run folder)")
        averaged = ema_weights(path)
        sd = {k: averaged[k].to(v.dtype) if k in averaged else v for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if (missing or unexpected) and sharded is None and not lcl:
        # not evaclip's own layout: an EVA-CLIP release / open_clip file, which convert.py maps (strictly)
        load_pretrained(model, pretrained=str(weights))
    elif missing or unexpected:
        raise ValueError(f"{weights} does not match {model_name}: missing keys {sorted(missing)[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected keys {sorted(unexpected)[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
    return model.to(device).eval(), model_name


def _run_model_cfg(path: Path) -> tuple[Optional[str], dict]:
    """(model name, architecture overrides) from the ``config.yaml`` of a training checkpoint, if there is one."""
    run_cfg = find_run_config(path)
    if run_cfg is None:
        return None, {}
    return run_cfg["model"].get("name"), dict(run_cfg["model"].get("overrides") or {})


def load_student(checkpoint: Union[str, Path], model_name: Optional[str] = None, *, attn_backend: str = "sdpa",
                 **overrides) -> MIMStudent:
    """A MIM student from an evaclip MIM run folder, checkpoint (DDP or FSDP) or file, or from an EVA-02 released MIM
    checkpoint. The architecture is the run's ``config.yaml`` (``model.name`` + overrides) or ``model_name`` (+
    ``overrides``); T and the attention sub-LN are read off the weights. Loads strictly."""
    from evaclip.models.convert import CheckpointError, eva_mim_student_state, load_state_dict_file

    try:
        path = resolve_checkpoint(checkpoint)
    except FileNotFoundError as e:
        raise CheckpointError(str(e)) from None
    name, run_overrides = _run_model_cfg(path)
    if model_name is not None:
        name, run_overrides = model_name, {}
    if name is None:
        raise ValueError(f"cannot tell which architecture {checkpoint} is: pass the model name (see "
                         "evaclip.list_models())")
    sd = eva_mim_student_state(load_state_dict_file(path))
    if "lm_head.weight" not in sd or "mask_token" not in sd:
        raise CheckpointError(f"{checkpoint} holds no MIM student (no mask_token / lm_head.weight)")
    student = build_student(name, sd["lm_head.weight"].shape[0], attn_backend=attn_backend, init="eva01",
                            attn_subln=any(".attn.inner_attn_ln." in k for k in sd), **{**run_overrides, **overrides})
    missing, unexpected = student.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{checkpoint} does not match a {name} MIM student: missing {sorted(missing)[:8]}, "
                              f"unexpected {sorted(unexpected)[:8]}")
    return student


def load_teacher(path: Union[str, Path], model_name: Optional[str] = None, *, attn_backend: str = "auto",
                 resize: Resize = "bilinear", openai_act: Act = "quick_gelu") -> MIMTeacher:
    """A MIM teacher (on the CPU) from anything evaclip loads as a CLIP image tower: an ``evaclip export`` folder (its
    ``image/`` encoder), an evaclip run folder or checkpoint, an evaclip / EVA-CLIP release / open_clip EVA02 file
    (``model_name`` names the architecture when no ``config.yaml`` says it), a file holding the image tower alone
    (``model_name`` required; its CLIP head must be in it), or an OpenAI-layout ViT file (OpenAI's CLIP release
    layout, or an open_clip non-timm ViT: ``visual.conv1``): EVA-01's teacher, whose architecture is read off the
    weights (no ``model_name``) and whose activation is ``openai_act`` (QuickGELU for OpenAI's models)."""
    from evaclip.models.convert import CheckpointError, load_state_dict_file

    p = Path(path)
    if (p / "config.json").is_file() or (p / "image" / "config.json").is_file():
        from evaclip.encoder import load_encoder

        return MIMTeacher(load_encoder(p, "image").tower, resize)
    if p.is_file() and _peek_is_openai_vit(p):
        if model_name is not None:
            raise CheckpointError(f"{path} is an OpenAI-layout ViT CLIP (visual.conv1), whose architecture is read off "
                                  f"its weights: do not name one (got {model_name!r}; set mim.teacher_model=null)")
        return MIMTeacher(openai_vision_tower(load_state_dict_file(p), openai_act, str(p)), resize)
    try:
        clip, _ = load_model(str(p), model_name, "cpu", attn_backend=attn_backend)
    except CheckpointError:
        if model_name is None:
            raise
        from evaclip.models import create_model
        from evaclip.models.convert import load_pretrained

        clip = create_model(model_name, attn_backend=attn_backend)
        report = load_pretrained(clip, image_init=str(p))
        if any(k.startswith("visual.head.") for k in report.fresh):
            raise CheckpointError(f"{path} has no CLIP projection head for the image tower: it cannot be a MIM "
                                  "teacher (the targets are the tower's features through its head)") from None
    return MIMTeacher(clip.visual, resize)


def _peek_is_openai_vit(path: Path) -> bool:
    """Whether the file holds an OpenAI-layout ViT, from its key names only (safetensors header; a torch file mapped,
    not read); unreadable files answer False and fail later with their own error."""
    from evaclip.models.convert import CheckpointError, unwrap_state_dict

    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                return is_openai_vit(dict.fromkeys(f.keys()))
        return is_openai_vit(unwrap_state_dict(torch.load(path, map_location="cpu", weights_only=True, mmap=True)))
    except (CheckpointError, RuntimeError, OSError, ValueError, EOFError, pickle.UnpicklingError):
        return False
