"""The training run: build model, data, optimizer, loss and checkpointer from a config, then drive them.

Shapes: K micro-batches per optimizer step (``accum_freq``), B micro-batch per rank, D embedding dim,
C/H/W image channels/height/width, L context length.

Launch: ``python -m evaclip.train RECIPE [key=value ...]`` (one process), ``torchrun --nproc_per_node=N -m
evaclip.train RECIPE ...`` (N processes, DDP), or ``evaclip train ...``.

Host syncs: the hot path reads the device once per step, a 3-float tensor (non-finite loss, non-finite gradient norm,
stop request) all-reduced over ranks. Skipping a NaN/Inf step *without* any sync would mean always running the
optimizer with masked gradients, which still decays LAMB's moments and applies weight decay: not a skipped step. One
small read per step costs far less than a step (the fp16 loss scaler reads its overflow flag every step anyway), and
it also lets every rank agree on skipping and on stopping (SIGTERM) at the same step. Losses and the logit scale stay
on the device and are read at log steps only.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import yaml
from torch import nn

from evaclip import checkpoint as ckpt
from evaclip import distributed as du
from evaclip.config import ConfigError, TrainCfg, load_config, to_dict
from evaclip.data.transforms import trim_padding
from evaclip.fsdp import gathered, make_grad_scaler
from evaclip.logging import MetricLogger, Throughput, get_logger, setup_console
from evaclip.losses import build_loss
from evaclip.optim import build_optimizer, build_scheduler, clamp_logit_scale_, clip_grad_norm_, lock_towers

log = get_logger("evaclip.train")


class TrainingStopped(RuntimeError):
    """The run cannot continue (e.g. too many consecutive non-finite steps); the message says why and what to do."""


@dataclass
class TrainResult:
    """What a finished (or preempted) run left behind."""

    run_dir: Path
    step: int
    status: str  # "finished" | "preempted"
    checkpoint: Optional[Path] = None
    bad_steps: int = 0
    eval: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------------
# run folder
# ----------------------------------------------------------------------------------------------------------------------
def run_dir_of(cfg: TrainCfg) -> Path:
    return Path(cfg.output_dir) / (cfg.name or "run")


def config_yaml(cfg: TrainCfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def git_revision() -> dict:
    """The evaclip source tree's commit and whether it has uncommitted changes (None outside a git checkout)."""
    repo = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return {"commit": None, "dirty": None}
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10)
        return {"commit": rev.stdout.strip(), "dirty": bool(dirty.stdout.strip()) if dirty.returncode == 0 else None}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def write_run_info(run_dir: Path, cfg: TrainCfg, env: du.DistEnv) -> None:
    """``config.yaml`` (the resolved config) and ``run_info.json`` (git revision, versions, launch) in the run dir."""
    from evaclip import __version__

    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_text(config_yaml(cfg), run_dir / "config.yaml")
    info = {"git": git_revision(), "evaclip": __version__, "torch": torch.__version__,
            "python": platform.python_version(), "world_size": env.world_size, "device": str(env.device),
            "argv": sys.argv, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    ckpt.atomic_write_text(json.dumps(info, indent=1), run_dir / "run_info.json")


# ----------------------------------------------------------------------------------------------------------------------
# building blocks
# ----------------------------------------------------------------------------------------------------------------------
def check_config(cfg: TrainCfg) -> None:
    """Checks that need the registries or the filesystem; run before any work (config.validate did the rest)."""
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
    if cfg.dist.strategy == "fsdp" or cfg.dist.cpu_offload:
        from evaclip.fsdp import check_fsdp_config

        check_fsdp_config(cfg)


def check_global_batch(cfg: TrainCfg, world_size: int) -> None:
    """A recipe's ``global_batch`` must be what this launch gives; say which ``accum_freq`` would make it so."""
    if cfg.global_batch is None:
        return
    got = cfg.data.batch_size * cfg.accum_freq * world_size
    if got != cfg.global_batch:
        per_step = cfg.data.batch_size * world_size
        hint = (f"set accum_freq={cfg.global_batch // per_step}" if cfg.global_batch % per_step == 0
                else "change data.batch_size / accum_freq")
        raise ConfigError(
            f"config key 'global_batch' is {cfg.global_batch} but data.batch_size {cfg.data.batch_size} x accum_freq "
            f"{cfg.accum_freq} x {world_size} processes = {got}: {hint}, or global_batch=null to train with {got}")


@contextlib.contextmanager
def _as_config_error(section: str):
    """Builders report bad settings as ValueError / FileNotFoundError with a message naming the key: show them as
    configuration errors (a one-line message from the CLI, no traceback)."""
    try:
        yield
    except (ValueError, FileNotFoundError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{section}: {e}") from e


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(cfg: TrainCfg) -> nn.Module:
    """The CLIP model of ``cfg.model`` (on the CPU, same initial weights on every rank)."""
    from evaclip.models import create_model

    m = cfg.model
    return create_model(m.name, pretrained=m.pretrained, image_init=m.image_init, text_init=m.text_init,
                        attn_backend=m.attn_backend, token_drop=m.token_drop,
                        grad_checkpointing=m.grad_checkpointing, **m.overrides)


def build_data(cfg: TrainCfg, env: du.DistEnv, preprocess, tokenizer, steps_hint: int):
    """The train ``DataInfo`` of this rank (shards, or synthetic batches shaped for the model)."""
    if cfg.data.synthetic:
        from evaclip.data.synthetic import SyntheticDataInfo
        from evaclip.models import get_model_config

        mc = get_model_config(cfg.model.name)
        per_rank = (cfg.data.train_num_samples // (cfg.data.batch_size * env.world_size)
                    if cfg.data.train_num_samples else steps_hint * cfg.accum_freq)
        return SyntheticDataInfo(cfg.data.batch_size, mc.vision.image_size, mc.text.context_length,
                                 mc.text.vocab_size, max(1, per_rank), seed=cfg.seed * 1000 + env.rank)
    from evaclip.data import build_train_loader

    return build_train_loader(cfg.data, preprocess, tokenizer, rank=env.rank, world_size=env.world_size,
                              seed=cfg.seed)


def autocast_for(precision: str, device: torch.device):
    """Autocast context factory: fp32 -> none; bf16 / fp16 -> torch.autocast on the device type."""
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ConfigError("config key 'precision': bf16 is not supported on this GPU; use fp16")
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def _host_rng_untouched():
    """Run a block without moving the host RNG streams (torch CPU, python, numpy)."""
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        random.setstate(states[1])
        np.random.set_state(states[2])


def fresh_iter(loader):
    """``iter(loader)`` without touching the host RNG (a DataLoader draws its worker base seed from it)."""
    with _host_rng_untouched():
        return iter(loader)


def next_batch(batches, epoch: int = 0):
    """``next(batches)`` without touching the host RNG: with workers=0, or when a new iterator starts, the data
    pipeline runs here and may draw random numbers. Keeping it off the model's stream (token-drop masks, dropout)
    makes that stream a function of the step alone, which exact resume needs."""
    with _host_rng_untouched():
        try:
            return next(batches)
        except StopIteration as e:
            raise RuntimeError(f"the train loader ended early in epoch {epoch}: every rank must yield the "
                               "DataInfo's num_batches batches per epoch") from e


def _to_device(batch, device: torch.device, trim_text: bool = False):
    """Move a batch to the device; ``trim_text`` first cuts the text padding on the host (no device sync)."""
    images_BCHW, tokens_BL = batch
    if trim_text:
        tokens_BL = trim_padding(tokens_BL)
    return images_BCHW.to(device, non_blocking=True), tokens_BL.to(device, non_blocking=True)


def _token_drop_phase(cfg: TrainCfg, bare: nn.Module, step: int, current: Optional[float], logger) -> float:
    """Set the image tower's token-drop ratio for ``step`` (``model.token_drop`` until ``model.token_drop_until``,
    then 0: the unmasked tuning phase); returns the ratio in force."""
    until = cfg.model.token_drop_until
    want = cfg.model.token_drop if (until is None or step < until) else 0.0
    if want != current and cfg.model.token_drop > 0:
        bare.visual.set_token_drop(want)
        if current is not None:
            log.info("step %d: token drop %.2f -> %.2f", step, current, want)
            logger.event("token_drop", step=step, ratio=want)
    return want


@dataclass
class Update:
    """Outcome of one optimizer step (host values, agreed by all ranks)."""

    bad_loss: bool
    bad_grad: bool
    stop: bool
    bad: bool
    grad_norm: torch.Tensor


def apply_update(model, optimizer, scaler, grad_clip_norm, loss, stop_requested: bool) -> Update:
    """Unscale (fp16), clip, and step the optimizer, unless the loss or the gradient norm is non-finite on any rank.

    The one host read of the step is here: a 3-float tensor [loss non-finite, grad norm non-finite, stop requested],
    max-reduced over ranks so every rank skips / stops at the same step. A skipped step zeroes the gradients and
    leaves parameters and optimizer state untouched. With fp16, overflowing gradients are the loss scaler's business
    (it skips the step and lowers the scale); only a non-finite loss counts as a bad step there.
    """
    if scaler.is_enabled():
        scaler.unscale_(optimizer)
    grad_norm = clip_grad_norm_(model, grad_clip_norm)
    dev = loss.device
    flags = torch.stack([(~torch.isfinite(loss)).float(), (~torch.isfinite(grad_norm.to(dev))).float(),
                         torch.tensor(float(stop_requested), device=dev)])
    bad_loss, bad_grad, stop = (v > 0 for v in du.all_reduce_(flags, "max").tolist())
    bad = bad_loss or (bad_grad and not scaler.is_enabled())
    if bad:
        if scaler.is_enabled():
            scaler.update()  # consumes the inf check recorded by unscale_, lowers the scale
    elif scaler.is_enabled():
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if not bad:
        clamp_logit_scale_(model)
    return Update(bad_loss=bad_loss, bad_grad=bad_grad, stop=stop, bad=bad, grad_norm=grad_norm)


def _diverged_message(consecutive: int, step: int, max_bad: int, last_ckpt: Optional[Path]) -> str:
    where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
    return (f"{consecutive} consecutive steps with a non-finite loss or gradient (steps {step - consecutive + 1}.."
            f"{step}; max_bad_steps={max_bad}); stopping: {where}. Lower optim.lr, raise optim.warmup_steps, use "
            "precision=bf16, or check the data.")


def _scale_grad(t: Optional[torch.Tensor], factor: float) -> Optional[torch.Tensor]:
    """Same value as ``t``, gradient multiplied by ``factor``."""
    if t is None or factor == 1.0:
        return t
    return t * factor + t.detach() * (1.0 - factor)


class _DeviceRng:
    """Snapshot / restore of the torch RNG used by the model on ``device`` (token-drop masks, dropout)."""

    def __init__(self, device: torch.device):
        self.device = device

    def get(self):
        cpu = torch.get_rng_state()
        return (cpu, torch.cuda.get_rng_state(self.device)) if self.device.type == "cuda" else (cpu, None)

    def set(self, state) -> None:
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], self.device)


