"""Checkpoint formats in and out of evaclip's parameter layout, with strict key accounting.

In: the EVA-CLIP release (``visual.*``, ``text.*``, ``logit_scale``; q_proj/k_proj/v_proj + q_bias/v_bias,
w1/w2/ffn_ln/w3, inner_attn_ln), EVA MIM pre-training (image tower only, no prefix), timm ``eva02_*`` (bare) and
open_clip ``EVA02-*`` (timm naming under ``visual.trunk.``), OpenAI / open_clip text towers, and evaclip's own files
(safetensors or torch); an evaclip LCL model (``lcl``: its ``visual.*`` image tower, whose CLIP head
starts fresh, as a CLIP's ``model.image_init``).
Out: ``to_open_clip_state_dict`` (open_clip's EVA02 layout), ``to_eva_clip_state_dict`` (the EVA-CLIP release layout),
``to_eva_mim_state_dict`` (a MIM student in EVA-02's released MIM layout).

Every load accounts for every key: known-ignorable ones (RoPE tables, ``mask_token``, ``lm_head``, attention masks) are
dropped, anything else missing or unexpected raises ``CheckpointError`` naming the keys. Shapes that legitimately differ
are adapted: the position embedding is interpolated to the model's grid (224 -> 336) and the patch-embedding kernel
resized (14 -> 16, as EVA's ``psz14to16`` weights).
Shapes: see the legend in docs/ARCHITECTURE.md (S patch-grid side, D width, C channels, Z patch side in pixels, N
tokens).
"""
from __future__ import annotations

import contextlib
import math
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F

from evaclip.errors import CheckpointError  # noqa: F401 (re-exported: one class for every checkpoint error)

FORMATS = ("evaclip", "eva_clip", "eva_mim", "timm", "open_clip", "openai_text", "lcl")

# Keys no evaclip model holds: recomputed tables, pre-training heads, masks. Dropped wherever they appear.
IGNORABLE = re.compile(
    r"(^|\.)(rope\.\w+|freqs_cos|freqs_sin|mask_token|lm_head\.\w+|attn_mask|k_bias|input_resolution|context_length"
    r"|vocab_size)$|(^|\.)lm_head\.")

_WRAPPERS = ("state_dict", "model", "module", "model_ema", "ema")


@dataclass
class LoadReport:
    """What a load did: the detected format per source and the keys that were dropped, adapted or left fresh."""

    formats: dict = field(default_factory=dict)  # "pretrained" | "image_init" | "text_init" -> format name
    ignored: list = field(default_factory=list)  # source keys dropped as known-ignorable
    adapted: list = field(default_factory=list)  # model keys whose tensors were resized (pos embed, patch kernel)
    fresh: list = field(default_factory=list)  # model keys a format legitimately lacks (kept at their init)
    reinit: dict = field(default_factory=dict)  # fresh model keys given a format-specific init -> what it is
    notes: list = field(default_factory=list)  # one line per decision worth logging (a dropped projection, ...)


