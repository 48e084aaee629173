"""The LCL objective (Latent Compression Learning, OpenGVLab, NeurIPS 2024; issue 19): an image tower and a causal
language model trained together on interleaved image-text rows, by next-token generation on the text and a
contrastive term between the LM's state at each ``<boi>`` and the pooled latent of the image that follows.

Its config is ``LCLTrainCfg`` (defined here): the shared sections, ``lcl`` (``LCLCfg``: loss weights, the LM's init,
the monitors), ``lcl_data`` (``evaclip.data.interleaved.LCLDataCfg``: documents and row rules; ``data`` keeps the
image-text pairs, batch size and loader settings) and ``eval`` (the CLIP task's: zero-shot / retrieval data). The
model is ``evaclip.models.lcl.LCL`` built from ``model.name`` (+ overrides) with the LM's context length
``lcl_data.context_length``; the loss ``evaclip.losses.LCLLoss``.

Per step: one micro-batch (``accum_freq`` 1: the contrastive term spans the global batch of one step, as LCL trains),
the images at the run's fixed token drop (LCL has no unmasked tuning phase: the number of image latents per row is
fixed for the run), the logit scale clamped at ln(100) after each update. Logged: the loss, its ``generation`` and
``contrastive`` terms (global means, unweighted), the global number of contrastive ``pairs``, the logit scale.

Evaluation (``evaluate``): zero-shot / retrieval with the LM as the text encoder (``eval.zeroshot`` /
``eval.retrieval``, as a CLIP: ``LCL.encode_text`` / ``encode_image``), the captioning loss on held-out pairs
(``lcl.caption_val``: image first, the caption's next-token cross-entropy), and k-NN of the pooled latent
(``lcl.knn_train`` / ``lcl.knn_val``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from evaclip.config import TrainCfg
from evaclip.data.interleaved import LCLDataCfg
from evaclip.engine.task import StepContext, Task
from evaclip.errors import ConfigError
from evaclip.tasks.clip import ClipEvalCfg


@dataclass
class LCLCfg:
    generation_weight: float = 1.0  # LCL's --lcl-generation-loss-weight
    contrastive_weight: float = 0.1  # LCL's --lcl-contrastive-loss-weight (0: the generation-only ablation)
    text_init: Optional[str] = None  # the LM from a CLIP text tower (any format model.text_init reads); null: random
    # monitors, at eval.every
    caption_val: Optional[str] = None  # held-out image-text pairs: captioning loss (image first, then its caption)
    caption_val_samples: Optional[int] = None  # at most this many of them (null: all)
    knn_train: Optional[str] = None  # labelled memory bank for k-NN of the pooled latent
    knn_val: Optional[str] = None  # labelled queries
    knn_k: int = 20
    knn_temperature: float = 0.07


@dataclass
class LCLTrainCfg(TrainCfg):
    """The LCL task's config: the shared sections, ``lcl``, ``lcl_data`` and the zero-shot / retrieval ``eval``."""

    eval: ClipEvalCfg = field(default_factory=ClipEvalCfg)
    lcl: LCLCfg = field(default_factory=LCLCfg)
    lcl_data: LCLDataCfg = field(default_factory=LCLDataCfg)

    def validate(self) -> None:
        super().validate()
        m, model = self.lcl, self.model
        for key in ("generation_weight", "contrastive_weight"):
            if getattr(m, key) < 0:
                raise ConfigError(f"config key 'lcl.{key}' must be >= 0, got {getattr(m, key)}")
        if m.generation_weight == 0 and m.contrastive_weight == 0:
            raise ConfigError("config keys 'lcl.generation_weight' and 'lcl.contrastive_weight' are both 0: nothing "
                              "to train")
        for key in ("pretrained", "image_init", "text_init"):
            if getattr(model, key) is not None:
                raise ConfigError(f"config key 'model.{key}' does not apply to task=lcl (the model is an image tower, "
                                  "a pooler and a language model, not a CLIP): start the LM with lcl.text_init; "
                                  "resume=auto continues a run")
        if model.token_drop_until is not None:
            raise ConfigError("config key 'model.token_drop_until' must be null for task=lcl: the image latents per "
                              "row are fixed for the run (LCL has no unmasked tuning phase)")
        if self.accum_freq != 1:
            raise ConfigError(f"config key 'accum_freq' must be 1 for task=lcl (got {self.accum_freq}): its "
                              "contrastive term spans one step's global batch; raise data.batch_size or the ranks")
        if self.data.synthetic:
            raise ConfigError("config key 'data.synthetic' is not supported by task=lcl: give data.train (pairs) "
                              "and / or lcl_data.docs (documents)")
        if m.knn_k < 1 or m.knn_temperature <= 0:
            raise ConfigError(f"config keys 'lcl.knn_k' (>= 1) / 'lcl.knn_temperature' (> 0): got {m.knn_k}, "
                              f"{m.knn_temperature}")
        if (m.knn_train is None) != (m.knn_val is None):
            raise ConfigError("config keys 'lcl.knn_train' and 'lcl.knn_val' go together (memory bank and queries)")
        if m.caption_val_samples is not None and m.caption_val_samples < 1:
            raise ConfigError(f"config key 'lcl.caption_val_samples' must be >= 1, got {m.caption_val_samples}")
        if self.data.train or self.lcl_data.docs:  # neither (a recipe's placeholder): LCLTask.check says so
            self.lcl_data.check(has_pairs=bool(self.data.train))


