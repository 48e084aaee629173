"""Export trained encoders: safetensors + config.json per tower, an open_clip-loadable checkpoint, ONNX.

Shapes: B batch, C channels, H/W image height/width, L context length, E embedding dim.

    evaclip export runs/demo_cpu --out export/ --format safetensors open_clip onnx   # a run: its newest checkpoint
    evaclip export RUN/ckpt/step_000100 --out export/ --format open_clip

Layout written under ``--out``::

    image/config.json  image/model.safetensors  image/model.onnx      (load_encoder(out, "image"))
    text/config.json   text/model.safetensors   text/model.onnx       (load_encoder(out, "text"))
    README.md          the lines that load the encoders (pooled and patch features)
    open_clip/open_clip_config.json  open_clip/open_clip_model.safetensors  open_clip/<NAME>.json  [timm_model.json]
    open_clip/README.md   the exact lines that load this export in open_clip and in clip_benchmark

open_clip builds the image tower with timm and passes timm no architecture arguments, so it only knows the released
EVA-CLIP shapes (EVA02-B-16, L-14, ...). An export of any other shape loads after ``register_open_clip(dir)`` (in
every process that loads it); the export's README.md, its log line and ``evaclip export --help`` say so.

``--format eva_mim`` (a MIM student) writes ``eva_mim.pt`` / ``eva_mim.safetensors`` in EVA-02's released layout,
``config.json`` (the timm ``Eva`` arguments of the tower) and ``README.md`` (the lines that load it in timm).
Every ``.safetensors`` is written readable by the group and others (0644).

Every export is checked before it is reported done: safetensors round trip bit-exact, open_clip embeddings and
ONNX (onnxruntime) outputs against the PyTorch model within tolerance. Export always builds the model with a portable
attention path (SDPA), so checkpoints trained with flash_attn export on any machine.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from evaclip.encoder import CLIP_BPE, ENCODER_FORMAT, ENCODER_FORMAT_VERSION, ImageEncoder, TextEncoder

FORMATS = ("safetensors", "open_clip", "onnx", "eva_mim")  # eva_mim: a MIM student (masked image modeling runs)
log = logging.getLogger(__name__)
EXPORT_ATTN_BACKEND = "sdpa"  # portable: runs on CPU and GPU, traces to ONNX; flash_attn does neither
ONNX_ATOL = 1e-4

class ExportError(RuntimeError):
    """An export did not reproduce the PyTorch model (the message gives the measured difference)."""


# ----------------------------------------------------------------------------------------------------------------------
# encoder configs
# ----------------------------------------------------------------------------------------------------------------------
def _cfg_dict(cfg) -> dict:
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)


def encoder_config(model_cfg, architecture: str, tower: str) -> dict:
    """``config.json`` of one exported tower: enough to rebuild, preprocess for and tokenize for it."""
    mc = _cfg_dict(model_cfg)
    v, t = mc["vision"], mc["text"]
    out = {"format": ENCODER_FORMAT, "format_version": ENCODER_FORMAT_VERSION, "tower": tower,
           "architecture": architecture, "embed_dim": mc["embed_dim"]}
    if tower == "image":
        mean, std = _mean_std(v)
        out.update(image_size=v["image_size"], patch_size=v["patch_size"], mean=mean, std=std,
                   interpolation="bicubic", resize_mode="shortest")
    else:
        out.update(context_length=t["context_length"], vocab_size=t["vocab_size"], tokenizer=CLIP_BPE)
    out["model_cfg"] = mc  # the whole architecture config: build_tower reads its own section
    return out


def model_config_of(model, architecture: str):
    """The architecture config the model was built with (its own, so create_model overrides are included)."""
    cfg = getattr(model, "cfg", None) or getattr(model, "config", None)
    if cfg is None:
        from evaclip.models import get_model_config

        cfg = get_model_config(architecture)
    return cfg


def _mean_std(v: dict) -> tuple[list, list]:
    from evaclip.data.transforms import MEAN, STD

    return list(v.get("mean") or MEAN), list(v.get("std") or STD)


def _is_lcl(model) -> bool:
    return callable(getattr(model, "image_tower", None))  # evaclip.models.lcl.LCL (export does not import it)


def _wrap(model, tower: str, cfg: dict):
    if _is_lcl(model):  # the pooled latent / the LM at <boi>: build_tower(kind="lcl") rebuilds them
        return ImageEncoder(model.image_tower(), cfg) if tower == "image" else TextEncoder(model.text_tower(), cfg)
    return ImageEncoder(model.visual, cfg) if tower == "image" else TextEncoder(model.text, cfg)


def _example_input(cfg: dict, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if cfg["tower"] == "image":
        s = cfg["image_size"]
        return torch.randn(batch, 3, s, s, generator=g)
    L, V = cfg["context_length"], cfg["vocab_size"]
    tokens_BL = torch.randint(1, V - 1, (batch, L), generator=g)
    tokens_BL[:, 0] = V - 2  # start-of-text as the tokenizer writes it
    tokens_BL[0, L // 2:] = 0  # one padded row, one full row: EOT pooling by argmax must handle both
    tokens_BL[0, L // 2 - 1] = V - 1
    tokens_BL[1, -1] = V - 1
    return tokens_BL


# ----------------------------------------------------------------------------------------------------------------------
# safetensors
# ----------------------------------------------------------------------------------------------------------------------
def save_safetensors(sd: dict, path: Path, metadata: Optional[dict] = None) -> None:
    """``safetensors.torch.save_file``, then mode 0644: safetensors >= 0.8 creates its files 0600, which hides an
    export from the group and others it is shared with."""
    from safetensors.torch import save_file

    save_file(sd, str(path), metadata=metadata)
    os.chmod(path, 0o644)


ENCODER_README = """# evaclip encoders ({architecture})

