"""LCL (Latent Compression Learning, OpenGVLab, NeurIPS 2024): an image tower and a causal language model trained
together on interleaved image-text token rows (issue 19). Architecture only; the loss is ``evaclip.losses.LCLLoss``.

Shapes: see the legend in docs/ARCHITECTURE.md (B rows, L context length, N images of a batch (N >= B: a row holds
one or more), K latents per image (the kept patches at the run's token drop), D image-tower width, W the LM's width,
E the embedding of the contrastive term, V the LM's vocabulary, T generation targets of a batch).

Following LCL's ``src/open_clip/lcl_model.py`` (class ``LCL``) and ``src/open_clip/attentive.py``
(``AttentivePoolingProjection``):

- ``visual``: any image tower evaclip builds (EVA-02, EVA-01, ViTamin), the CLIP model's own module and key layout,
  with its CLS readout (the CLIP ``head``) removed: the final-norm tokens with the prefix (CLS) dropped are the
  per-patch features, B x K x D (K kept patches in training with token dropping, every patch otherwise).
- ``pooler``: an attentive pooler with one learned query (open_clip's ``AttentionalPooler``, the CoCa pooler). One
  set of weights gives both outputs, as LCL's ``forward_pool`` / ``forward_project``: the pooled latent is the query's
  attention over the patches; the per-patch latents are each patch through the value path alone (key/value norm, value
  projection, output projection), i.e. what the pooled latent averages. (LCL keeps separate key and value norms and no
  output bias; the CoCa pooler shares one norm and has an output bias: the same construction.)
- ``text``: the causal LM, the CLIP text tower's architecture (``TextTransformer``: token and position embeddings,
  causal blocks, ``ln_final``, ``text_projection``) with the LCL vocabulary (``LCLTokens().vocab_size``) and the run's
  context length, and ``lm_head``, an untied LayerNorm + bias-free Linear to the vocabulary.
- A row ``[sot] text [boi] [img] x K [eoi] text [eot] [pad] ...``: the ``img`` placeholders are replaced by the image
  latents (images in the order their ``boi`` appears, row 0 first). The hidden state at each ``boi`` (not at position
  0) through ``ln_final`` and ``text_projection`` is the text side of the contrastive term, the pooled latent of the
  image that follows the image side; the generation targets are the next tokens except image placeholders, ``eoi``
  and pad (pad is an id of its own, so a real "!" is a target: LCL pads with 0, the BPE token "!").
- ``encode_text(tokens)``: a CLIP-tokenized prompt with its ``eot`` replaced by ``boi`` (LCL's ``encode_text``), the
  hidden state there -> ``ln_final`` -> ``text_projection``; ``encode_image(images)``: the pooled latent. So zero-shot,
  retrieval and k-NN evaluation run as for a CLIP.

One addition: LCL's configs have E == W (the pooled latent is compared with the projected text directly); for a
registered architecture whose embedding differs from its text width, a bias-free ``latent_proj`` (W -> E) maps the
pooled latent to E. With E == W there is none, as in LCL.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attend
from .clip import CLIP
from .lcl_tokens import LCLTokens
from .registry import CLIPCfg, get_model_config
from .text import TextTransformer
from .token_drop import num_kept
from .towers import vision_tower

__all__ = ["LCL", "LCLImageTower", "LCLOutput", "LCLTextTower", "LanguageModel", "create_lcl",
           "image_latents_per_image", "lcl_model_cfg"]

log = logging.getLogger("evaclip.models")


class LCLOutput(NamedTuple):
    image_features: torch.Tensor  # N' x E, L2-normalised pooled latents of the images whose boi counts
    text_features: torch.Tensor  # N' x E, L2-normalised LM features at those boi tokens (same order)
    logits: torch.Tensor  # T x V, the LM head at every position whose next token is a generation target
    labels: torch.Tensor  # T, those next tokens
    logit_scale: torch.Tensor  # scalar, exponentiated (as CLIP's)


def lcl_model_cfg(name: Union[str, CLIPCfg], context_length: int, tokens: LCLTokens = LCLTokens(),
                  **overrides) -> CLIPCfg:
    """The registered architecture ``name`` (+ overrides) with the LM's vocabulary and context length set."""
    cfg = get_model_config(name, **overrides) if isinstance(name, str) else dataclasses.replace(name)
    cfg.text = dataclasses.replace(cfg.text, vocab_size=tokens.vocab_size, context_length=int(context_length))
    return cfg