# ----------------------------------------------------------------------------------------------------------------------
# reading files
# ----------------------------------------------------------------------------------------------------------------------
def load_state_dict_file(path: Union[str, Path]) -> dict:
    """A flat ``{name: tensor}`` from a safetensors or torch file, unwrapped from ``state_dict`` / ``model`` /
    ``module`` containers and ``module.`` prefixes. Torch files are read with ``weights_only=True``: a pickle that
    would run code is refused with CheckpointError. A run folder reads its newest checkpoint, a ``dist.strategy=fsdp``
    checkpoint its DCP shards."""
    from evaclip.checkpoint import resolve_checkpoint

    try:
        path = resolve_checkpoint(path)
    except FileNotFoundError as e:  # a run folder without a complete checkpoint
        raise CheckpointError(str(e)) from None
    if path.is_dir():  # an evaclip checkpoint folder (RUN/ckpt/step_X) or an exported encoder folder
        from evaclip.checkpoint_sharded import checkpoint_weights, load_full_state_dict

        if checkpoint_weights(path) is not None:
            return unwrap_state_dict(load_full_state_dict(checkpoint_weights(path)))
        found = [path / n for n in ("model.safetensors", "model.pt") if (path / n).is_file()]
        if not found and ((path / "image").is_dir() or (path / "text").is_dir()):
            raise CheckpointError(f"{path} is an evaclip export (one folder per tower): pass {path / 'image'} as "
                                  f"model.image_init (or a MIM teacher), {path / 'text'} as model.text_init")
        if not found:
            raise CheckpointError(f"{path} is a folder without model.safetensors or model.pt")
        path = found[0]
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(512)
    not_weights = not_a_weights_file(path, head)
    if not_weights:
        raise CheckpointError(f"{path} is {not_weights}, not a checkpoint: expected a torch (.pt / .pth / .bin) or "
                              ".safetensors file of weights, a run folder or an evaclip export folder")
    if path.suffix == ".safetensors" or (len(head) >= 9 and head[8:9] == b"{"):
        from safetensors.torch import load_file

        try:
            return unwrap_state_dict(load_file(str(path)))
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} needs code execution to unpickle, so it is refused (evaclip loads with weights_only=True). "
            f"Re-save only its tensors, e.g. torch.save(obj['state_dict'], 'clean.pt'), from a source you trust. "
            f"Details: {str(e).splitlines()[0]}") from e
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable torch checkpoint: {e}") from e
    return unwrap_state_dict(obj)


def not_a_weights_file(path: Path, head: bytes) -> Optional[str]:
    """What a file that cannot hold weights is (None when it may): torch files start with a zip (``PK``) or pickle
    (``\\x80``) header, safetensors with an 8-byte length and ``{``."""
    if head.startswith((b"PK", b"\x80")) or (len(head) >= 9 and head[8:9] == b"{"):
        return None
    if not head:
        return "empty (0 bytes)"
    if path.suffix.lower() == ".onnx":
        return "an ONNX model (run it with onnxruntime; an evaclip export keeps its weights in model.safetensors)"
    try:
        head.decode("utf-8")
        return f"a text file ({path.suffix.lstrip('.').upper() or 'plain'} text)"
    except UnicodeDecodeError:
        return None if path.suffix.lower() in (".pt", ".pth", ".bin", ".ckpt") else "not a known weights format"


def unwrap_state_dict(obj) -> dict:
    """Descend through ``state_dict`` / ``model`` / ``module`` wrappers and strip ``module.`` (DDP) prefixes."""
    while isinstance(obj, dict) and not any(torch.is_tensor(v) for v in obj.values()):
        inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            raise CheckpointError(f"no state dict found in the checkpoint; top-level keys: {sorted(obj)[:10]}")
        obj = inner
    if not isinstance(obj, dict):
        raise CheckpointError(f"a checkpoint must hold a dict of tensors, got {type(obj).__name__}")
    sd = {}
    for k, v in obj.items():
        if torch.is_tensor(v):
            sd[k.removeprefix("module.")] = v
    return sd


# ----------------------------------------------------------------------------------------------------------------------
# format detection and key maps into evaclip's layout
# ----------------------------------------------------------------------------------------------------------------------
_TEXT_TOP = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")


def detect_format(sd: dict) -> str:
    """One of FORMATS, from the key names alone; CheckpointError when nothing matches.

    ``evaclip`` and ``eva_clip`` share the ``visual.`` / ``text.`` naming; the release splits q/k/v in sub-LN (EVA-02)
    towers, keeps SwiGLU w1/w2 apart and stores RoPE tables, evaclip fuses them. EVA-01 releases (fused qkv, no RoPE)
    read as ``evaclip``, which maps them identically."""
    keys = set(sd)
    has = lambda *parts: any(p in k for k in keys for p in parts)
    if "pooler.pool.query" in keys and any(k.startswith("visual.") for k in keys):
        return "lcl"  # an evaclip LCL model (evaclip.models.lcl): the CLIP's image tower without its head
    if any(k.startswith("visual.trunk.") for k in keys):
        return "open_clip"
    if any(k.startswith("visual.blocks.") for k in keys):
        if has(".attn.q_proj.weight", ".mlp.w1.", "visual.rope.", ".attn.rope."):
            return "eva_clip"
        return "evaclip"
    if any(k.startswith("blocks.") for k in keys):
        timm_names = has(".attn.norm.", ".mlp.fc1_g.", ".mlp.norm.", ".attn.q_proj.bias")
        return "timm" if timm_names or ("head.weight" in keys and "lm_head.weight" not in keys) else "eva_mim"
    if any(k.startswith(("text.transformer.",) + _TEXT_TOP) for k in keys):
        return "openai_text"
    raise CheckpointError(f"unrecognised checkpoint layout; first keys: {sorted(keys)[:8]}")