```python
import evaclip
import torch
image_encoder = evaclip.load_encoder("{out}", "image")  # pooled, L2-normalisable CLIP image embeddings (B x E)
text_encoder = evaclip.load_encoder("{out}", "text")
images = torch.randn(2, 3, {size}, {size})  # your images, preprocessed as image/config.json says
features = image_encoder(images)
patches = image_encoder.patch_features(images, layer=-2)  # Patch features: B x P x D, LLaVA-style penultimate block
```

`image/config.json` and `text/config.json` hold each tower's architecture, preprocessing and tokenizer. Patch
features (`ImageEncoder.patch_features(images, layer, norm, prefix)`): one token per image patch of any block, not
projected; the ONNX export writes them too (`--outputs pooled patches`).
"""


def export_safetensors(model, model_cfg, architecture: str, out_dir: Path) -> list[Path]:
    """Write ``image/`` and ``text/`` (model.safetensors + config.json) and ``README.md``; checks a bit-exact round
    trip."""
    from safetensors.torch import load_file

    written = []
    for tower in ("image", "text"):
        d = out_dir / tower
        d.mkdir(parents=True, exist_ok=True)
        cfg = encoder_config(model_cfg, architecture, tower)
        if _is_lcl(model):
            cfg["kind"] = "lcl"
        sd = {k: v.detach().contiguous().cpu() for k, v in _wrap(model, tower, cfg).tower.state_dict().items()}
        save_safetensors(sd, d / "model.safetensors", metadata={"format": "pt", "evaclip_tower": tower})
        (d / "config.json").write_text(json.dumps(cfg, indent=2))
        back = load_file(str(d / "model.safetensors"))
        bad = [k for k in sd if k not in back or not torch.equal(sd[k], back[k])]
        if bad or len(back) != len(sd):
            raise ExportError(f"{d / 'model.safetensors'} did not round-trip exactly: {bad[:8]}")
        written += [d / "model.safetensors", d / "config.json"]
    (out_dir / "README.md").write_text(ENCODER_README.format(architecture=architecture, out=out_dir.resolve(),
                                                             size=_cfg_dict(model_cfg)["vision"]["image_size"]))
    return written + [out_dir / "README.md"]


# ----------------------------------------------------------------------------------------------------------------------
# ONNX
# ----------------------------------------------------------------------------------------------------------------------
ONNX_OUTPUTS = ("pooled", "patches")  # graph outputs "features" (B x E) and "patches" (B x P x D), in that order


class _PooledAndPatches(torch.nn.Module):
    """An image encoder whose ONNX graph returns the chosen outputs: the pooled embedding (``features``, B x E) and/or
    the per-patch tokens of one block (``patches``, B x P x D; see ``EVAVisionTransformer.patch_tokens``)."""

    def __init__(self, enc: ImageEncoder, outputs: Sequence[str], layer: int, norm: bool):
        super().__init__()
        self.enc, self.outputs, self.layer, self.norm = enc, tuple(outputs), layer, norm

    def forward(self, images_BCHW: torch.Tensor):
        if self.outputs == ("pooled",):
            return self.enc(images_BCHW)
        if self.outputs == ("patches",):
            return self.enc.patch_features(images_BCHW, self.layer, self.norm)
        tower = self.enc.tower
        final_BND, (patches_BPD,) = tower.forward_intermediates(images_BCHW, [self.layer], norm=self.norm)
        return tower.head(final_BND[:, 0]), patches_BPD


def export_onnx(model, model_cfg, architecture: str, out_dir: Path, opset: Optional[int] = None,
                check: bool = True, outputs: Sequence[str] = ("pooled",), patch_layer: int = -1,
                patch_norm: bool = False) -> list[Path]:
    """Write ``image/model.onnx`` and ``text/model.onnx`` (dynamic batch) and check them with onnxruntime.

    ``outputs`` (image encoder): ``pooled`` (graph output ``features``, B x E) and/or ``patches`` (``patches``, B x P
    x D: block ``patch_layer``'s patch tokens, CLS dropped, through the final norm with ``patch_norm``); the text
    encoder always gives ``features``. The image ``config.json`` records the graph's outputs and the patch settings."""
    bad = [o for o in outputs if o not in ONNX_OUTPUTS]
    if bad or not outputs:
        raise ValueError(f"unknown ONNX output(s) {bad}: choose from {list(ONNX_OUTPUTS)}")
    outputs = [o for o in ONNX_OUTPUTS if o in outputs]
    written = []
    for tower in ("image", "text"):
        d = out_dir / tower
        d.mkdir(parents=True, exist_ok=True)
        cfg = encoder_config(model_cfg, architecture, tower)
        enc = _wrap(model, tower, cfg).float().eval()
        names = ["features"]
        if tower == "image":
            if "patches" in outputs:
                model.visual._layer_index(patch_layer)  # a bad layer fails here, with the tower's depth
            names = [{"pooled": "features", "patches": "patches"}[o] for o in outputs]
            cfg["onnx_outputs"] = names
            if "patches" in outputs:
                cfg["onnx_patches"] = {"layer": patch_layer, "norm": patch_norm, "prefix": False}
            enc = _PooledAndPatches(enc, outputs, patch_layer, patch_norm).eval()
        x = _example_input(cfg)
        name = "images" if tower == "image" else "tokens"
        path = d / "model.onnx"
        big = sum(p.numel() * 4 for p in enc.parameters()) > 1.8e9  # protobuf's 2 GB limit: weights beside it
        with torch.no_grad():
            torch.onnx.export(enc, (x,), str(path), dynamo=True, verbose=False, input_names=[name],
                              output_names=names, dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                              opset_version=opset, external_data=big)
        (d / "config.json").write_text(json.dumps(cfg, indent=2))
        written += [path, d / "config.json"]
        if check:
            check_onnx(enc, path, x)
    return written


def check_onnx(module: torch.nn.Module, path: Path, x: torch.Tensor, atol: float = ONNX_ATOL) -> float:
    """Run ``path`` with onnxruntime on ``x`` (and on a batch of 1 to exercise the dynamic axis); returns the max
    abs difference from ``module(x)`` over every output, raising ExportError above ``atol``."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0].name
    worst = 0.0
    for xb in (x, x[:1]):
        with torch.no_grad():
            refs = module(xb)
        refs = refs if isinstance(refs, tuple) else (refs,)
        for ref, got in zip(refs, sess.run(None, {inp: xb.numpy()})):
            ref = ref.float().numpy()
            if got.shape != ref.shape:
                raise ExportError(f"{path}: onnxruntime output shape {got.shape} != PyTorch {ref.shape}")
            worst = max(worst, float(abs(got - ref).max()))
    if worst > atol:
        raise ExportError(f"{path}: onnxruntime differs from PyTorch by {worst:.2e} (> {atol:.0e})")
    return worst


# ----------------------------------------------------------------------------------------------------------------------
# open_clip
# ----------------------------------------------------------------------------------------------------------------------
def open_clip_model_config(model_cfg, timm_model_name: str) -> dict:
    """open_clip's model config (``embed_dim``, ``vision_cfg`` via timm's Eva, ``text_cfg``) for this architecture."""
    mc = _cfg_dict(model_cfg)
    v, t = mc["vision"], mc["text"]
    vision = {"image_size": v["image_size"], "timm_model_name": timm_model_name, "timm_model_pretrained": False,
              "timm_pool": "token", "timm_proj": None}
    if v.get("timm_model"):  # open_clip's ViTamin configs: the trunk's own avg pool + fc_norm, a bias-free projection
        vision.update(timm_pool="", timm_proj="linear", timm_drop=0.0, timm_drop_path=v["drop_path"])
    return {
        "embed_dim": mc["embed_dim"],
        "vision_cfg": vision,
        "text_cfg": {"context_length": t["context_length"], "vocab_size": t["vocab_size"], "width": t["width"],
                     "heads": t["heads"], "layers": t["layers"]},
        "custom_text": True,
    }


def register_open_clip(export_dir) -> str:
    """Make a non-standard-size open_clip export loadable: registers its timm Eva architecture (``timm_model.json``)
    with timm and its model config with open_clip; returns the open_clip model name.

        name = evaclip.export.register_open_clip("export/open_clip")
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained="export/open_clip/...")

    Standard EVA-CLIP sizes need none of this (open_clip ships their configs). Only timm and open_clip are used, so a
    copy of this function works without evaclip installed.
    """
    import open_clip
    import timm
    from timm.models import register_model

    d = Path(export_dir)
    info = json.loads((d / "open_clip_config.json").read_text())
    name = info["evaclip"]["open_clip_name"]
    tm = d / "timm_model.json"
    if tm.is_file():
        spec = json.loads(tm.read_text())
        if spec["name"] not in timm.list_models(spec["name"]):
            from timm.models.eva import Eva

            def _build(pretrained: bool = False, **kwargs):
                if pretrained:
                    raise ValueError(f"{spec['name']} has no timm pretrained weights; load the evaclip export")
                for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm's factory bookkeeping
                    kwargs.pop(k, None)
                if "base" in spec:  # a timm family at other sizes (ViTamin): its builder with every shape given
                    from timm.models.vitamin import VitCfg, VitConvCfg

                    args = _json_to_timm(spec["kwargs"])
                    conv = dict(args.pop("embed_cfg"))
                    args["embed_cfg"] = VitCfg(**_json_to_timm(conv), conv_cfg=VitConvCfg(
                        norm_layer="layernorm2d", norm_eps=1e-6), head_type="1d")
                    return timm.create_model(spec["base"], pretrained=False, **{**args, **kwargs})
                return Eva(**{**_json_to_timm(spec["kwargs"]), **kwargs})

            _build.__name__ = spec["name"]
            register_model(_build)
    open_clip.add_model_config(d / f"{name}.json")
    return name


def _json_to_timm(kwargs: dict) -> dict:
    # JSON has no tuples; timm wants (h, w) for these
    return {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}


def timm_eva_spec(model_cfg) -> tuple[str, Optional[dict]]:
    """The timm ``Eva`` open_clip should build as the image tower: ``(timm name, None)`` when open_clip ships a config
    of this exact architecture (``CLIPCfg.open_clip_name``), else ``(generated name, Eva kwargs)``."""
    import open_clip

    mc = _cfg_dict(model_cfg)
    v = mc["vision"]
    builtin = open_clip.get_model_config(mc["open_clip_name"]) if mc.get("open_clip_name") else None
    if builtin is not None and _standard_matches(builtin, mc):
        return builtin["vision_cfg"]["timm_model_name"], None
    if v.get("timm_model"):
        return _timm_family_spec(mc)
    kwargs = dict(img_size=v["image_size"], patch_size=v["patch_size"], embed_dim=v["width"], depth=v["depth"],
                  num_heads=v["heads"], mlp_ratio=v["mlp_ratio"], qkv_fused=not v["subln"], qkv_bias=v["qkv_bias"],
                  swiglu_mlp=v["swiglu"], scale_mlp=v["subln"], scale_attn_inner=v["subln"],
                  use_rot_pos_emb=v["rope"], use_post_norm=v["postnorm"], init_values=v["layer_scale"],
                  global_pool="token")
    if v["rope"]:
        pt = v.get("pt_hw_seq_len", v.get("pt_grid"))  # the MIM pretraining grid RoPE positions are scaled to
        kwargs["ref_feat_shape"] = [pt, pt]
    if abs(v["ln_eps"] - 1e-6) > 1e-12:
        raise ExportError(f"open_clip export: timm's Eva uses LayerNorm eps 1e-6, this image tower {v['ln_eps']}")
    safe = "".join(c if c.isalnum() else "_" for c in mc.get("name", "custom").lower())
    # the hash tells apart exports of one registry name built with different overrides (timm names are global)
    digest = hashlib.sha1(json.dumps(kwargs, sort_keys=True).encode()).hexdigest()[:8]
    return f"evaclip_{safe}_{digest}", kwargs


def _timm_family_spec(mc: dict) -> tuple[str, dict]:
    """``(generated name, {"base", "kwargs"})`` for a timm-built image tower (ViTamin) at a size timm does not
    register: ``register_open_clip`` rebuilds it with timm's own builder and every shape passed."""
    from evaclip.models.registry import VisionCfg
    from evaclip.models.timm_vision import timm_trunk_kwargs

    kwargs = timm_trunk_kwargs(VisionCfg(**mc["vision"]))
    for k in ("num_classes", "drop_path_rate"):  # open_clip passes its own (0 classes, timm_drop_path)
        kwargs.pop(k)
    e = kwargs.pop("embed_cfg")
    kwargs["embed_cfg"] = {"embed_dim": list(e.embed_dim), "depths": list(e.depths), "stem_width": e.stem_width}
    safe = "".join(c if c.isalnum() else "_" for c in mc.get("name", "custom").lower())
    digest = hashlib.sha1(json.dumps(kwargs, sort_keys=True).encode()).hexdigest()[:8]
    return f"evaclip_{safe}_{digest}", {"base": mc["vision"]["timm_model"], "kwargs": kwargs}


