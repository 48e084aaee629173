"""Image towers built by timm: ViTamin (CVPR 2024), the hybrid of the seeds, exactly as open_clip builds it.

Architecture only. The blocks are timm's (``timm/models/vitamin.py``: conv stem, two MBConv-LN stages, a strided conv
to the transformer width at stride 16, then TFB-GeGLU ``VisionTransformer`` blocks on that feature map, average pool
and ``fc_norm``); this module adds what open_clip's ``TimmModel`` adds (a bias-free linear projection ``head.proj``
to the CLIP embedding, timm pool "" = the trunk's own average pool) and what evaclip's trainers read: token dropping
after the conv stages, layer ids, weight-decay exclusions and FSDP2 units.

Parameter names are open_clip's (``trunk.*``, ``head.proj.weight``), so a ViTamin CLIP's state dict *is* open_clip's
``ViTamin-*`` layout (under ``visual.``): nothing to convert in either direction.

Shapes: see the legend in docs/ARCHITECTURE.md (B batch, C channels, H/W image side, N tokens, P patch tokens of the
stride-16 grid, K kept tokens, D width, E embed dim).
"""
from __future__ import annotations

import re
from collections import OrderedDict

import torch
from torch import nn

from .registry import VisionCfg
from .token_drop import drop_tokens

# layer ids inside the tower (layer_id): 0 the stem, s + 1 conv stage s, then the token embedding (the strided conv
# to the transformer width and the position embedding), one id per transformer block, then the norms and projection
_STEM = re.compile(r"^trunk\.patch_embed\.backbone\.stem\.")
_STAGE = re.compile(r"^trunk\.patch_embed\.backbone\.stages\.(\d+)\.")
_TOKENS = re.compile(r"^trunk\.(patch_embed\.|pos_embed$|cls_token$|reg_token$)")
_BLOCK = re.compile(r"^trunk\.blocks\.(\d+)\.")


def timm_trunk_kwargs(cfg: VisionCfg) -> dict:
    """The ``timm.create_model`` arguments that build the trunk ``cfg`` describes (no classifier: open_clip's
    ``TimmModel`` resets it and adds its own projection). Every shape is passed, so the registry's numbers are what
    is built, also for sizes timm does not register (the tiny CPU variants)."""
    from timm.models.vitamin import VitCfg, VitConvCfg

    if not cfg.timm_model.startswith("vitamin_"):
        raise ValueError(f"vision.timm_model {cfg.timm_model!r}: only timm's ViTamin family (vitamin_*) is supported")
    if len(cfg.conv_widths) != 2 or len(cfg.conv_depths) != 2:
        raise ValueError(f"ViTamin has two MBConv stages: vision.conv_widths {cfg.conv_widths} and vision.conv_depths "
                         f"{cfg.conv_depths} need two entries each")
    embed_cfg = VitCfg(embed_dim=(*cfg.conv_widths, cfg.width), depths=(*cfg.conv_depths, 1),
                       stem_width=cfg.stem_width, conv_cfg=VitConvCfg(norm_layer="layernorm2d", norm_eps=1e-6),
                       head_type="1d")
    return dict(img_size=cfg.image_size, embed_dim=cfg.width, depth=cfg.depth, num_heads=cfg.heads,
                mlp_ratio=cfg.mlp_ratio, drop_path_rate=cfg.drop_path, embed_cfg=embed_cfg, num_classes=0)


def register_timm_variant(cfg: VisionCfg) -> str:
    """A timm model name that builds the trunk ``cfg`` describes from ``timm.create_model(name)`` alone (how open_clip's
    ``TimmModel`` calls timm: no shape arguments), registered once per shape; for twins of non-released sizes."""
    import hashlib

    import timm
    from timm.models import register_model

    kwargs = timm_trunk_kwargs(cfg)
    for k in ("num_classes", "drop_path_rate"):  # the caller's (open_clip passes both)
        kwargs.pop(k)
    digest = hashlib.sha1(repr(sorted(kwargs.items())).encode()).hexdigest()[:8]
    name = f"evaclip_{cfg.timm_model}_{digest}"
    if timm.models.is_model(name):
        return name

    def entry(pretrained: bool = False, **kw):
        if pretrained:
            raise ValueError(f"{name} is an evaclip shape variant with no timm weights")
        for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm's factory bookkeeping
            kw.pop(k, None)
        return timm.create_model(cfg.timm_model, pretrained=False, **{**kwargs, **kw})

    entry.__name__ = name
    entry.__module__ = __name__
    register_model(entry)
    return name


class TokenDrop(nn.Module):
    """Token dropping on the transformer tokens (timm's ``patch_drop`` slot: after the position embedding, before
    the blocks): keeps the prefix tokens and a random ``1 - ratio`` of the others per sample, in training mode only.
    The conv stages before it always see the whole image. Same draw as the EVA tower (``token_drop.keep_indices``)."""

    def __init__(self, ratio: float = 0.0, num_prefix: int = 0):
        super().__init__()
        self.ratio, self.num_prefix = float(ratio), num_prefix

    def forward(self, x_BND: torch.Tensor) -> torch.Tensor:
        if not self.training or self.ratio == 0.0:
            return x_BND
        return drop_tokens(x_BND, 1.0 - self.ratio, self.num_prefix)[0]