def image_latents_per_image(cfg: CLIPCfg, token_drop: float) -> int:
    """K: the latents each image puts in a row, its kept patch tokens at ``token_drop`` (the ``img`` placeholders
    per image the data writes). A timm tower (ViTamin) drops tokens on its stride-16 grid, an EVA tower on its
    patches; neither has prefix tokens among the latents."""
    return num_kept(cfg.vision.grid ** 2, token_drop) if token_drop > 0 else cfg.vision.grid ** 2


class AttentivePooler(nn.Module):
    """One learned query over the patch features, open_clip's ``AttentionalPooler`` (D -> W); ``forward`` returns
    (pooled latent B x W, per-patch latents B x K x W), both from the same weights (see the module docstring)."""

    def __init__(self, width: int, context_dim: int, heads: int):
        super().__init__()
        from open_clip.transformer import AttentionalPooler

        self.pool = AttentionalPooler(width, context_dim, n_head=heads, n_queries=1, norm_layer=nn.LayerNorm)

    def _value_weight(self) -> torch.Tensor:
        attn = self.pool.attn
        W = attn.embed_dim
        return attn.v_proj_weight if not attn._qkv_same_embed_dim else attn.in_proj_weight[2 * W:]

    def forward(self, x_BKD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attn = self.pool.attn
        W = attn.embed_dim
        pooled_BW = self.pool(x_BKD)[:, 0]
        v_BKW = F.linear(self.pool.ln_k(x_BKD), self._value_weight(), attn.in_proj_bias[2 * W:])
        return pooled_BW, attn.out_proj(v_BKW)


class LanguageModel(TextTransformer):
    """The LCL LM: the CLIP text tower (same modules and keys) run over whole rows. ``forward`` does everything that
    reads the tower's own parameters (embeddings, blocks, ``ln_final``, ``text_projection``) in one call, so FSDP2's
    hooks on the tower gather them once."""

    def forward(self, tokens_BL: torch.Tensor, latents_NKW: Optional[torch.Tensor], image_id: int,
                features_BL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows B x L with the ``image_id`` placeholders replaced by ``latents_NKW`` (row-major order; None: no
        image) -> (hidden states B x L x W before ``ln_final``, projected features M x E at the M positions of
        ``features_BL``)."""
        x_BLW = self.token_embedding(tokens_BL)
        if latents_NKW is not None:
            img_BL = tokens_BL == image_id
            n_slots, (N, K, _) = int(img_BL.sum()), latents_NKW.shape
            if n_slots != N * K:
                raise ValueError(f"the token rows hold {n_slots} image placeholders but the batch's {N} images give "
                                 f"{K} latents each ({N * K}): the data's image_tokens must be the kept patches at "
                                 "the run's token drop")
            x_BLW = x_BLW.masked_scatter(img_BL.unsqueeze(-1), latents_NKW.to(x_BLW.dtype))
        h_BLW = self.transformer(x_BLW + self.positional_embedding[:tokens_BL.shape[1]])
        return h_BLW, self.ln_final(h_BLW[features_BL]) @ self.text_projection

    def encode_prompts(self, tokens_BL: torch.Tensor, ids: LCLTokens = LCLTokens()) -> torch.Tensor:
        """CLIP-tokenized prompts B x L (sot ... eot, padded) -> B x E: ``eot`` becomes ``boi`` and the hidden state
        there goes through ``ln_final`` and ``text_projection`` (LCL's ``encode_text``). The rows are cut after their
        last ``boi`` (exact: the LM is causal)."""
        tokens_BL = torch.where(tokens_BL == ids.eot, torch.full_like(tokens_BL, ids.boi), tokens_BL)
        if not bool((tokens_BL == ids.boi).any(dim=1).all()):
            raise ValueError("encode_text needs a prompt ending with <eot> (or <boi>) in every row")
        pos_L = torch.arange(tokens_BL.shape[1], device=tokens_BL.device)
        last_B = torch.where(tokens_BL == ids.boi, pos_L, -1).max(dim=1).values  # the last boi of each row
        tokens_BL = tokens_BL[:, :int(last_B.max()) + 1]
        return self(tokens_BL, None, ids.image, pos_L[:tokens_BL.shape[1]] == last_B[:, None])[1]


class LCLImageTower(nn.Module):
    """The image side of an LCL model alone (``visual``, ``pooler``, ``latent_proj``, same keys): images -> the pooled
    latent, B x E, what an exported LCL image encoder computes (``evaclip.load_encoder``)."""

    def __init__(self, cfg: CLIPCfg, visual: nn.Module, pooler: AttentivePooler, latent_proj: Optional[nn.Linear]):
        super().__init__()
        self.cfg, self.visual, self.pooler, self.latent_proj = cfg, visual, pooler, latent_proj

    @classmethod
    def build(cls, cfg: CLIPCfg, attend: Attend, token_drop: float = 0.0) -> "LCLImageTower":
        """Fresh modules: the image tower without its CLS readout (``head``), the pooler (text width W), and
        ``latent_proj`` (W -> E) when E != W."""
        W = cfg.text.width
        visual = vision_tower(cfg.vision, cfg.embed_dim, attend, token_drop)
        visual.head = None  # the CLS readout is not used: the pooler reads the patch tokens
        latent_proj = nn.Linear(W, cfg.embed_dim, bias=False) if cfg.embed_dim != W else None
        if latent_proj is not None:
            nn.init.normal_(latent_proj.weight, std=W ** -0.5)
        return cls(cfg, visual, AttentivePooler(W, cfg.vision.width, heads=cfg.text.heads), latent_proj)

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        pooled_BW, _ = self.pooler(self.visual.final_tokens(images_BCHW))
        return pooled_BW if self.latent_proj is None else self.latent_proj(pooled_BW)

    def patch_tokens(self, images_BCHW: torch.Tensor, layer: int = -1, *, norm: bool = False,
                     prefix: bool = False) -> torch.Tensor:
        """The image tower's per-patch tokens of block ``layer`` (see ``EVAVisionTransformer.patch_tokens``)."""
        return self.visual.patch_tokens(images_BCHW, layer, norm=norm, prefix=prefix)


class LCLTextTower(nn.Module):
    """The LM as a text encoder alone (``lm``: the LCL model's ``text`` keys under ``lm.``): CLIP-tokenized prompts
    -> B x E at ``<boi>`` (``LanguageModel.encode_prompts``), what an exported LCL text encoder computes."""

    def __init__(self, cfg: CLIPCfg, lm: LanguageModel):
        super().__init__()
        self.cfg, self.lm = cfg, lm

    @classmethod
    def build(cls, cfg: CLIPCfg, attend: Attend) -> "LCLTextTower":
        return cls(cfg, LanguageModel(cfg.text, cfg.embed_dim, attend))

    def forward(self, tokens_BL: torch.Tensor) -> torch.Tensor:
        return self.lm.encode_prompts(tokens_BL)


class LCL(nn.Module):
    """Image tower + attentive pooler + causal LM + logit scale; the optimizer hooks are the CLIP model's (the pooler
    and ``latent_proj`` count as the image tower's top layer, ``lm_head`` as the text tower's)."""

    def __init__(self, cfg: CLIPCfg, attend: Attend, token_drop: float = 0.0, tokens: LCLTokens = LCLTokens()):
        super().__init__()
        if cfg.text.vocab_size != tokens.vocab_size:
            raise ValueError(f"the LM's vocabulary is {cfg.text.vocab_size} ids, LCL's tokens need "
                             f"{tokens.vocab_size}: build the config with lcl_model_cfg")
        self.cfg, self.tokens = cfg, tokens
        W = cfg.text.width
        image = LCLImageTower.build(cfg, attend, token_drop)  # its modules, under the CLIP model's names
        self.visual, self.pooler, self.latent_proj = image.visual, image.pooler, image.latent_proj
        self.text = LanguageModel(cfg.text, cfg.embed_dim, attend)
        self.lm_head = nn.Sequential(nn.LayerNorm(W, eps=cfg.text.ln_eps), nn.Linear(W, cfg.text.vocab_size,
                                                                                    bias=False))
        nn.init.normal_(self.lm_head[1].weight, std=W ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        self.logit_bias = None

    @property
    def attn_backend(self) -> str:
        return self.text.transformer.resblocks[0].attn.attend.backend

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

    # --- the image side -------------------------------------------------------------------------------------------
    def patch_features(self, images_NCHW: torch.Tensor) -> torch.Tensor:
        """The image tower's final-norm tokens, CLS dropped: N x K x D (K kept patches in training with token
        dropping). A timm tower (ViTamin) normalises after its average pool (``fc_norm``, an identity ``norm``): its
        final LayerNorm is applied to each token here, as LCL's ``ln_post`` to every token before the CLS is
        dropped."""
        self._fsdp_methods()
        return self.visual.final_tokens(images_NCHW)

    def _fsdp_methods(self) -> None:
        """Under FSDP2 the image tower is a unit whose weights are gathered around its ``__call__``; the pooler reads
        its ``final_tokens``, registered once as a forward method so it gathers them too."""
        if getattr(self, "_fsdp_registered", False):
            return
        from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

        if isinstance(self.visual, FSDPModule):
            register_fsdp_forward_method(self.visual, "final_tokens")
        self._fsdp_registered = True

    def image_tower(self) -> LCLImageTower:
        """The image side as an ``LCLImageTower`` sharing this model's modules (for export)."""
        return LCLImageTower(self.cfg, self.visual, self.pooler, self.latent_proj)

    def text_tower(self) -> LCLTextTower:
        """The LM as an ``LCLTextTower`` sharing this model's modules (for export)."""
        return LCLTextTower(self.cfg, self.text)

    def image_latents(self, images_NCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled latent N x E, not normalised; per-patch latents N x K x W, the LM's image tokens)."""
        pooled_NW, latents_NKW = self.pooler(self.patch_features(images_NCHW))
        return self._project(pooled_NW), latents_NKW

    def _project(self, pooled_NW: torch.Tensor) -> torch.Tensor:
        return pooled_NW if self.latent_proj is None else self.latent_proj(pooled_NW)

    def encode_image(self, images_BCHW: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """The pooled latent, B x E: the image embedding of zero-shot, retrieval and k-NN."""
        pooled_BW, _ = self.pooler(self.patch_features(images_BCHW))
        f_BE = self._project(pooled_BW)
        return F.normalize(f_BE, dim=-1) if normalize else f_BE

    # --- the text side --------------------------------------------------------------------------------------------
    def encode_text(self, tokens_BL: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """CLIP-tokenized prompts B x L (sot ... eot, padded) -> B x E: the LM's state at ``boi``, which the prompt's
        ``eot`` becomes (``LanguageModel.encode_prompts``, LCL's ``encode_text``)."""
        f_BE = self.text.encode_prompts(tokens_BL, self.tokens)
        return F.normalize(f_BE, dim=-1) if normalize else f_BE

    def forward(self, images_NCHW: torch.Tensor, tokens_BL: torch.Tensor) -> LCLOutput:
        """One batch of rows and its images (in ``boi`` order): the contrastive pairs and the generation logits."""
        t = self.tokens
        if tokens_BL.dim() != 2 or tokens_BL.shape[1] > self.cfg.text.context_length:
            raise ValueError(f"token rows must be B x L with L <= {self.cfg.text.context_length}, got "
                             f"{tuple(tokens_BL.shape)}")
        boi_BL = tokens_BL == t.boi
        if int(boi_BL.sum()) != images_NCHW.shape[0]:
            raise ValueError(f"the token rows hold {int(boi_BL.sum())} <boi> tokens for {images_NCHW.shape[0]} images")
        pooled_NE, latents_NKW = self.image_latents(images_NCHW)
        # a boi at position 0 has no text before it: no pair (LCL's get_contrastive_features)
        counts_BL = boi_BL.clone()
        counts_BL[:, 0] = False
        h_BLW, txt_ME = self.text(tokens_BL, latents_NKW, t.image, counts_BL)
        keep_N = counts_BL[boi_BL]  # the images in boi order, those whose boi counts
        img_ME = pooled_NE[keep_N]
        next_BL = tokens_BL[:, 1:]
        target_BL = (next_BL != t.image) & (next_BL != t.eoi) & (next_BL != t.pad)
        logits_TV = self.lm_head(h_BLW[:, :-1][target_BL])
        return LCLOutput(F.normalize(img_ME.float(), dim=-1), F.normalize(txt_ME.float(), dim=-1), logits_TV,
                         next_BL[target_BL], self.logit_scale.exp())

    # --- hooks for the optimizer (the CLIP model's rules) ----------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        """1-D tensors, biases, position embeddings, CLS, logit scale (an image tower's own rule for its keys); the
        pooler's query decays, as in LCL (open_clip's rule: only tensors of < 2 dims, norms, biases are exempt)."""
        return CLIP.no_weight_decay(self)

    def weight_decay_names(self) -> set[str]:
        return CLIP.weight_decay_names(self)

    @staticmethod
    def param_tower(name: str) -> str:
        """``visual`` (with the pooler and ``latent_proj``), ``text`` (with ``lm_head``) or ``other`` (logit scale)."""
        name = name.removeprefix("module.")
        if name.startswith(("visual.", "pooler.", "latent_proj.")):
            return "visual"
        return "text" if name.startswith(("text.", "lm_head.")) else "other"

    def num_layers(self, tower: str) -> int:
        return CLIP.num_layers(self, tower)

    def layer_id(self, name: str) -> int:
        """EVA-CLIP's layer ids; the pooler, ``latent_proj`` and ``lm_head`` sit with the final norms (L + 1)."""
        return CLIP.layer_id(self, name)


def _attend(attn_backend, device, precision):
    from .factory import _attend as attend

    return attend(attn_backend, device, precision)


def create_lcl(name: Union[str, CLIPCfg], context_length: int, *, text_init: Optional[str] = None,
               attn_backend: str = "auto", token_drop: float = 0.0, grad_checkpointing: bool = False,
               device=None, precision="fp32", tokens: LCLTokens = LCLTokens(), **overrides) -> LCL:
    """An LCL model with the image tower and text architecture of the registered CLIP ``name`` (overrides as in
    ``create_model``), the LM's context length ``context_length``; ``text_init`` starts the LM from a text checkpoint
    (any format ``model.text_init`` reads: its vocabulary rows are copied and the four LCL ids keep their init, its
    position embedding is cut or extended to the context length). Device / precision / backend as ``create_model``."""
    cfg = lcl_model_cfg(name, context_length, tokens, **overrides)
    model = LCL(cfg, _attend(attn_backend, device, precision), token_drop=token_drop, tokens=tokens)
    if text_init is not None:
        load_lm_init(model, text_init)
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model.to(device) if device is not None else model


def load_lm_init(model: LCL, path) -> None:
    """The LM from a CLIP text tower checkpoint (``text.*`` or OpenAI's top-level keys): the CLIP vocabulary's rows
    of the token embedding and the first L positions are copied, the rows past the checkpoint's keep their init; the
    LM head stays fresh (no CLIP has one)."""
    from .convert import CheckpointError, _naming, detect_format, load_state_dict_file, load_text

    with _naming("lcl.text_init", path):
        sd = load_state_dict_file(path)
        fmt = detect_format(sd)
        own = model.text.state_dict()
        adapted = {}
        for k, v in sd.items():
            rel = k.removeprefix("text.")
            if rel == "token_embedding.weight" and v.shape[0] < own[rel].shape[0] and v.shape[1:] == own[rel].shape[1:]:
                v = torch.cat([v, own[rel][v.shape[0]:].to(v.dtype)])
            elif rel == "positional_embedding" and v.ndim == 2 and v.shape[0] != own[rel].shape[0]:
                L = own[rel].shape[0]
                v = v[:L] if v.shape[0] >= L else torch.cat([v, own[rel][v.shape[0]:].to(v.dtype)])
            adapted[k] = v
        if not any(k.removeprefix("text.") == "token_embedding.weight" for k in adapted):
            raise CheckpointError("it has no text token embedding")
        report = load_text(model, adapted, fmt)
    log.info("LM init from %s (%s): copied %d CLIP token rows and the first %d positions; fresh: lm_head, %s",
             path, fmt, model.tokens.base_vocab, model.cfg.text.context_length, sorted(report.fresh) or "nothing else")