# (separate names, fused name): evaclip computes each group with one GEMM; other layouts keep the parts
_FUSED = ((("attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight"), "attn.qkv.weight"),
          (("mlp.w1.weight", "mlp.w2.weight"), "mlp.w12.weight"), (("mlp.w1.bias", "mlp.w2.bias"), "mlp.w12.bias"))


def _fuse(sd: dict) -> dict:
    """Separate projections -> evaclip's fused ones (``attn.qkv``, ``mlp.w12``), concatenated along the output rows."""
    out = dict(sd)
    for parts, fused in _FUSED:
        for k in [k for k in sd if k.endswith("." + parts[0])]:
            p = k[: -len(parts[0])]
            names = [p + n for n in parts]
            absent = [n for n in names if n not in sd]
            if absent:
                raise CheckpointError(f"{k} has no matching {absent}")
            out[p + fused] = torch.cat([sd[n] for n in names], dim=0)
            for n in names:
                del out[n]
    return out


def _split(sd: dict, groups=_FUSED) -> dict:
    """evaclip's fused projections -> the separate ones of the EVA-CLIP release / timm."""
    out = {}
    for k, t in sd.items():
        for parts, fused in groups:
            if k.endswith("." + fused):
                p = k[: -len(fused)]
                out.update({p + n: c for n, c in zip(parts, t.chunk(len(parts), dim=0))})
                break
        else:
            out[k] = t
    return out


def _visual_part(sd: dict, fmt: str) -> tuple[dict, list]:
    """The image-tower keys of a checkpoint, relative to the tower, in evaclip naming; plus ignored keys."""
    prefix = {"open_clip": "visual.trunk.", "eva_clip": "visual.", "evaclip": "visual.", "timm": "", "eva_mim": "",
              "lcl": "visual."}
    if fmt not in prefix:
        if "visual.conv1.weight" in sd:  # (openai_vit.is_openai_vit; that module imports this one)
            raise CheckpointError("its image tower is an OpenAI-layout ViT (visual.conv1), not an EVA tower: it can be "
                                  "a MIM teacher (mim.teacher), and its text tower a model.text_init")
        if fmt == "openai_text":
            raise CheckpointError("it holds a text tower only (a text encoder export or text checkpoint): it can be "
                                  "a model.text_init, not an image tower")
        raise CheckpointError(f"a '{fmt}' checkpoint has no image tower")
    p = prefix[fmt]
    sub, ignored = {}, []
    for k, t in sd.items():
        if p and not k.startswith(p):
            continue
        rel = k[len(p):]
        if IGNORABLE.search(rel):
            ignored.append(k)
            continue
        sub[rel] = t
    swiglu = any(".mlp.fc1_g." in k for k in sub)
    out = {}
    for rel, t in sub.items():
        if fmt in ("timm", "open_clip"):
            for a, b in ((".attn.q_proj.bias", ".attn.q_bias"), (".attn.v_proj.bias", ".attn.v_bias"),
                         (".attn.norm.", ".attn.inner_attn_ln."), (".mlp.fc1_g.", ".mlp.w1."),
                         (".mlp.fc1_x.", ".mlp.w2."), (".mlp.norm.", ".mlp.ffn_ln.")):
                rel = rel.replace(a, b)
            if swiglu:
                rel = rel.replace(".mlp.fc2.", ".mlp.w3.")
        out[rel] = t
    return _fuse(out), ignored