def _standard_matches(builtin: dict, mc: dict) -> bool:
    """open_clip's built-in config describes exactly this architecture (image tower checked on the meta device)."""
    import timm

    t, v = mc["text"], mc["vision"]
    text_same = builtin["text_cfg"] == {"context_length": t["context_length"], "vocab_size": t["vocab_size"],
                                        "width": t["width"], "heads": t["heads"], "layers": t["layers"]}
    if not (text_same and builtin["embed_dim"] == mc["embed_dim"]
            and builtin["vision_cfg"]["image_size"] == v["image_size"]):
        return False
    timm_name = builtin["vision_cfg"]["timm_model_name"]
    with torch.device("meta"):  # shapes only: no memory even for bigE
        ref = timm.create_model(timm_name, pretrained=False, num_classes=0)
        if v.get("timm_model"):  # a timm-built tower: the same timm model with every parameter shape equal
            from evaclip.models.registry import VisionCfg
            from evaclip.models.timm_vision import timm_trunk_kwargs

            if v["timm_model"] != timm_name:
                return False
            ours = timm.create_model(timm_name, pretrained=False, **timm_trunk_kwargs(VisionCfg(**v)))
            shapes = lambda m: {k: tuple(p.shape) for k, p in m.state_dict().items()}  # noqa: E731
            return shapes(ours) == shapes(ref)
    if builtin["vision_cfg"].get("timm_proj"):  # open_clip's ViTamin: an EVA tower is not that
        return False
    return ref.embed_dim == v["width"] and len(ref.blocks) == v["depth"]