class TimmVisionTower(nn.Module):
    """A timm image trunk + open_clip's linear projection head: ``images_BCHW -> B x E``.

    ``token_drop``: fraction of the transformer tokens dropped in training (``set_token_drop`` changes it between
    phases). Attention is timm's (PyTorch SDPA), whatever the CLIP's ``attn_backend``.
    """

    def __init__(self, cfg: VisionCfg, embed_dim: int, token_drop: float = 0.0):
        super().__init__()
        import timm

        self.cfg = cfg
        self.trunk = timm.create_model(cfg.timm_model, pretrained=False, **timm_trunk_kwargs(cfg))
        self.trunk.patch_drop = TokenDrop(0.0, self.trunk.num_prefix_tokens)
        # open_clip's TimmModel head (timm_proj "linear", proj_bias false): the same module names, so the same keys
        self.head = nn.Sequential(OrderedDict(drop=nn.Dropout(0.0),
                                              proj=nn.Linear(self.trunk.num_features, embed_dim, bias=False)))
        self.set_token_drop(token_drop)

    @property
    def num_prefix(self) -> int:
        return self.trunk.num_prefix_tokens

    def set_token_drop(self, ratio: float) -> None:
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"token_drop must be in [0, 1), got {ratio}")
        self.token_drop = self.trunk.patch_drop.ratio = float(ratio)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's: each transformer block and each conv stage recomputed in backward."""
        self.trunk.set_grad_checkpointing(enable)

    def forward_features(self, img_BCHW: torch.Tensor) -> torch.Tensor:
        """Every token's final features, B x N x D (N = the stride-16 grid, or the kept tokens when dropping)."""
        return self.trunk.forward_features(img_BCHW)

    def final_tokens(self, img_BCHW: torch.Tensor) -> torch.Tensor:
        """The trunk's last tokens through its final LayerNorm, per token, prefix dropped: B x K x D (K kept tokens in
        training with token dropping). ViTamin normalises after its average pool (``fc_norm``; ``norm`` is an
        identity), so ``fc_norm`` is applied to each token: what a model reading the tokens (LCL's pooler) takes."""
        return self.trunk.fc_norm(self.forward_features(img_BCHW)[:, self.num_prefix:])

    def patch_tokens(self, img_BCHW: torch.Tensor, layer: int = -1, *, norm: bool = False,
                     prefix: bool = False) -> torch.Tensor:
        """The tokens of transformer block ``layer`` (negative from the end), B x P x D over the stride-16 grid:
        timm's ``forward_intermediates`` (``norm``: through the trunk's final norm, an identity in ViTamin, which
        normalises after pooling). ViTamin has no prefix tokens, so ``prefix`` changes nothing. Eval mode."""
        depth = len(self.trunk.blocks)
        if not -depth <= layer < depth:
            raise ValueError(f"layer must be in [{-depth}, {depth - 1}] for a tower of {depth} blocks, got {layer}")
        if self.training and self.token_drop > 0:
            raise ValueError("patch_tokens needs every token: call it in eval mode (model.eval())")
        return self.trunk.forward_intermediates(img_BCHW, indices=[layer % depth], norm=norm, output_fmt="NLC",
                                                intermediates_only=True)[0]

    def forward(self, img_BCHW: torch.Tensor) -> torch.Tensor:
        """Image embeddings B x E: the trunk's average pool and ``fc_norm``, then the projection."""
        return self.head(self.trunk(img_BCHW))

    # --- hooks for the optimizer and FSDP2 (names relative to the tower) -------------------------------------------
    def num_layers(self) -> int:
        """Layer-id depth L: the stem, the conv stages, the token embedding, then the transformer blocks."""
        return len(self.cfg.conv_widths) + 1 + self.cfg.depth

    def layer_id(self, name: str) -> int:
        """0 the stem, s + 1 conv stage s, S + 1 the token embedding (strided conv, ``pos_embed``), S + 2 + i block i,
        L + 1 the norms and the projection (S conv stages, L = ``num_layers()``)."""
        stages = len(self.cfg.conv_widths)
        if _STEM.match(name):
            return 0
        m = _STAGE.match(name)
        if m:
            return int(m.group(1)) + 1
        if _TOKENS.match(name):
            return stages + 1
        m = _BLOCK.match(name)
        if m:
            return stages + 2 + int(m.group(1))
        return self.num_layers() + 1

    def no_weight_decay(self) -> set[str]:
        """Norm gains and biases (every tensor of one dimension). ``pos_embed`` decays, as in open_clip's training
        (its exclusion rule is ``ndim < 2``, biases, norms, ``logit_scale``), which trained the released ViTamins."""
        return {n for n, p in self.named_parameters() if p.ndim <= 1 or n.endswith(".bias")}

    def fsdp_units(self) -> list[nn.Module]:
        """FSDP2 units inside the tower: the conv stages (stem, MBConv stages, strided conv) as one, each transformer
        block as one; the position embedding, final norms and projection stay with the tower's own unit."""
        return [self.trunk.patch_embed, *self.trunk.blocks]