def _text_part(sd: dict, fmt: str) -> tuple[dict, list]:
    """The text-tower keys, relative to the tower (open_clip names); OpenAI's top-level layout gets no prefix."""
    sub, ignored = {}, []
    prefixed = any(k.startswith("text.") for k in sd)
    for k, t in sd.items():
        if prefixed:
            if not k.startswith("text."):
                continue
            rel = k[len("text."):]
        elif k.startswith(_TEXT_TOP):
            rel = k
        else:
            continue
        if IGNORABLE.search(rel):
            ignored.append(k)
            continue
        sub[rel] = t
    if not sub:
        if fmt == "eva_mim":
            raise CheckpointError("it is a MIM student (an image tower only, EVA's MIM layout): it can be a "
                                  "model.image_init, not a text tower")
        raise CheckpointError(f"the '{fmt}' checkpoint has no text tower (no text.* or transformer.* keys)")
    return sub, ignored


# ----------------------------------------------------------------------------------------------------------------------
# shape adaptation
# ----------------------------------------------------------------------------------------------------------------------
def interpolate_pos_embed(pos_1ND: torch.Tensor, grid: int, num_prefix: int = 1) -> torch.Tensor:
    """Resize an absolute position embedding (prefix tokens + S_src^2 patches) to ``grid`` x ``grid`` patches, bicubic
    (as EVA-CLIP and timm do); prefix (CLS) rows are kept as they are."""
    prefix, patches = pos_1ND[:, :num_prefix], pos_1ND[:, num_prefix:]
    src = math.isqrt(patches.shape[1])
    if src * src != patches.shape[1]:
        raise CheckpointError(f"position embedding of {patches.shape[1]} patch tokens is not a square grid")
    if src == grid:
        return pos_1ND
    D = patches.shape[-1]
    img_1DSS = patches.reshape(1, src, src, D).permute(0, 3, 1, 2).float()
    img_1DSS = F.interpolate(img_1DSS, size=(grid, grid), mode="bicubic", align_corners=False)
    patches = img_1DSS.permute(0, 2, 3, 1).reshape(1, grid * grid, D).to(pos_1ND.dtype)
    return torch.cat([prefix, patches], dim=1)


def resize_patch_embed(w_DCZZ: torch.Tensor, size: int, method: str = "interpolate") -> torch.Tensor:
    """Resize a patch-embedding kernel to ``size`` x ``size``. ``interpolate``: bicubic, as EVA's ``psz14to16``
    weights were made; ``pinv``: FlexiViT's pseudo-inverse resize (timm), which keeps the response to resized
    patches."""
    if w_DCZZ.shape[-1] == size and w_DCZZ.shape[-2] == size:
        return w_DCZZ
    if method == "pinv":
        from timm.layers import resample_patch_embed

        return resample_patch_embed(w_DCZZ, [size, size], verbose=False)
    if method != "interpolate":
        raise ValueError(f"patch resize method must be 'interpolate' or 'pinv', got {method!r}")
    return F.interpolate(w_DCZZ.float(), size=(size, size), mode="bicubic", align_corners=False).to(w_DCZZ.dtype)


def _adapt(src: dict, target: dict, prefix: str, report: LoadReport, num_prefix: int = 1) -> dict:
    """Resize the position embedding / patch kernel of the image tower to the target shapes; other shape mismatches
    raise CheckpointError naming the keys (text towers use it only for that check)."""
    bad = []
    for k, t in list(src.items()):
        want = target.get(k)
        if want is None or t.shape == want.shape:
            continue
        if k == "pos_embed" and t.ndim == 3:
            src[k] = interpolate_pos_embed(t, math.isqrt(want.shape[1] - num_prefix), num_prefix)
        elif k == "patch_embed.proj.weight" and t.shape[:2] == want.shape[:2]:
            src[k] = resize_patch_embed(t, want.shape[-1])
        else:
            bad.append(f"{prefix}{k}: checkpoint {tuple(t.shape)} vs model {tuple(want.shape)}")
            continue
        report.adapted.append(prefix + k)
    if bad:  # one line: the first two, and what it means (a full list of a big tower is kilobytes)
        raise CheckpointError(f"{len(bad)} of its tensors do not fit the model's shapes ({'; '.join(bad[:2])}"
                              f"{'; ...' if len(bad) > 2 else ''}): it is another architecture than model.name "
                              f"(+ model.overrides) builds")
    return src