def export_open_clip(model, model_cfg, architecture: str, out_dir: Path, check: bool = True) -> list[Path]:
    """Write an open_clip checkpoint (open_clip's EVA02 layout: timm Eva image tower + open_clip text tower).

    Standard sizes load with ``open_clip.create_model_and_transforms('EVA02-B-16', pretrained=PATH)`` or
    ``'local-dir:' + out_dir/open_clip``; other sizes the same way after ``register_open_clip(out_dir/open_clip)``
    (which registers the timm architecture and returns the open_clip name).
    """

    from evaclip.models.convert import to_open_clip_state_dict

    d = out_dir / "open_clip"
    d.mkdir(parents=True, exist_ok=True)
    timm_name, timm_kwargs = timm_eva_spec({**_cfg_dict(model_cfg), "name": architecture})
    oc_cfg = open_clip_model_config(model_cfg, timm_name)
    written = []
    if timm_kwargs is None:
        name = _cfg_dict(model_cfg)["open_clip_name"]
    else:
        name = f"evaclip-{architecture}-{timm_name.rsplit('_', 1)[-1]}"
        spec = timm_kwargs if "base" in timm_kwargs else {"kwargs": timm_kwargs}  # base: a timm family's builder
        (d / "timm_model.json").write_text(json.dumps({"name": timm_name, **spec}, indent=2))
        written.append(d / "timm_model.json")
    v = _cfg_dict(model_cfg)["vision"]
    mean, std = _mean_std(v)
    preprocess = {"size": v["image_size"], "mean": mean, "std": std, "interpolation": "bicubic",
                  "resize_mode": "shortest"}
    (d / f"{name}.json").write_text(json.dumps(oc_cfg, indent=2))
    (d / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": oc_cfg, "preprocess_cfg": preprocess,
         "evaclip": {"architecture": architecture, "open_clip_name": name}}, indent=2))
    sd = {k: v.detach().contiguous().cpu() for k, v in to_open_clip_state_dict(model).items()}
    save_safetensors(sd, d / "open_clip_model.safetensors")
    (d / "README.md").write_text(open_clip_readme(d, name, architecture, custom=timm_kwargs is not None))
    written += [d / "open_clip_model.safetensors", d / f"{name}.json", d / "open_clip_config.json", d / "README.md"]
    if check:
        check_open_clip(model, d)
    log.info("%s", open_clip_howto(d))
    return written