def _exists(key: str, path: Optional[str]) -> None:
    if path is not None and "{" not in path and "://" not in path and not Path(path).exists():
        raise ConfigError(f"config key '{key}': not found: {path}")


class LCLTask(Task):
    """LCL: an image tower + attentive pooler and a causal LM on interleaved image-text rows."""

    name = "lcl"
    Cfg = LCLTrainCfg

    def __init__(self, cfg, env):
        super().__init__(cfg, env)
        from evaclip.losses import LCLLoss

        self.loss_fn = LCLLoss(cfg.lcl.generation_weight, cfg.lcl.contrastive_weight)

    @classmethod
    def check(cls, cfg) -> None:
        from evaclip.models import list_models

        if cfg.model.name not in list_models():
            raise ConfigError(f"config key 'model.name': unknown model {cfg.model.name!r}; known: {list_models()}")
        cfg.lcl_data.check(cls.image_tokens(cfg), has_pairs=bool(cfg.data.train))
        for key in ("text_init", "caption_val", "knn_train", "knn_val"):
            _exists(f"lcl.{key}", getattr(cfg.lcl, key))
        for key in ("zeroshot", "retrieval"):
            _exists(f"eval.{key}", getattr(cfg.eval, key))

    # -- building ------------------------------------------------------------------------------------------------
    @staticmethod
    def model_cfg(cfg):
        from evaclip.models.lcl import lcl_model_cfg

        return lcl_model_cfg(cfg.model.name, cfg.lcl_data.context_length, **dict(cfg.model.overrides or {}))

    @classmethod
    def image_tokens(cls, cfg) -> int:
        """Latents (image placeholders) per image: the tower's kept patches at ``model.token_drop``."""
        from evaclip.models.lcl import image_latents_per_image

        return image_latents_per_image(cls.model_cfg(cfg), cfg.model.token_drop)

    def build_data(self, steps_hint: int):
        from evaclip.data.interleaved import build_lcl_loader
        from evaclip.data.transforms import get_tokenizer, get_transforms

        cfg, env = self.cfg, self.env
        mc = self.model_cfg(cfg)
        return build_lcl_loader(cfg.data, cfg.lcl_data, get_transforms(mc, train=True), get_tokenizer(mc),
                                self.image_tokens(cfg), rank=env.rank, world_size=env.world_size, seed=cfg.seed)

    def build_model(self) -> nn.Module:
        from evaclip.models.lcl import create_lcl

        m = self.cfg.model
        return create_lcl(m.name, self.cfg.lcl_data.context_length, text_init=self.cfg.lcl.text_init,
                          attn_backend=m.attn_backend, token_drop=m.token_drop, grad_checkpointing=m.grad_checkpointing,
                          device=self.env.device, precision=self.cfg.precision, **dict(m.overrides or {}))

    # -- one step ------------------------------------------------------------------------------------------------
    def to_device(self, batch):
        """The rows cut after their last non-pad token (rounded up to 8; exact: the LM is causal), then moved."""
        images_NCHW, tokens_BL = batch
        from evaclip.models.lcl_tokens import LCLTokens

        used_L = (tokens_BL != LCLTokens().pad).any(dim=0).nonzero()
        keep = min(tokens_BL.shape[1], -(-(int(used_L.max()) + 1) // 8) * 8) if used_L.numel() else 1
        dev = self.env.device
        return images_NCHW.to(dev, non_blocking=True), tokens_BL[:, :keep].to(dev, non_blocking=True)

    def forward_backward(self, model: nn.Module, micro: list, ctx: StepContext) -> dict[str, torch.Tensor]:
        (images_NCHW, tokens_BL), = micro  # accum_freq is 1 (LCLTrainCfg.validate)
        with ctx.autocast():
            out = model(images_NCHW, tokens_BL)
            terms = self.loss_fn(out.image_features, out.text_features, out.logits, out.labels, out.logit_scale)
        ctx.backward(terms["loss"])
        return {"loss": terms["global_loss"], "generation": terms["generation"],
                "contrastive": terms["contrastive"], "pairs": terms["pairs"], "logit_scale": out.logit_scale.detach()}

    def after_update(self, model) -> None:
        from evaclip.optim import clamp_logit_scale_

        clamp_logit_scale_(model)

    # -- evaluation ----------------------------------------------------------------------------------------------
    def _eval_preprocess_and_tokenizer(self, model):
        from evaclip.evals import eval_transforms_and_tokenizer

        return eval_transforms_and_tokenizer(model.cfg)

    @torch.no_grad()
    def caption_loss(self, model: nn.Module) -> dict:
        """Next-token cross-entropy of the held-out captions ``lcl.caption_val`` given their image (rows
        ``[boi] [img] x P [eoi] caption [eot]``: every patch, as evaluation runs without token drop), averaged over
        every caption token of the set (all ranks)."""
        import torch.nn.functional as F

        from evaclip.data.interleaved import RowBuilder
        from evaclip.distributed import all_reduce_, rank_world
        from evaclip.evals.common import autocast
        from evaclip.evals.data import build_eval_loader, resolve_retrieval
        from evaclip.models.lcl import image_latents_per_image
        from evaclip.parallel import gathered

        lc, ev, dev = self.cfg.lcl, self.cfg.eval, self.env.device
        rank, world = rank_world()
        preprocess, tokenizer = self._eval_preprocess_and_tokenizer(model)
        rows = RowBuilder(tokenizer, model.cfg.text.context_length, image_latents_per_image(model.cfg, 0.0))
        total = torch.zeros(2, dtype=torch.float64, device=dev)  # summed cross-entropy, caption tokens
        limit = lc.caption_val_samples
        with gathered(model):
            for idx_B, images_BCHW, targets in build_eval_loader(resolve_retrieval(lc.caption_val), preprocess,
                                                                 ev.batch_size, ev.workers, rank, world):
                keep = [i for i, j in enumerate(idx_B.tolist()) if limit is None or j < limit]
                if not keep:
                    continue
                tokens_BL = rows.pad([rows.pair(targets[i][0][0], image_first=True) for i in keep]).to(dev)
                with autocast(dev, self.cfg.precision != "fp32"):
                    out = model(images_BCHW[keep].to(dev, non_blocking=True), tokens_BL)
                total[0] += F.cross_entropy(out.logits.float(), out.labels, reduction="sum").double()
                total[1] += out.labels.numel()
        all_reduce_(total)
        return {"caption_loss": float(total[0] / total[1].clamp(min=1)), "caption_tokens": int(total[1])}

    def evaluate(self, model: nn.Module, step: int) -> dict:
        lc, ev = self.cfg.lcl, self.cfg.eval
        results = {}
        was_training = model.training
        model.eval()
        try:
            if ev.zeroshot or ev.retrieval:
                from evaclip.evals import evaluate

                preprocess, tokenizer = self._eval_preprocess_and_tokenizer(model)
                results.update(evaluate(model, ev, tokenizer, preprocess, self.env.device,
                                        amp=self.cfg.precision != "fp32", show_progress=False))
            if lc.caption_val:
                results.update(self.caption_loss(model))
            if lc.knn_train and lc.knn_val:
                from evaclip.evals.knn import knn_top1

                preprocess, _ = self._eval_preprocess_and_tokenizer(model)
                results.update(knn_top1(model.encode_image, lc.knn_train, lc.knn_val, preprocess, k=lc.knn_k,
                                        temperature=lc.knn_temperature, batch_size=ev.batch_size, workers=ev.workers,
                                        device=self.env.device, amp=self.cfg.precision != "fp32"))
        finally:
            model.train(was_training)
        return results