# ----------------------------------------------------------------------------------------------------------------------
# loading into a model
# ----------------------------------------------------------------------------------------------------------------------
def _check_keys(src: dict, target: dict, prefix: str, what: str, allowed_missing: tuple = ()) -> list:
    missing = sorted(k for k in target if k not in src and not any(a in k for a in allowed_missing))
    unexpected = sorted(k for k in src if k not in target)
    if missing or unexpected:
        msg = [f"{what} does not match the model"]
        if missing:
            msg.append(f"missing keys ({len(missing)}): {[prefix + k for k in missing[:12]]}")
        if unexpected:
            msg.append(f"unexpected keys ({len(unexpected)}): {[prefix + k for k in unexpected[:12]]}")
        raise CheckpointError("; ".join(msg))
    return sorted(prefix + k for k in target if k not in src)


def _model_sd(module: torch.nn.Module) -> dict:
    return {k: v for k, v in module.state_dict().items() if not IGNORABLE.search(k)}


def load_visual(model, sd: dict, fmt: Optional[str] = None, report: Optional[LoadReport] = None) -> LoadReport:
    """Load the image tower of ``model`` (a CLIP or a bare EVAVisionTransformer) from a state dict in any image format.

    EVA MIM checkpoints have no CLIP head and (EVA-02) no attention sub-LN: those stay at their init, listed in
    ``report.fresh``."""
    report = report or LoadReport()
    fmt = fmt or detect_format(sd)
    tower = getattr(model, "visual", model)
    report.formats.setdefault("visual", fmt)
    if _is_timm_tower(tower):
        return _load_timm_visual(tower, sd, fmt, report)
    src, ignored = _visual_part(sd, fmt)
    target = _model_sd(tower)
    fresh_ok = ("head.", "inner_attn_ln.") if fmt == "eva_mim" else ("head.",) if fmt == "lcl" else ()
    if fmt == "timm" and "head.weight" not in src:
        fresh_ok = ("head.",)  # timm backbones saved with num_classes=0
    src = _adapt(src, target, "visual.", report)
    report.fresh += _check_keys(src, target, "visual.", f"image tower of the '{fmt}' checkpoint", fresh_ok)
    report.ignored += ignored
    tower.load_state_dict(src, strict=False)
    if fmt == "eva_mim" and "visual.head.weight" in report.fresh:
        report.reinit.update(init_head_from_mim(tower.head, "visual.head"))
    return report


# EVA-CLIP's init of the CLIP head of a tower built from a MIM checkpoint: trunc_normal(std 0.02) then x init_scale
# (0.001), bias 0 x 0.001 (baaivision/EVA, EVA-CLIP/rei/eva_clip/eva_vit_model.py:433-436; init_scale's default at
# :373, which model.py:110 keeps). timm's trunc_normal_ cuts at +-2 absolute: no cut at std 0.02.
MIM_HEAD_STD, MIM_HEAD_SCALE = 0.02, 1e-3


def init_head_from_mim(head: torch.nn.Linear, name: str = "head") -> dict:
    """EVA-CLIP's fresh CLIP head on a MIM-initialised image tower (see ``MIM_HEAD_SCALE``); returns what it did, for
    the load report. With LAMB the head's trust ratio depends on this scale from the first step."""
    with torch.no_grad():
        torch.nn.init.trunc_normal_(head.weight, std=MIM_HEAD_STD, a=-2.0, b=2.0)
        head.weight.mul_(MIM_HEAD_SCALE)
        if head.bias is not None:
            head.bias.zero_()
    return {f"{name}.weight": f"trunc_normal(std {MIM_HEAD_STD}) x {MIM_HEAD_SCALE} (EVA-CLIP's head init)",
            f"{name}.bias": "zeros"}
def _is_timm_tower(tower) -> bool:
    cfg = getattr(tower, "cfg", None)
    return bool(getattr(cfg, "timm_model", None))