def is_custom_open_clip(export_dir) -> bool:
    """True when an open_clip export is of a shape open_clip does not ship (it then needs ``register_open_clip``)."""
    return (Path(export_dir) / "timm_model.json").is_file()


def open_clip_howto(export_dir) -> str:
    """One line: how to load an open_clip export (printed by ``evaclip export`` and logged)."""
    d = Path(export_dir).resolve()
    load = f"open_clip.create_model_and_transforms('local-dir:{d}')"
    if is_custom_open_clip(d):
        return (f"open_clip export {d}: not a shape open_clip ships, so call evaclip.export.register_open_clip('{d}') "
                f"first, then {load}; clip_benchmark lines in {d / 'README.md'}")
    return f"open_clip export {d}: load with {load} (no extra step); clip_benchmark lines in {d / 'README.md'}"


_CB_PLACEHOLDERS = ("DATASET, DATA_DIR: a clip_benchmark dataset, e.g. `wds/NAME` and its folder; TASK: "
                    "zeroshot_classification or zeroshot_retrieval")


def open_clip_readme(export_dir, name: str, architecture: str, custom: bool) -> str:
    """README.md of an open_clip export: the exact lines that load it in open_clip and run clip_benchmark on it."""
    d = Path(export_dir).resolve()
    weights = d / "open_clip_model.safetensors"
    lines = [f"# open_clip export of {architecture} (evaclip)", ""]
    if custom:
        spec = json.loads((d / "timm_model.json").read_text())
        timm_name, family = spec["name"], f"`{spec['base']}` at other sizes" if "base" in spec else "`Eva`"
        lines += [
            f"This is not a shape open_clip ships: its image tower is a timm {family} described in "
            "`timm_model.json`, and "
            "open_clip passes timm no architecture arguments. Register it first, in every process that loads it "
            f"(without this, loading fails with `Unknown model ({timm_name})`):",
            "", "## open_clip", "", "```python", "import open_clip", "import evaclip.export", "",
            f"evaclip.export.register_open_clip(\"{d}\")  # returns the model name, \"{name}\"",
            f"model, _, preprocess = open_clip.create_model_and_transforms(\"local-dir:{d}\")",
            f"tokenizer = open_clip.get_tokenizer(\"local-dir:{d}\")", "```", "",
            "By name instead: `open_clip.create_model_and_transforms(\"" + name + "\", pretrained=\"" + str(weights)
            + "\")` after the same `register_open_clip` call. Without evaclip installed, copy `register_open_clip` "
            "from evaclip/export.py: it uses only timm and open_clip.", "",
            "## clip_benchmark", "",
            "clip_benchmark's command line cannot register an architecture, so start it from Python with the "
            f"registration first ({_CB_PLACEHOLDERS}):", "",
            "```bash",
            f"python -c \"import sys, evaclip.export; evaclip.export.register_open_clip('{d}'); "
            "from clip_benchmark.cli import main; sys.exit(main())\" \\",
            f"    eval --model_type open_clip --model {name} --pretrained {weights} \\",
            "    --dataset DATASET --dataset_root DATA_DIR --task TASK --output results.json", "```",
        ]
    else:
        lines += [
            f"open_clip ships this architecture ({name}): it loads with no extra step.", "",
            "## open_clip", "", "```python", "import open_clip", "",
            f"model, _, preprocess = open_clip.create_model_and_transforms(\"local-dir:{d}\")",
            f"tokenizer = open_clip.get_tokenizer(\"local-dir:{d}\")", "```", "",
            f"By name instead: `open_clip.create_model_and_transforms(\"{name}\", pretrained=\"{weights}\")`.", "",
            "## clip_benchmark", "",
            f"({_CB_PLACEHOLDERS})", "",
            "```bash",
            f"clip_benchmark eval --model_type open_clip --model {name} --pretrained {weights} \\",
            "    --dataset DATASET --dataset_root DATA_DIR --task TASK --output results.json", "```",
        ]
    lines += ["", "clip_benchmark reads webdataset sets with 4 workers by default and fails (`No samples found`) on a "
              "set with fewer shards than workers, such as the demo's one-shard splits: add `--num_workers 1` there."]
    lines += ["", "clip_benchmark 1.6.2's zeroshot_classification fails under recent NumPy 2 releases (seen with 2.4: "
              "`only 0-dimensional arrays can be converted to Python scalars`, in its accuracy()); zeroshot_retrieval "
              "is unaffected."]
    lines += ["", "`evaclip eval` on the training checkpoint gives the same zero-shot figures and, with "
              "clip_benchmark's protocol, the same retrieval recalls (its `text_retrieval_recall@k` is evaclip's "
              "`i2t_R@k`, `image_retrieval_recall@k` is `t2i_R@k`); both are tested against clip_benchmark. "
              "clip_benchmark runs in autocast by default, bf16 on a CPU too, where `evaclip eval` computes in fp32: "
              "pass `--no_amp` to compare the figures.", ""]
    return "\n".join(lines)


