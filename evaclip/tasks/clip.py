"""The contrastive (CLIP) objective: image-text pairs, cached-feature accumulation, token-drop phases, the
logit-scale clamp and zero-shot / retrieval evaluation.

Its config is ``ClipTrainCfg`` (defined here): the shared sections plus ``loss`` (``evaclip.losses.LossCfg``) and
``eval`` (``ClipEvalCfg``: zero-shot / retrieval data). It reads ``model`` (architecture, inits, token dropping) and
``data`` (image-text shards) too.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from evaclip.config import EvalCfg, TrainCfg
from evaclip.engine.rng import DeviceRng
from evaclip.engine.task import StepContext, Task
from evaclip.errors import ConfigError
from evaclip.logging import get_logger
from evaclip.losses import LossCfg

log = get_logger("evaclip.train")


@dataclass
class ClipEvalCfg(EvalCfg):
    zeroshot: Optional[str] = None  # clip_benchmark webdataset dir or ImageNet-style folder
    retrieval: Optional[str] = None  # image-text shards
    classnames: Optional[str] = None  # zero-shot class-name file (default: the data's own, or open_clip's ImageNet)
    templates: Optional[str] = None  # zero-shot prompt-template file ({c} = class name)


@dataclass
class ClipTrainCfg(TrainCfg):
    """The CLIP task's config: the shared sections, the contrastive ``loss`` and the zero-shot / retrieval ``eval``."""

    eval: ClipEvalCfg = field(default_factory=ClipEvalCfg)
    loss: LossCfg = field(default_factory=LossCfg)

    def validate(self) -> None:
        super().validate()
        if self.loss.local_loss and not self.loss.gather_with_grad:
            raise ConfigError("config key 'loss.gather_with_grad': loss.local_loss=true needs gather_with_grad=true "
                              "(without it the cross-rank gradient terms are lost); set both, or local_loss=false")


def _scale_grad(t: Optional[torch.Tensor], factor: float) -> Optional[torch.Tensor]:
    """Same value as ``t``, gradient multiplied by ``factor``."""
    if t is None or factor == 1.0:
        return t
    return t * factor + t.detach() * (1.0 - factor)


def contrastive_forward_backward(model: nn.Module, loss_fn: nn.Module, micro: list,
                                 ctx: StepContext) -> dict[str, torch.Tensor]:
    """Forward + backward of one optimizer step over ``micro`` = k ``(images_BCHW, tokens_BL)`` micro-batches.

    k == 1: the plain step. k > 1 (open_clip's accum_freq scheme): a no-grad pass caches the features of every
    micro-batch; then each micro-batch is recomputed with grad and the loss is taken over all k*B pairs, its own
    features live and the others' cached, so the gradients summed over the k backward passes are those of one batch of
    k*B. Two details make that exact: each recompute replays the RNG state of its cached pass (same token-drop
    mask, so cached and live features agree), and the logit scale / bias gradient is scaled by 1/k (every one of the
    k losses depends on them, where the big batch's loss counts them once).

    Returns detached device tensors: ``loss`` and ``logit_scale`` (no host sync).
    """
    k = len(micro)
    if k == 1:
        images_BCHW, tokens_BL = micro[0]
        with ctx.autocast():
            out = model(images_BCHW, tokens_BL)
            # output_dict=False: the loss alone (the per-row accuracies are for users who ask for them)
            loss = loss_fn(out.image_features, out.text_features, out.logit_scale, out.logit_bias,
                           output_dict=False)
        ctx.backward(loss)
        return {"loss": loss.detach(), "logit_scale": out.logit_scale.detach()}

    rng = DeviceRng(ctx.device)
    states, img_cache, txt_cache = [], [], []
    with torch.no_grad():
        for images_BCHW, tokens_BL in micro:
            states.append(rng.get())
            with ctx.autocast():
                out = model(images_BCHW, tokens_BL)
            img_cache.append(out.image_features)
            txt_cache.append(out.text_features)
    end_state = rng.get()
    for j, (images_BCHW, tokens_BL) in enumerate(micro):
        rng.set(states[j])
        with ctx.grad_sync(model, j == k - 1):
            with ctx.autocast():
                out = model(images_BCHW, tokens_BL)
                # this rank's k micro-batches: (k * B) x E, the loss's local batch (all ranks': G x E)
                img = torch.cat(img_cache[:j] + [out.image_features] + img_cache[j + 1:])
                txt = torch.cat(txt_cache[:j] + [out.text_features] + txt_cache[j + 1:])
                loss = loss_fn(img, txt, _scale_grad(out.logit_scale, 1.0 / k),
                               _scale_grad(out.logit_bias, 1.0 / k), output_dict=False)
            ctx.backward(loss)
    rng.set(end_state)
    return {"loss": loss.detach(), "logit_scale": out.logit_scale.detach()}