def _load_timm_visual(tower, sd: dict, fmt: str, report: LoadReport) -> LoadReport:
    """A timm-built image tower (ViTamin): its keys are open_clip's (``trunk.*``, ``head.proj.weight``), so an
    open_clip or evaclip checkpoint loads under ``visual.`` as it is, and a bare timm trunk (``timm``) under
    ``trunk.`` (its projection then stays fresh: timm's classifier is no CLIP projection)."""
    classifier = []  # a bare timm trunk's own classifier: no CLIP projection, dropped (listed as ignored)
    if fmt in ("open_clip", "evaclip", "lcl"):
        src = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    elif fmt == "timm":
        classifier = [k for k in sd if k.startswith("head.")]
        src = {f"trunk.{k}": v for k, v in sd.items() if k not in classifier}
    else:
        raise CheckpointError(f"a '{fmt}' checkpoint holds an EVA image tower; this model's image tower is timm's "
                              f"{tower.cfg.timm_model} (a hybrid with conv stages), which it cannot initialise")
    ignored = [k for k in src if IGNORABLE.search(k)]
    src = {k: v for k, v in src.items() if k not in ignored}
    target = _model_sd(tower)
    fresh_ok = ("head.",) if fmt in ("timm", "lcl") else ()
    src = _adapt(src, target, "visual.", report, num_prefix=tower.num_prefix)
    report.fresh += _check_keys(src, target, "visual.", f"image tower of the '{fmt}' checkpoint", fresh_ok)
    report.ignored += [f"visual.{k}" for k in ignored] + classifier
    tower.load_state_dict(src, strict=False)
    return report


def load_text(model, sd: dict, fmt: Optional[str] = None, report: Optional[LoadReport] = None) -> LoadReport:
    """Load the text tower of ``model`` (a CLIP or a bare TextTransformer) from an OpenAI / open_clip / EVA-CLIP /
    evaclip state dict. A ``text_projection`` whose output width differs from the model's embedding (a text tower
    taken from a CLIP of another embedding size, as in Locked-Text Tuning) is dropped and left fresh, with a
    ``report.notes`` line saying so; any other mismatch is an error."""
    report = report or LoadReport()
    fmt = fmt or detect_format(sd)
    tower = getattr(model, "text", model)
    report.formats.setdefault("text", fmt)
    src, ignored = _text_part(sd, fmt)
    target = _model_sd(tower)
    proj, want = src.get("text_projection"), target.get("text_projection")
    if proj is not None and want is not None and proj.shape != want.shape and proj.shape[:1] == want.shape[:1]:
        del src["text_projection"]
        ignored.append("text.text_projection")
        report.fresh.append("text.text_projection")
        report.notes.append(f"text.text_projection dropped: checkpoint {tuple(proj.shape)} vs model "
                            f"{tuple(want.shape)} (another embedding width); it starts fresh and stays trainable")
    _check_keys(src, target, "text.", f"text tower of the '{fmt}' checkpoint",
                ("text_projection",) if "text.text_projection" in report.fresh else ())
    _adapt(src, target, "text.", report)  # nothing to resize in a text tower: names any shape mismatch
    report.ignored += ignored
    tower.load_state_dict(src, strict=False)
    return report


def load_clip_state_dict(model, sd: dict, fmt: Optional[str] = None) -> LoadReport:
    """Load a whole CLIP (both towers and the logit scale / bias) strictly from any whole-CLIP format."""
    fmt = fmt or detect_format(sd)
    if fmt == "eva_mim":
        raise CheckpointError("this is a MIM student (masked image modeling, EVA's layout), not a CLIP: export it "
                              "with `evaclip export RUN --format eva_mim`, monitor it with k-NN (mim.knn_train / "
                              "mim.knn_val), or start a CLIP's image tower from it with model.image_init=RUN")
    if fmt == "lcl":
        raise CheckpointError("this is an LCL model (an image tower, a pooler and a language model), not a CLIP: "
                              "start a CLIP's image tower from it with model.image_init=RUN")
    if fmt not in ("evaclip", "eva_clip", "open_clip"):
        raise CheckpointError(f"a '{fmt}' checkpoint holds one tower only; pass it as image_init= or text_init=")
    report = LoadReport(formats={"pretrained": fmt})
    load_visual(model, sd, fmt, report)
    load_text(model, sd, fmt, report)
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(("visual.", "text."))}
    rest = {k: v for k, v in sd.items() if not k.startswith(("visual.", "text.")) and "." not in k
            and not k.startswith(_TEXT_TOP) and not IGNORABLE.search(k)}
    _check_keys(rest, own, "", f"the '{fmt}' checkpoint (outside the towers)")
    with torch.no_grad():
        for k, v in rest.items():
            own[k].copy_(v.reshape(own[k].shape))
    return report