def check_open_clip(model, export_dir: Path, atol: float = 1e-4) -> float:
    """Load the export with open_clip (strictly) and compare image and text embeddings with ``model``."""
    import open_clip

    name = register_open_clip(export_dir)
    oc_model = open_clip.create_model(name, pretrained=str(export_dir / "open_clip_model.safetensors"),
                                      load_weights=True, require_pretrained=True).eval()
    info = json.loads((export_dir / "open_clip_config.json").read_text())["model_cfg"]
    s = info["vision_cfg"]["image_size"]
    g = torch.Generator().manual_seed(0)
    images_BCHW = torch.randn(2, 3, s, s, generator=g)
    tokens_BL = open_clip.get_tokenizer(name)(["a photo of a cat", "two dogs playing in the snow"])
    model = model.float().eval()
    with torch.no_grad():
        diffs = [(model.encode_image(images_BCHW) - oc_model.encode_image(images_BCHW)).abs().max(),
                 (model.encode_text(tokens_BL) - oc_model.encode_text(tokens_BL)).abs().max()]
    worst = float(max(diffs))
    if worst > atol:
        raise ExportError(f"open_clip export {export_dir} differs from the evaclip model by {worst:.2e} (> {atol:.0e})")
    return worst


# ----------------------------------------------------------------------------------------------------------------------
# EVA-02 MIM layout
# ----------------------------------------------------------------------------------------------------------------------
def export_eva_mim(student, out_path: Path) -> list[Path]:
    """Write a MIM student (``evaclip.models.mim.MIMStudent``) in EVA-02's released MIM layout
    (``cls_token``, ``mask_token``, ``pos_embed``, ``patch_embed.proj.*``, ``blocks.i.*``, ``norm.*``, ``lm_head.*``,
    and in RoPE towers EVA-02's ``rope.freqs_cos`` / ``freqs_sin`` buffers, also under each ``blocks.i.attn.rope.``):
    a ``.safetensors`` path gets a flat safetensors file, any other a torch file ``{"module": state_dict}`` as the
    release ships it. EVA's code, timm (``timm.models.eva.checkpoint_filter_fn``) and ``model.image_init`` load both.
    Checks a bit-exact round trip."""
    from safetensors.torch import load_file

    from evaclip.models.convert import to_eva_mim_state_dict

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in to_eva_mim_state_dict(student).items()}
    if out_path.suffix == ".safetensors":
        save_safetensors(sd, out_path, metadata={"format": "pt", "evaclip_layout": "eva_mim"})
        back = load_file(str(out_path))
    else:
        torch.save({"module": sd}, out_path)
        back = torch.load(out_path, map_location="cpu", weights_only=True)["module"]
    if back.keys() != sd.keys() or any(not torch.equal(sd[k], back[k]) for k in sd):
        raise ExportError(f"{out_path} did not round-trip exactly")
    return [out_path]