class ClipTask(Task):
    """Contrastive image-text training of a CLIP model (EVA-CLIP)."""

    name = "clip"
    Cfg = ClipTrainCfg

    def __init__(self, cfg, env):
        super().__init__(cfg, env)
        from evaclip.losses import build_loss

        self.loss_fn = build_loss(cfg.loss)
        self._drop: Optional[float] = None  # token-drop ratio in force

    @classmethod
    def check(cls, cfg) -> None:
        from evaclip.models import list_models

        if cfg.model.name not in list_models():
            raise ConfigError(f"config key 'model.name': unknown model {cfg.model.name!r}; known: {list_models()}")
        if not cfg.data.synthetic and not cfg.data.train:
            raise ConfigError("config key 'data.train' is required (a shard spec), or set data.synthetic=true")
        for key in ("pretrained", "image_init", "text_init"):
            path = getattr(cfg.model, key)
            if path is not None and not Path(path).exists():
                raise ConfigError(f"config key 'model.{key}': file not found: {path}")
        for key in ("zeroshot", "retrieval"):
            path = getattr(cfg.eval, key)
            if path is not None and "{" not in path and not Path(path).exists():
                raise ConfigError(f"config key 'eval.{key}': not found: {path}")

    def build_data(self, steps_hint: int):
        cfg, env = self.cfg, self.env
        if cfg.data.synthetic:
            from evaclip.data.synthetic import SyntheticDataInfo
            from evaclip.models import get_model_config

            mc = get_model_config(cfg.model.name)
            per_rank = (cfg.data.train_num_samples // (cfg.data.batch_size * env.world_size)
                        if cfg.data.train_num_samples else steps_hint * cfg.accum_freq)
            return SyntheticDataInfo(cfg.data.batch_size, mc.vision.image_size, mc.text.context_length,
                                     mc.text.vocab_size, max(1, per_rank), seed=cfg.seed * 1000 + env.rank)
        from evaclip.data import build_train_loader
        from evaclip.data.transforms import get_tokenizer, get_transforms

        preprocess, tokenizer = get_transforms(cfg.model.name, train=True), get_tokenizer(cfg.model.name)
        return build_train_loader(cfg.data, preprocess, tokenizer, rank=env.rank, world_size=env.world_size,
                                  seed=cfg.seed)

    def build_model(self) -> nn.Module:
        from evaclip.models import create_model
        from evaclip.optim import lock_towers

        m = self.cfg.model
        # built where it will run, in the run's precision: attn_backend=auto is resolved for that device and dtype
        model = create_model(m.name, pretrained=m.pretrained, image_init=m.image_init, text_init=m.text_init,
                             attn_backend=m.attn_backend, token_drop=m.token_drop,
                             grad_checkpointing=m.grad_checkpointing, device=self.env.device,
                             precision=self.cfg.precision, **m.overrides)
        lock_towers(model, self.cfg.optim)  # before DDP, which registers only trainable parameters
        return model

    def to_device(self, batch):
        from evaclip.data.transforms import trim_padding

        images_BCHW, tokens_BL = batch
        if self.cfg.data.trim_text_padding:
            tokens_BL = trim_padding(tokens_BL)
        dev = self.env.device
        return images_BCHW.to(dev, non_blocking=True), tokens_BL.to(dev, non_blocking=True)

    def forward_backward(self, model, micro, ctx):
        return contrastive_forward_backward(model, self.loss_fn, micro, ctx)

    def before_step(self, model, step, logger) -> None:
        """Token dropping at ``model.token_drop`` until ``model.token_drop_until``, then 0 (unmasked tuning)."""
        m = self.cfg.model
        want = m.token_drop if (m.token_drop_until is None or step < m.token_drop_until) else 0.0
        if want != self._drop and m.token_drop > 0:
            from evaclip.distributed import unwrap

            unwrap(model).visual.set_token_drop(want)
            if self._drop is not None:
                log.info("step %d: token drop %.2f -> %.2f", step, self._drop, want)
                logger.event("token_drop", step=step, ratio=want)
        self._drop = want

    def after_update(self, model) -> None:
        from evaclip.optim import clamp_logit_scale_

        clamp_logit_scale_(model)


    def evaluate(self, model, step):
        ev = self.cfg.eval
        if not (ev.zeroshot or ev.retrieval):
            return {}
        from evaclip.evals import eval_transforms_and_tokenizer, evaluate

        preprocess, tokenizer = eval_transforms_and_tokenizer(self.cfg.model.name)
        return evaluate(model, ev, tokenizer, preprocess, self.env.device, amp=self.cfg.precision != "fp32",
                        show_progress=False)