def _grad_sync(model: nn.Module, enabled: bool):
    """Context: gradient all-reduce on (last micro-batch) or off (earlier ones) for DDP / FSDP2 / plain models."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if enabled else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def forward_backward(model: nn.Module, loss_fn: nn.Module, micro: list, autocast, scaler=None,
                     device: Optional[torch.device] = None) -> dict[str, torch.Tensor]:
    """Forward + backward of one optimizer step over ``micro`` = K ``(images_BCHW, tokens_BL)`` micro-batches.

    K == 1: the plain step. K > 1 (open_clip's accum_freq scheme): a no-grad pass caches the features of every
    micro-batch; then each micro-batch is recomputed with grad and the loss is taken over all K*B pairs, its own
    features live and the others' cached, so the gradients summed over the K backward passes are those of one batch of
    K*B. Two details make that exact: each recompute replays the RNG state of its cached pass (same token-drop
    mask, so cached and live features agree), and the logit scale / bias gradient is scaled by 1/K (every one of the
    K losses depends on them, where the big batch's loss counts them once).

    Returns detached device tensors: ``loss`` and ``logit_scale`` (no host sync).
    """
    device = device or micro[0][0].device
    k = len(micro)

    def backward(loss):
        (scaler.scale(loss) if scaler is not None and scaler.is_enabled() else loss).backward()

    if k == 1:
        images_BCHW, tokens_BL = micro[0]
        with autocast():
            out = model(images_BCHW, tokens_BL)
            loss = loss_fn(out.image_features, out.text_features, out.logit_scale, out.logit_bias,
                           output_dict=True)["loss"]
        backward(loss)
        return {"loss": loss.detach(), "logit_scale": out.logit_scale.detach()}

    rng = _DeviceRng(device)
    states, img_cache, txt_cache = [], [], []
    with torch.no_grad():
        for images_BCHW, tokens_BL in micro:
            states.append(rng.get())
            with autocast():
                out = model(images_BCHW, tokens_BL)
            img_cache.append(out.image_features)
            txt_cache.append(out.text_features)
    end_state = rng.get()
    for j, (images_BCHW, tokens_BL) in enumerate(micro):
        rng.set(states[j])
        with _grad_sync(model, j == k - 1):
            with autocast():
                out = model(images_BCHW, tokens_BL)
                img_KBD = torch.cat(img_cache[:j] + [out.image_features] + img_cache[j + 1:])
                txt_KBD = torch.cat(txt_cache[:j] + [out.text_features] + txt_cache[j + 1:])
                loss = loss_fn(img_KBD, txt_KBD, _scale_grad(out.logit_scale, 1.0 / k),
                               _scale_grad(out.logit_bias, 1.0 / k), output_dict=True)["loss"]
            backward(loss)
    rng.set(end_state)
    return {"loss": loss.detach(), "logit_scale": out.logit_scale.detach()}


def lr_by_tower(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The highest lr of each tower's groups (the top layer's, with layer-wise decay)."""
    out: dict[str, float] = {}
    for g in optimizer.param_groups:
        tower = g.get("tower", "all")
        out[tower] = max(out.get(tower, 0.0), g["lr"])
    return out


class _StopSignal:
    """SIGTERM (and SIGINT) set a flag; the loop checkpoints and exits at the end of the current step."""

    def __init__(self):
        self.requested = False
        self._previous: dict = {}

    def __enter__(self):
        if threading_main():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True
        log.warning("received %s: saving a checkpoint at the end of this step, then exiting",
                    signal.Signals(signum).name)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# ----------------------------------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------------------------------
def main(cfg: TrainCfg) -> TrainResult:
    """Train according to ``cfg`` (already validated by ``load_config``); see the module docstring."""
    check_config(cfg)
    env = du.init_distributed(cfg)
    setup_console(env.rank)
    try:
        return _run(cfg, env)
    finally:
        du.cleanup()


def _run(cfg: TrainCfg, env: du.DistEnv) -> TrainResult:
    check_global_batch(cfg, env.world_size)
    run_dir = run_dir_of(cfg)
    ckpt_root = run_dir / "ckpt"
    if env.is_main:
        write_run_info(run_dir, cfg, env)
    du.barrier()

    # data first: it is cheap to set up and fixes the run length, which the schedule checks before the model is built
    preprocess = tokenizer = None
    if not cfg.data.synthetic:
        from evaclip.data.transforms import get_tokenizer, get_transforms

        preprocess, tokenizer = get_transforms(cfg.model.name, train=True), get_tokenizer(cfg.model.name)
    with _as_config_error("data"):
        data = build_data(cfg, env, preprocess, tokenizer, cfg.max_steps or 1)
    steps_per_epoch = data.num_batches // cfg.accum_freq
    if steps_per_epoch < 1:
        raise ConfigError(f"config key 'accum_freq' ({cfg.accum_freq}) is larger than the {data.num_batches} "
                          f"batches per epoch of each rank")
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    if cfg.optim.schedule == "cosine" and cfg.optim.warmup_steps >= total_steps:
        raise ConfigError(f"config key 'optim.warmup_steps' ({cfg.optim.warmup_steps}) must be smaller than the "
                          f"run's {total_steps} steps")

    seed_all(cfg.seed)  # identical initial weights on every rank
    model = build_model(cfg)
    seed_all(cfg.seed + env.rank)  # per-rank streams for token dropping / dropout
    lock_towers(model, cfg.optim)  # before DDP, which registers only trainable parameters
    if cfg.model.compile and cfg.dist.strategy == "ddp":
        model.compile()
    model = du.wrap_model(model, cfg, env.device)
    bare = du.unwrap(model)

    with _as_config_error("optim"):
        optimizer = build_optimizer(model, cfg.optim)
        scheduler = build_scheduler(optimizer, cfg.optim, total_steps)
    scaler = make_grad_scaler(cfg.precision, cfg.dist.strategy, env.device)  # FSDP2: inf check over all shards
    loss_fn = build_loss(cfg.loss)
    autocast = autocast_for(cfg.precision, env.device)

    step = 0
    bad_total = 0
    resume_from = ckpt.resolve_resume(cfg.resume, ckpt_root, cfg.ckpt.checksum)
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, model, optimizer, scheduler=scheduler, scaler=scaler,
                                     rank=env.rank, world_size=env.world_size, strategy=cfg.dist.strategy)
        step, bad_total = int(state["step"]), int(state.get("bad_steps_total", 0))
        if state.get("steps_per_epoch") not in (None, steps_per_epoch):
            log.warning("steps per epoch changed from %s to %d since the checkpoint (batch size, data or world "
                        "size changed): the data position is recomputed from the step", state["steps_per_epoch"],
                        steps_per_epoch)
        log.info("resumed from %s at step %d", resume_from, step)
    global_batch = cfg.data.batch_size * cfg.accum_freq * env.world_size
    logger = MetricLogger(run_dir, cfg.log, rank=env.rank, total_steps=total_steps, run_name=cfg.name or "run",
                          config=to_dict(cfg))
    logger.event("resume" if resume_from else "start", step=step, checkpoint=str(resume_from) if resume_from else None,
                 world_size=env.world_size, global_batch=global_batch, total_steps=total_steps)
    log.info("run %s: %d steps of %d samples (%d per rank x %d accum x %d ranks), %d steps per epoch, %s on %s",
             run_dir, total_steps, global_batch, cfg.data.batch_size, cfg.accum_freq, env.world_size,
             steps_per_epoch, cfg.precision, env.device)

    def save(at_step: int) -> Path:
        trainer_state = {"epoch": at_step // steps_per_epoch,
                         "batch_in_epoch": (at_step % steps_per_epoch) * cfg.accum_freq,
                         "steps_per_epoch": steps_per_epoch, "samples_seen": at_step * global_batch,
                         "bad_steps_total": bad_total}
        path = ckpt.save_checkpoint(ckpt_root, at_step, model, optimizer, scheduler=scheduler, scaler=scaler,
                                    trainer_state=trainer_state, config_yaml=config_yaml(cfg), rank=env.rank,
                                    world_size=env.world_size, strategy=cfg.dist.strategy,
                                    keep_last=cfg.ckpt.keep_last, checksum=cfg.ckpt.checksum)
        logger.event("checkpoint", step=at_step, path=str(path))
        log.info("checkpoint %s", path)
        return path

    epoch = step // steps_per_epoch
    data.set_epoch(epoch, (step % steps_per_epoch) * cfg.accum_freq)
    batches = fresh_iter(data.loader)
    drop_on = None
    consecutive_bad = 0
    last_ckpt = resume_from
    status = "finished"
    loss_sum = torch.zeros((), device=env.device)
    loss_n = 0
    meter = Throughput(step, total_steps)
    eval_results: dict = {}
    model.train()
    try:
        with _StopSignal() as stop:
            while step < total_steps:
                # the data position is a function of the step: epoch e holds steps [e * spe, (e + 1) * spe)
                if step // steps_per_epoch != epoch:
                    epoch = step // steps_per_epoch
                    data.set_epoch(epoch, 0)
                    batches = fresh_iter(data.loader)
                drop_on = _token_drop_phase(cfg, bare, step, drop_on, logger)
                micro = [_to_device(next_batch(batches, epoch), env.device, cfg.data.trim_text_padding)
                         for _ in range(cfg.accum_freq)]

                out = forward_backward(model, loss_fn, micro, autocast, scaler, env.device)
                upd = apply_update(model, optimizer, scaler, cfg.optim.grad_clip_norm, out["loss"], stop.requested)
                if upd.bad:
                    consecutive_bad += 1
                    bad_total += 1
                    logger.event("bad_step", step=step, loss_nonfinite=upd.bad_loss, grad_nonfinite=upd.bad_grad,
                                 consecutive=consecutive_bad)
                    log.warning("step %d: non-finite %s, update skipped (%d in a row, %d total)", step,
                                "loss" if upd.bad_loss else "gradient norm", consecutive_bad, bad_total)
                    if consecutive_bad >= cfg.max_bad_steps:
                        raise TrainingStopped(_diverged_message(consecutive_bad, step, cfg.max_bad_steps, last_ckpt))
                else:
                    consecutive_bad = 0
                    loss_sum += out["loss"].float()
                    loss_n += 1
                scheduler.step()  # also on skipped steps: the schedule follows the data
                step += 1

                if step % cfg.log.every == 0 or step == total_steps:
                    metrics = {"loss": (loss_sum / loss_n).item() if loss_n else float("nan"),
                               "logit_scale": float(out["logit_scale"]), "grad_norm": float(upd.grad_norm),
                               "epoch": step / steps_per_epoch, "samples_seen": step * global_batch,
                               "skipped_samples": data.skipped(), "bad_steps": bad_total}
                    metrics.update({f"lr/{k}": v for k, v in lr_by_tower(optimizer).items()})
                    if scaler.is_enabled():
                        metrics["loss_scale"] = scaler.get_scale()
                    metrics.update(meter.update(step, global_batch))
                    logger.log_metrics(step, metrics)
                    logger.progress(step, metrics)
                    loss_sum.zero_()
                    loss_n = 0
                if cfg.eval.every and step % cfg.eval.every == 0 and step < total_steps:
                    eval_results = evaluate(model, cfg, env, logger, step)
                if upd.stop:
                    status = "preempted"
                    last_ckpt = save(step)
                    break
                if not upd.bad and cfg.ckpt.every and step % cfg.ckpt.every == 0 and step < total_steps:
                    last_ckpt = save(step)
        if status == "finished":
            eval_results = evaluate(model, cfg, env, logger, step) or eval_results
            if last_ckpt is None or last_ckpt.name != ckpt.step_dir_name(step):  # not when resuming a finished run
                last_ckpt = save(step)
        logger.event("end", step=step, status=status)
    finally:
        logger.close()
    return TrainResult(run_dir=run_dir, step=step, status=status, checkpoint=last_ckpt, bad_steps=bad_total,
                       eval=eval_results)


def evaluate(model: nn.Module, cfg: TrainCfg, env: du.DistEnv, logger: MetricLogger, step: int) -> dict:
    """Zero-shot / retrieval evaluation of ``cfg.eval`` via ``evaclip.evals.evaluate`` (every rank takes part);
    logged under ``eval/``. The training RNG stream is left where it was, so evaluating does not change training."""
    if not (cfg.eval.zeroshot or cfg.eval.retrieval):
        return {}
    from evaclip.evals import eval_transforms_and_tokenizer
    from evaclip.evals import evaluate as run_evals

    preprocess, tokenizer = eval_transforms_and_tokenizer(cfg.model.name)
    state = torch.get_rng_state()
    try:
        with gathered(model):  # FSDP2: gather once, so ranks may run different numbers of eval batches
            results = run_evals(du.unwrap(model), cfg.eval, tokenizer, preprocess, env.device,
                                amp=cfg.precision != "fp32", show_progress=False)
    finally:
        torch.set_rng_state(state)
        model.train()
    numeric = {k: float(v) for k, v in results.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    logger.log_metrics(step, numeric, prefix="eval")
    log.info("eval at step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in numeric.items()))
    return results


# ----------------------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------------------
USAGE = """usage: evaclip train RECIPE [key=value ...]
       python -m evaclip.train RECIPE [key=value ...]
       torchrun --nproc_per_node=N -m evaclip.train RECIPE [key=value ...]

RECIPE is a YAML file or the name of one in recipes/ (e.g. demo_cpu). Overrides are dotted config keys
(optim.lr=1e-3 data.batch_size=64 resume=auto); see evaclip/config.py for every key."""


def cli(argv: Optional[list[str]] = None) -> int:
    """Parse ``RECIPE [key=value ...]``, validate the whole config (before any work), train. Returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    try:
        cfg = load_config(argv[0], argv[1:])
    except ConfigError as e:
        print(f"evaclip train: {e}", file=sys.stderr)
        return 2
    try:
        result = main(cfg)
    except (ConfigError, TrainingStopped, ckpt.CheckpointError) as e:
        print(f"evaclip train: {type(e).__name__}: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    if result.status == "preempted":
        return 128 + signal.SIGTERM  # not finished: a wrapper must not go on to evaluation / export
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    du.exit_process(cli())