def timm_eva_mim_kwargs(student) -> dict:
    """The ``timm.models.eva.Eva`` arguments of a MIM student's tower (its features, no classifier head): what
    ``config.json`` of an ``eva_mim`` export holds (lists where timm wants tuples)."""
    v = student.cfg
    if abs(v.ln_eps - 1e-6) > 1e-12:
        raise ExportError(f"eva_mim export: timm's Eva uses LayerNorm eps 1e-6, this tower {v.ln_eps}")
    kw = dict(img_size=v.image_size, patch_size=v.patch_size, embed_dim=v.width, depth=v.depth, num_heads=v.heads,
              mlp_ratio=v.mlp_ratio, qkv_fused=not v.subln, qkv_bias=v.qkv_bias, swiglu_mlp=v.swiglu,
              scale_mlp=v.subln, use_rot_pos_emb=v.rope, init_values=v.layer_scale, num_classes=0, global_pool="avg")
    if v.rope:
        kw["ref_feat_shape"] = [v.pt_hw_seq_len, v.pt_hw_seq_len]
    return kw


EVA_MIM_README = """# EVA MIM student ({architecture}) in EVA-02's released layout

`eva_mim.safetensors` (flat) and `eva_mim.pt` (`{{"module": state_dict}}`, as EVA's releases) hold the same weights:
`cls_token`, `pos_embed`, `patch_embed.*`, `blocks.*`, `norm.*`, and the MIM parts `mask_token`, `lm_head.*`
({T}-dim teacher targets), `rope.*` buffers. `config.json` holds the timm `Eva` arguments. In timm:

```python
import json
import torch
from safetensors.torch import load_file
from timm.models.eva import Eva, checkpoint_filter_fn

cfg = json.load(open("{out}/config.json"))
model = Eva(**{{k: tuple(v) if isinstance(v, list) else v for k, v in cfg["timm_eva"].items()}}).eval()
model.load_state_dict(checkpoint_filter_fn(load_file("{out}/eva_mim.safetensors"), model))
images = torch.randn(2, 3, {size}, {size})  # your images: {size} px, normalised with cfg["mean"] / cfg["std"]
with torch.no_grad():
    tokens = model.fc_norm(model.forward_features(images))  # B x (1 + {P}) x {D}: CLS + patch tokens, final norm
```

timm moves the MIM final norm to `fc_norm` (its fine-tuning head) and drops `mask_token` / `lm_head`. To start a CLIP
image tower from it in evaclip: `model.image_init={out}/eva_mim.safetensors`.
"""


