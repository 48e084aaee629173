"""Named CLIP architectures: the released EVA-CLIP and ViTamin shapes and tiny variants for tests, the CPU demo and
benchmarks.

Shapes follow EVA-CLIP's model configs (baaivision/EVA, EVA-CLIP/rei/eva_clip/model_configs) and open_clip's ViTamin
configs (``open_clip/model_configs/ViTamin-*.json``, image tower = timm's ``vitamin_*``).
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class VisionCfg:
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4 * 2 / 3
    swiglu: bool = True  # EVA-02: SwiGLU MLP (w1, w2 -> ffn_ln -> w3); EVA-01: GELU MLP (fc1, fc2)
    subln: bool = True  # EVA-02: sub-LN inside attention (inner_attn_ln) and MLP (ffn_ln)
    rope: bool = True  # EVA-02: 2D RoPE on q/k of every block
    pt_hw_seq_len: int = 16  # patch grid of the MIM pretraining (EVA's name); RoPE positions are rescaled to it
    qkv_bias: bool = True  # q and v biases (k has none)
    postnorm: bool = False  # EVA-01 / bigE: LayerNorm after the residual branch instead of before
    layer_scale: Optional[float] = None  # LayerScale init value (None: off)
    drop_path: float = 0.0
    ln_eps: float = 1e-6
    # A tower built by timm (models/timm_vision.py): the timm architecture whose blocks it uses (ViTamin:
    # ``vitamin_small_224``...). width / depth / heads / mlp_ratio / drop_path / image_size then describe its
    # transformer part, patch_size is the conv stages' total stride (16) and the EVA-only fields above are unused.
    timm_model: Optional[str] = None
    stem_width: int = 64  # ViTamin: channels of the conv stem
    conv_widths: tuple[int, ...] = (64, 128)  # ViTamin: channels of the two MBConv-LN stages
    conv_depths: tuple[int, ...] = (2, 4)  # ViTamin: MBConv-LN blocks per stage

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def mlp_hidden(self) -> int:
        return int(self.width * self.mlp_ratio)


@dataclass
class TextCfg:
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0
    ln_eps: float = 1e-5

    @property
    def depth(self) -> int:
        """Alias of ``layers`` (open_clip's name), so both towers answer ``.depth``."""
        return self.layers

    @depth.setter
    def depth(self, value: int) -> None:
        self.layers = value


@dataclass
class CLIPCfg:
    embed_dim: int = 512
    vision: VisionCfg = field(default_factory=VisionCfg)
    text: TextCfg = field(default_factory=TextCfg)
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: Optional[float] = None  # set (e.g. -10) for SigLIP training
    open_clip_name: Optional[str] = None  # open_clip's config with the same shapes, where one exists


def _eva02(image_size, patch, width, depth, mlp_ratio=4 * 2 / 3, head_width=64, **kw) -> VisionCfg:
    return VisionCfg(image_size=image_size, patch_size=patch, width=width, depth=depth, heads=width // head_width,
                     mlp_ratio=mlp_ratio, **kw)


def _eva01(image_size, patch, width, depth, mlp_ratio, head_width, **kw) -> VisionCfg:
    return VisionCfg(image_size=image_size, patch_size=patch, width=width, depth=depth, heads=width // head_width,
                     mlp_ratio=mlp_ratio, swiglu=False, subln=False, rope=False, **kw)


def _vitamin(timm_model, image_size, width, depth, heads, stem, convs, conv_depths=(2, 4), drop_path=0.1):
    """A ViTamin image tower (timm's ``vitamin_*``): conv stem, two MBConv-LN stages, a strided conv to ``width`` at
    stride 16, then ``depth`` TFB-GeGLU blocks (GeGLU hidden = 2 x width); open_clip's drop path 0.1."""
    return VisionCfg(image_size=image_size, patch_size=16, width=width, depth=depth, heads=heads, mlp_ratio=2.0,
                     swiglu=False, subln=False, rope=False, drop_path=drop_path, timm_model=timm_model,
                     stem_width=stem, conv_widths=tuple(convs), conv_depths=tuple(conv_depths))


_VITAMIN_S = dict(timm_model="vitamin_small_224", width=384, depth=14, heads=6, stem=64, convs=(64, 128))
_VITAMIN_B = dict(timm_model="vitamin_base_224", width=768, depth=14, heads=12, stem=128, convs=(128, 256))
_VITAMIN_L = dict(timm_model="vitamin_large_224", width=1024, depth=31, heads=16, stem=160, convs=(160, 320))

_MODELS: dict[str, CLIPCfg] = {
    # --- released EVA-CLIP architectures -------------------------------------------------------------------------
    "EVA02-CLIP-B-16": CLIPCfg(512, _eva02(224, 16, 768, 12), TextCfg(width=512, heads=8, layers=12),
                               open_clip_name="EVA02-B-16"),
    "EVA02-CLIP-L-14": CLIPCfg(768, _eva02(224, 14, 1024, 24), TextCfg(width=768, heads=12, layers=12),
                               open_clip_name="EVA02-L-14"),
    "EVA02-CLIP-L-14-336": CLIPCfg(768, _eva02(336, 14, 1024, 24), TextCfg(width=768, heads=12, layers=12),
                                   open_clip_name="EVA02-L-14-336"),
    # bigE's image tower is EVA-01-style (GELU, no RoPE, post-norm), initialised from EVA02_CLIP_E
    "EVA02-CLIP-bigE-14": CLIPCfg(1024, _eva01(224, 14, 1792, 64, 8.571428571428571, 112, postnorm=True),
                                  TextCfg(width=1024, heads=16, layers=24), open_clip_name="EVA02-E-14"),
    "EVA02-CLIP-bigE-14-plus": CLIPCfg(1024, _eva01(224, 14, 1792, 64, 8.571428571428571, 112, postnorm=True),
                                       TextCfg(width=1280, heads=20, layers=32), open_clip_name="EVA02-E-14-plus"),
    "EVA01-CLIP-g-14": CLIPCfg(1024, _eva01(224, 14, 1408, 40, 4.3637, 88, drop_path=0.4),
                               TextCfg(width=768, heads=12, layers=12), open_clip_name="EVA01-g-14"),
    "EVA01-CLIP-g-14-plus": CLIPCfg(1024, _eva01(224, 14, 1408, 40, 4.3637, 88, drop_path=0.4),
                                    TextCfg(width=1024, heads=16, layers=24), open_clip_name="EVA01-g-14-plus"),
    # --- ViTamin (CVPR 2024), open_clip's shapes: image tower from timm, open_clip text tower ------------------------
    "ViTamin-S": CLIPCfg(384, _vitamin(image_size=224, **_VITAMIN_S), TextCfg(width=384, heads=6, layers=12),
                         open_clip_name="ViTamin-S"),
    "ViTamin-S-LTT": CLIPCfg(768, _vitamin(image_size=224, **_VITAMIN_S), TextCfg(width=768, heads=12, layers=12),
                             open_clip_name="ViTamin-S-LTT"),
    "ViTamin-B": CLIPCfg(512, _vitamin(image_size=224, **_VITAMIN_B), TextCfg(width=512, heads=8, layers=12),
                         open_clip_name="ViTamin-B"),
    "ViTamin-B-LTT": CLIPCfg(768, _vitamin(image_size=224, **_VITAMIN_B), TextCfg(width=768, heads=12, layers=12),
                             open_clip_name="ViTamin-B-LTT"),
    "ViTamin-L": CLIPCfg(768, _vitamin(image_size=224, **_VITAMIN_L), TextCfg(width=768, heads=12, layers=12),
                         open_clip_name="ViTamin-L"),
    # --- small variants: tests, the CPU demo, CPU benchmarks -----------------------------------------------------
    "EVA02-CLIP-tiny": CLIPCfg(32, _eva02(32, 8, 64, 2, head_width=32, pt_hw_seq_len=4),
                               TextCfg(width=64, heads=2, layers=2)),
    "EVA01-CLIP-tiny": CLIPCfg(32, _eva01(32, 8, 64, 2, 4.0, 32, layer_scale=0.1),
                               TextCfg(width=64, heads=2, layers=2)),
    "EVA02-CLIP-demo": CLIPCfg(128, _eva02(32, 4, 128, 4, head_width=32, pt_hw_seq_len=8),
                               TextCfg(context_length=16, width=128, heads=4, layers=4)),
    # the demo's EVA-02 setting (docs/DEMO.md): a teacher whose image tower is wider and deeper than the student's
    # (EVA01-CLIP-g teaching EVA-02 B / L), with EVA02-CLIP-demo's text tower and embedding, so its text tower loads
    "EVA02-CLIP-demo-wide": CLIPCfg(128, _eva02(32, 4, 160, 6, head_width=32, pt_hw_seq_len=8),
                                    TextCfg(context_length=16, width=128, heads=4, layers=4)),
    # ViTamin at 32 px: stem + one MBConv-LN block per stage + 2 TFB blocks on the 2 x 2 stride-16 grid
    "ViTamin-tiny": CLIPCfg(32, _vitamin("vitamin_small_224", 32, 64, 2, 2, 32, (32, 48), (1, 1), drop_path=0.0),
                            TextCfg(width=64, heads=2, layers=2)),
    # the demo's ViTamin (docs/DEMO.md, LTT): EVA02-CLIP-demo's text tower, so stage 1's text tower loads; conv
    # stages sized so a training step costs what EVA02-CLIP-demo's does (286.6 vs 288.8 MFLOPs per sample, text
    # locked, no token drop: python -m evaclip.demo_ltt --flops)
    "ViTamin-demo": CLIPCfg(128, _vitamin("vitamin_small_224", 32, 128, 4, 4, 48, (48, 96), (2, 2), drop_path=0.0),
                            TextCfg(context_length=16, width=128, heads=4, layers=4)),
    # image-dominated 224 px model for the CPU benchmark (ViT-S/16 sized image tower, small text tower)
    "EVA02-CLIP-S-16": CLIPCfg(384, _eva02(224, 16, 384, 12, head_width=64),
                               TextCfg(context_length=32, width=256, heads=4, layers=4)),
}


def list_models() -> list[str]:
    """Names of the registered architectures."""
    return sorted(_MODELS)


def register_model(name: str, cfg: CLIPCfg) -> None:
    """Add an architecture (e.g. a custom size) to the registry."""
    _MODELS[name] = cfg


def _apply_overrides(obj, overrides: dict, prefix: str = ""):
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if head not in names and isinstance(getattr(type(obj), head, None), property):
            setattr(obj, head, value)  # a settable alias such as text.depth -> text.layers
            continue
        if head not in names:
            raise ValueError(f"unknown model override '{prefix}{key}'; known: {sorted(names)}")
        current = getattr(obj, head)
        if dataclasses.is_dataclass(current):
            if rest:
                _apply_overrides(current, {rest: value}, f"{prefix}{head}.")
            elif isinstance(value, dict):
                _apply_overrides(current, value, f"{prefix}{head}.")
            else:
                raise ValueError(f"model override '{prefix}{key}' is a section; give a mapping or a sub-key")
        else:
            setattr(obj, head, value)


def cfg_from_dict(data: dict) -> CLIPCfg:
    """A CLIPCfg from its ``dataclasses.asdict`` form (as written into exported ``config.json`` files)."""
    return get_model_config(CLIPCfg(vision=VisionCfg(), text=TextCfg()), **data)


def get_model_config(name, **overrides) -> CLIPCfg:
    """A copy of a registered architecture, with dotted or nested overrides (``vision.depth=4`` / ``vision={...}``)."""
    if isinstance(name, CLIPCfg):
        cfg = copy.deepcopy(name)
    elif name in _MODELS:
        cfg = copy.deepcopy(_MODELS[name])
    else:
        raise ValueError(f"unknown model '{name}'; registered: {', '.join(list_models())}")
    _apply_overrides(cfg, overrides)
    if cfg.vision.width % cfg.vision.heads or cfg.text.width % cfg.text.heads:
        raise ValueError("width must be divisible by heads in both towers")
    if cfg.vision.image_size % cfg.vision.patch_size:
        raise ValueError(f"image_size {cfg.vision.image_size} is not a multiple of patch_size {cfg.vision.patch_size}")
    return cfg