def load_pretrained(model, pretrained=None, image_init=None, text_init=None) -> LoadReport:
    """``create_model``'s loader: a whole-CLIP checkpoint, then tower-wise inits (each a path or a state dict)."""
    report = LoadReport()
    read = lambda src: src if isinstance(src, dict) else load_state_dict_file(src)
    with _naming("model.pretrained", pretrained):
        _load_whole(model, read, pretrained, report)
    with _naming("model.image_init", image_init):
        if image_init is not None:
            sd = read(image_init)
            report.formats["image_init"] = detect_format(sd)
            load_visual(model, sd, report.formats["image_init"], report)
    with _naming("model.text_init", text_init):
        if text_init is not None:
            sd = read(text_init)
            report.formats["text_init"] = detect_format(sd)
            load_text(model, sd, report.formats["text_init"], report)
            _init_logit_scale(model, sd, report)
    return report


@contextlib.contextmanager
def _naming(key: str, src):
    """A CheckpointError from loading ``src`` names the config key and the file (the path is in the message already
    when the file itself was unreadable)."""
    try:
        yield
    except CheckpointError as e:
        where = "" if src is None or isinstance(src, dict) or str(src) in str(e) else f" {src}"
        named = CheckpointError(f"{key}{where}: {e}")
        named.reason = getattr(e, "reason", str(e))  # without the key: a caller loading for another key names its own
        raise named from None


def _load_whole(model, read, pretrained, report: LoadReport) -> None:
    if pretrained is not None:
        r = load_clip_state_dict(model, read(pretrained))
        report.formats.update(r.formats)
        report.ignored += r.ignored
        report.adapted += r.adapted
        report.fresh += r.fresh
        report.reinit.update(r.reinit)
        report.notes += r.notes


def _init_logit_scale(model, sd: dict, report: LoadReport) -> None:
    """Locked-Text Tuning: a text tower taken from a CLIP brings that CLIP's ``logit_scale`` (the temperature its
    text features were trained at), clamped at ln 100 as in training; it stays trainable. A bare text tower (OpenAI
    layout without the scale) leaves the model's init."""
    scale = getattr(model, "logit_scale", None)
    if scale is None:
        return
    if "logit_scale" not in sd:
        init = float(scale.detach())
        report.notes.append("text_init has no logit_scale: logit_scale keeps its init "
                            f"({init:.4f}, temperature 1/{math.exp(init):.1f})")
        return
    value = min(float(sd["logit_scale"].float().reshape(())), math.log(100.0))
    with torch.no_grad():
        scale.fill_(value)
    report.notes.append(f"logit_scale = {value:.4f} (scale {math.exp(value):.2f}) from text_init, trainable, clamped "
                        "at ln 100")


# ----------------------------------------------------------------------------------------------------------------------
# evaclip -> other layouts
# ----------------------------------------------------------------------------------------------------------------------
def visual_to_timm(sd: dict, qkv_fused: bool = False) -> dict:
    """evaclip image-tower keys (relative to the tower) -> timm ``Eva`` keys."""
    swiglu = any(".mlp.w12." in k for k in sd)
    out = {}
    for k, t in _split(sd, _FUSED[1:] if qkv_fused else _FUSED).items():
        if IGNORABLE.search(k):
            continue
        if not qkv_fused:
            k = k.replace(".attn.q_bias", ".attn.q_proj.bias").replace(".attn.v_bias", ".attn.v_proj.bias")
        for a, b in ((".attn.inner_attn_ln.", ".attn.norm."), (".mlp.w1.", ".mlp.fc1_g."), (".mlp.w2.", ".mlp.fc1_x."),
                     (".mlp.ffn_ln.", ".mlp.norm.")):
            k = k.replace(a, b)
        if swiglu:
            k = k.replace(".mlp.w3.", ".mlp.fc2.")
        out[k] = t
    return out