def write_eva_mim_card(student, architecture: str, out_dir: Path) -> list[Path]:
    """``config.json`` (timm ``Eva`` arguments, preprocessing) and ``README.md`` (the lines that load the export in
    timm) beside an ``eva_mim`` export."""
    from evaclip.data.transforms import MEAN, STD

    v = student.cfg
    cfg = {"format": "eva_mim", "architecture": architecture, "timm_eva": timm_eva_mim_kwargs(student),
           "teacher_dim": student.lm_head.out_features, "image_size": v.image_size, "mean": list(MEAN),
           "std": list(STD)}
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    P = (v.image_size // v.patch_size) ** 2
    (out_dir / "README.md").write_text(EVA_MIM_README.format(
        architecture=architecture, out=out_dir.resolve(), T=cfg["teacher_dim"], size=v.image_size, P=P, D=v.width))
    return [out_dir / "config.json", out_dir / "README.md"]


# ----------------------------------------------------------------------------------------------------------------------
# entry points
# ----------------------------------------------------------------------------------------------------------------------
def export(checkpoint: str, out_dir: str, fmt: Sequence[str] | str = "safetensors", *, model_name: Optional[str] = None,
           check: bool = True, opset: Optional[int] = None, onnx_outputs: Sequence[str] = ("pooled",),
           patch_layer: int = -1, patch_norm: bool = False, ema: bool = False) -> list[Path]:
    """Export a checkpoint (training folder or state-dict file) in one or more formats; returns the files written.
    ``onnx_outputs`` / ``patch_layer`` / ``patch_norm``: the ONNX image encoder's outputs (see ``export_onnx``);
    ``ema``: the checkpoint's weight-EMA averages instead of its raw weights."""
    from evaclip.runs import load_model

    fmts = [fmt] if isinstance(fmt, str) else list(fmt)
    bad = [f for f in fmts if f not in FORMATS]
    if bad or not fmts:
        raise ValueError(f"unknown export format(s) {bad}: choose from {list(FORMATS)}")
    if "eva_mim" in fmts:
        if ema:
            raise ValueError("--ema exports a CLIP run's weight EMA; --format eva_mim (a MIM student) has no --ema")
        if len(fmts) > 1:
            raise ValueError("--format eva_mim exports a MIM student (a masked-image-modeling run) and goes alone: "
                             "the other formats are for CLIP checkpoints")
        from evaclip.runs import load_student

        student = load_student(checkpoint, model_name, attn_backend=EXPORT_ATTN_BACKEND)
        out = Path(out_dir)
        written = [p for ext in (".pt", ".safetensors") for p in export_eva_mim(student, out / f"eva_mim{ext}")]
        return written + write_eva_mim_card(student, model_name or str(checkpoint), out)
    model, name = load_model(checkpoint, model_name, "cpu", attn_backend=EXPORT_ATTN_BACKEND, ema=ema)
    model = model.float().eval()
    if _is_lcl(model) and fmts != ["safetensors"]:
        raise ValueError("an LCL run exports as --format safetensors (evaclip.load_encoder: image/ holds the image "
                         "tower + pooler, text/ the LM read at <boi>); open_clip / onnx are for CLIP checkpoints")
    model_cfg = model_config_of(model, name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if "safetensors" in fmts:
        written += export_safetensors(model, model_cfg, name, out)
    if "open_clip" in fmts:
        written += export_open_clip(model, model_cfg, name, out, check=check)
    if "onnx" in fmts:
        written += export_onnx(model, model_cfg, name, out, opset=opset, check=check, outputs=onnx_outputs,
                               patch_layer=patch_layer, patch_norm=patch_norm)
    return written


def main(argv: Optional[list] = None) -> int:
    """``evaclip export RUN_OR_CKPT --out DIR --format safetensors|open_clip|onnx [...]``."""
    from evaclip.checkpoint import resolve_checkpoint
    from evaclip.evals import CHECKPOINT_HELP, USER_ERRORS, one_line

    p = argparse.ArgumentParser(
        prog="evaclip export", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Export the image and text encoders of a run or checkpoint: safetensors + config.json per tower\n"
        "(evaclip.load_encoder), an open_clip checkpoint, ONNX. Every export is checked against the PyTorch model.",
        epilog="open_clip exports: released EVA-CLIP shapes (EVA02-B-16, L-14, ...) load in open_clip with no extra "
        "step:\n  open_clip.create_model_and_transforms('local-dir:OUT/open_clip')\nany other shape (e.g. the demo's "
        "tiny model) needs, first, in every process that loads it:\n"
        "  evaclip.export.register_open_clip('OUT/open_clip')\n(open_clip passes timm no architecture arguments). "
        "OUT/open_clip/README.md holds the exact open_clip and\nclip_benchmark lines for the export.\n\n"
        "example: evaclip export runs/demo_cpu --out export/ --format safetensors open_clip onnx\n"
        "patch tokens for a multimodal model (LLaVA-style: penultimate block, no norm, no CLS) in the ONNX graph:\n"
        "  evaclip export runs/demo_cpu --out export/ --format safetensors onnx --outputs pooled patches "
        "--patch-layer -2")
    p.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT", help=CHECKPOINT_HELP)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--format", nargs="+", default=["safetensors"], choices=FORMATS, dest="formats",
                   help="one or more of %(choices)s (default: safetensors; eva_mim, a masked-image-modeling "
                   "student, goes alone)")
    p.add_argument("--model", default=None, help="architecture name (needed for a bare state-dict file)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--outputs", nargs="+", default=["pooled"], choices=ONNX_OUTPUTS,
                   help="the ONNX image encoder's outputs: pooled (graph output 'features', B x E) and/or patches "
                   "('patches', B x P x D, the patch tokens of --patch-layer; default: pooled)")
    p.add_argument("--patch-layer", type=int, default=-1, help="block whose patch tokens 'patches' gives, negative "
                   "from the end (default -1, the last; -2 is LLaVA's penultimate)")
    p.add_argument("--patch-norm", action="store_true", help="pass 'patches' through the final norm (default: the "
                   "block's raw output, as LLaVA / BLIP-2 read it)")
    p.add_argument("--no-check", action="store_true", help="skip comparing each export with the PyTorch model")
    p.add_argument("--ema", action="store_true", help="export the weight-EMA averages of a run trained with "
                   "ema.decay > 0 instead of its raw weights")
    args = p.parse_args(argv)
    try:
        used = resolve_checkpoint(args.checkpoint)
        if str(used) != str(args.checkpoint):
            print(f"checkpoint: {used} (newest complete checkpoint of run folder {args.checkpoint})")
        files = export(str(used), args.out, args.formats, model_name=args.model, check=not args.no_check,
                       opset=args.opset, onnx_outputs=args.outputs, patch_layer=args.patch_layer,
                       patch_norm=args.patch_norm, ema=args.ema)
    except USER_ERRORS as e:
        print(f"evaclip export: error: {one_line(e)}", file=sys.stderr)
        return 2
    except ExportError as e:
        print(f"evaclip export: the export failed its check: {e}", file=sys.stderr)
        return 1
    for f in files:
        print(f)
    if "open_clip" in args.formats:
        print(open_clip_howto(Path(args.out) / "open_clip"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