def to_open_clip_state_dict(model, qkv_fused: Optional[bool] = None) -> dict:
    """The model in open_clip's EVA layout: timm ``Eva`` under ``visual.trunk.``, the text tower under ``text.``,
    logit scale. ``qkv_fused`` defaults to timm's choice for the architecture: separate q/k/v projections for the
    sub-LN EVA-02 towers (``eva02_*_clip``), one fused qkv for EVA-01 g/14 and bigE. A timm image tower (ViTamin) is
    already in open_clip's layout (``visual.trunk.*``, ``visual.head.proj.weight``)."""
    if _is_timm_tower(model.visual):
        return {k: v for k, v in model.state_dict().items() if not IGNORABLE.search(k)}
    if qkv_fused is None:
        qkv_fused = not model.cfg.vision.subln
    sd = model.state_dict()
    visual = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    out = {f"visual.trunk.{k}": v for k, v in visual_to_timm(visual, qkv_fused).items()}
    for k, v in sd.items():
        if not k.startswith("visual.") and not IGNORABLE.search(k):
            out[k] = v
    return out


def to_eva_clip_state_dict(model) -> dict:
    """The model in the EVA-CLIP release layout (q_proj/k_proj/v_proj in sub-LN towers, as EVA-02 releases)."""
    if _is_timm_tower(model.visual):
        raise CheckpointError(f"{model.cfg.vision.timm_model} is no EVA image tower: export it in the open_clip layout")
    sd = {k: v for k, v in model.state_dict().items() if not IGNORABLE.search(k)}
    return _split(sd, _FUSED if model.cfg.vision.subln else _FUSED[1:])


def to_eva_mim_state_dict(student) -> dict:
    """A MIM student (``evaclip.models.mim.MIMStudent``) in EVA-02's released MIM layout, the ``eva_mim`` load path
    in reverse: no prefix, ``mask_token`` and ``lm_head`` kept; sub-LN towers (EVA-02 B / L) split q/k/v and the
    SwiGLU w1 / w2, the others (EVA-01, EVA-02 Ti / S) keep the fused qkv and w12 as their releases do. RoPE towers
    also get the ``freqs_cos`` / ``freqs_sin`` buffers EVA-02's classes hold (persistent there, so a strict load with
    them needs them): the model's ``rope`` and each block's ``attn.rope`` (the same module, saved under both names),
    P x F tables without the CLS row and without evaclip's sign folding."""
    sd = _split(student.state_dict(), _FUSED if student.cfg.subln else ())
    cfg = student.cfg
    if cfg.rope:
        from .rope import rope_tables

        cos_PF, sin_PF = rope_tables(cfg.width // cfg.heads, cfg.grid, cfg.pt_hw_seq_len)
        for prefix in ["rope."] + [f"blocks.{i}.attn.rope." for i in range(cfg.depth)]:
            sd[prefix + "freqs_cos"], sd[prefix + "freqs_sin"] = cos_PF.clone(), sin_PF.clone()
    return sd


def eva_mim_student_state(sd: dict) -> dict:
    """``to_eva_mim_state_dict`` in reverse, for a released or an evaclip MIM checkpoint: evaclip's fused projections,
    recomputed tables (RoPE) dropped, ``mask_token`` and ``lm_head`` kept (the keys of ``MIMStudent``)."""
    return _fuse({k: v for k, v in sd.items()
                  if k == "mask_token" or k.startswith("lm_head.") or not IGNORABLE.search(k)})


def image_tower_state(timm_sd: dict, swiglu: Optional[bool] = None) -> dict:
    """A timm ``Eva`` state dict (bare or under ``visual.trunk.``) -> evaclip image-tower keys (relative to the tower).

    ``swiglu`` is read off the keys (``mlp.fc1_g``); the argument is accepted for callers that state it."""
    fmt = "open_clip" if any(k.startswith("visual.trunk.") for k in timm_sd) else "timm"
    return _visual_part(timm_sd, fmt)[0]


def load_checkpoint(path: Union[str, Path], model) -> LoadReport:
    """Load a whole-CLIP checkpoint in any supported format (evaclip file or run checkpoint folder, EVA-CLIP release,
    open_clip EVA02) into ``model``, strictly. For resuming training use ``evaclip.checkpoint.load_checkpoint``."""
    return load_pretrained(model, pretrained=path)
