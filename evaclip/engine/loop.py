"""``train(cfg, task_cls)``: the step loop every objective shares.

Order of a run: check the config (task and files), set up the process group, build data, model (wrapped for DDP /
FSDP2), optimizer and schedule; only then touch the disk (run folder, resume). Each step: the task's ``before_step``,
K micro-batches to the device, the task's ``forward_backward``, one ``apply_update`` (finite check, clip, optimizer
step; skipped and counted when non-finite), the task's ``after_update``. Cadence: log, checkpoint, then evaluate (a
checkpoint is on disk before any evaluation starts, so a slow or failing eval never costs the step's work).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from evaclip import checkpoint as ckpt
from evaclip import distributed as du
from evaclip.config import ConfigError, TrainCfg, to_dict, to_yaml
from evaclip.engine import run_dir as rd
from evaclip.engine.ema import WeightEMA
from evaclip.engine.rng import fresh_iter, host_rng_untouched, next_batch, seed_all
from evaclip.engine.signals import StopSignal
from evaclip.engine.state import TrainerState
from evaclip.engine.step import Step, build_step, lr_by_tower
from evaclip.logging import MetricLogger, Throughput, get_logger, read_metrics, setup_console
from evaclip.optim import build_optimizer, build_scheduler
from evaclip.parallel import gathered, wrap_model
from evaclip.precision import set_tf32

log = get_logger("evaclip.train")


class TrainingStopped(RuntimeError):
    """The run cannot continue (e.g. too many consecutive non-finite steps); the message says why and what to do."""


@dataclass
class TrainResult:
    """What a finished, preempted or interrupted run left behind. ``signal`` is the stop signal's number, if any."""

    run_dir: Path
    step: int
    status: str  # "finished" | "preempted"
    checkpoint: Optional[Path] = None
    bad_steps: int = 0
    eval: dict = field(default_factory=dict)
    signal: Optional[int] = None


@contextlib.contextmanager
def as_config_error(section: str):
    """Builders report bad settings as ValueError / FileNotFoundError naming the key: show them as configuration
    errors (a one-line message from the CLI, no traceback)."""
    try:
        yield
    except (ValueError, FileNotFoundError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{section}: {e}") from e


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


def _diverged_message(consecutive: int, step: int, max_bad: int, last_ckpt: Optional[Path]) -> str:
    where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
    return (f"{consecutive} consecutive steps with a non-finite loss or gradient (steps {step - consecutive + 1}.."
            f"{step}; max_bad_steps={max_bad}); stopping: {where}. Lower optim.lr, raise optim.warmup_steps, use "
            "precision=bf16, or check the data.")


def _log_epoch_skips(data, epoch: int, logger: MetricLogger, step: int) -> None:
    """At an epoch's end: the samples skipped in it (corrupt / missing image, missing caption), by reason."""
    by_reason = getattr(data, "skipped_by_reason", None)
    skipped = by_reason(epoch) if by_reason is not None else {}
    logger.event("epoch_end", step=step, epoch=epoch, skipped=skipped)
    if any(skipped.values()):
        log.warning("epoch %d: skipped %s", epoch, ", ".join(f"{n} ({r})" for r, n in skipped.items() if n))


def train(cfg: TrainCfg, task_cls) -> TrainResult:
    """Train ``task_cls`` (a ``evaclip.engine.task.Task`` subclass) according to ``cfg`` (validated)."""
    task_cls.check(cfg)
    env = du.init_distributed(cfg.device, cfg.dist)
    setup_console(env.rank)
    try:
        with rd.hold_run_folder(rd.run_dir_of(cfg), env):  # one run at a time writes a folder (all ranks agree)
            return _run(cfg, task_cls(cfg, env), env)
    finally:
        du.cleanup()


@dataclass
class _Run:
    """Everything a run holds once it is set up: what the loop drives and what a checkpoint saves."""

    cfg: TrainCfg
    task: object
    env: du.DistEnv
    data: object
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    step: Step
    state: TrainerState
    ema: Optional[WeightEMA]
    total_steps: int
    resume_from: Optional[Path]
    logger: Optional[MetricLogger] = None

    @property
    def run_dir(self) -> Path:
        return rd.run_dir_of(self.cfg)

    @property
    def states(self) -> dict:
        """The named stateful entries a checkpoint holds besides model and optimizer."""
        states = {"trainer": self.state, "scheduler": self.scheduler, "scaler": self.step.scaler, "task": self.task}
        return states if self.ema is None else dict(states, ema=self.ema)

    def save(self, stop: StopSignal) -> Path:
        """A checkpoint of the current step (collective; an interrupt waits until it is complete)."""
        cfg, env = self.cfg, self.env
        with stop.critical():
            path = ckpt.save_checkpoint(self.run_dir / "ckpt", self.state.step, self.model, self.optimizer,
                                        states=self.states, config_yaml=to_yaml(cfg), rank=env.rank,
                                        world_size=env.world_size,
                                        strategy=cfg.dist.strategy, keep_last=cfg.ckpt.keep_last,
                                        checksum=cfg.ckpt.checksum)
        self.logger.event("checkpoint", step=self.state.step, path=str(path))
        log.info("checkpoint %s", path)
        return path

    def evaluate(self) -> dict:
        """The task's evaluation, logged under ``eval/`` (and, with weight EMA, the same on the averaged weights under
        ``eval/ema/``); the training RNG streams and weights are left as they were."""
        results = self._evaluate("eval", contextlib.nullcontext())
        if self.ema is not None and self.cfg.ema.eval:
            results.update({f"ema/{k}": v for k, v in
                            self._evaluate("eval/ema", self.ema.swapped_in(du.unwrap(self.model))).items()})
        return results

    def _evaluate(self, prefix: str, weights) -> dict:
        with weights, host_rng_untouched(), gathered(self.model):  # FSDP2: gathered once, uneven per-rank batches
            results = self.task.evaluate(du.unwrap(self.model), self.state.step)
        self.model.train()
        numeric = {k: float(v) for k, v in results.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if numeric:
            self.logger.log_metrics(self.state.step, numeric, prefix=prefix)
            log.info("%s at step %d: %s", prefix, self.state.step,
                     ", ".join(f"{k} {v:.4g}" for k, v in numeric.items()))
        return results

    def log_step(self, out: dict, upd, mean_loss: float, meter: Throughput) -> None:
        """The train metrics of a log step (the only host reads of the loss / logit scale / grad norm)."""
        step, state = self.state.step, self.state
        extras = {k: float(v) for k, v in out.items() if k != "loss" and torch.is_tensor(v) and v.numel() == 1}
        metrics = {"loss": mean_loss, **extras, "grad_norm": float(upd.grad_norm),
                   "epoch": step / state.steps_per_epoch, "samples_seen": step * state.global_batch,
                   "skipped_samples": self.data.skipped(), "bad_steps": state.bad_steps_total,
                   **{f"skipped/{k}": v for k, v in getattr(self.data, "skipped_by_reason", dict)().items()},
                   **{f"lr/{k}": v for k, v in lr_by_tower(self.optimizer).items()}}
        if self.step.scaler.is_enabled():
            metrics["loss_scale"] = self.step.scaler.get_scale()
        metrics.update(meter.update(step, state.global_batch))
        self.logger.log_metrics(step, metrics)
        self.logger.progress(step, metrics)


def _setup(cfg: TrainCfg, task, env: du.DistEnv) -> _Run:
    """Build data, model, optimizer and schedule, checking everything; only then write the run folder and resume."""
    check_global_batch(cfg, env.world_size)
    ckpt_root = rd.run_dir_of(cfg) / "ckpt"
    resume_from = ckpt.resolve_resume(cfg.resume, ckpt_root, cfg.ckpt.checksum)
    if resume_from is None:
        rd.refuse_foreign_checkpoints(cfg)

    # data first: cheap to set up, and it fixes the run length, which the schedule checks before the model is built
    with as_config_error("data"):
        data = task.build_data(cfg.max_steps or 1)
    steps_per_epoch = data.num_batches // cfg.accum_freq
    if steps_per_epoch < 1:
        raise ConfigError(f"config key 'accum_freq' ({cfg.accum_freq}) is larger than the {data.num_batches} "
                          f"batches per epoch of each rank")
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    if cfg.optim.schedule == "cosine" and cfg.optim.warmup_steps >= total_steps:
        raise ConfigError(f"config key 'optim.warmup_steps' ({cfg.optim.warmup_steps}) must be smaller than the "
                          f"run's {total_steps} steps")

    seed_all(cfg.seed)  # identical initial weights on every rank
    model = task.build_model()
    seed_all(cfg.seed + env.rank)  # per-rank streams for token dropping / dropout / masks
    model = wrap_model(model, cfg.dist, env.device, precision=cfg.precision, compile=cfg.model.compile)
    task.setup(du.unwrap(model))
    with as_config_error("optim"):
        optimizer = build_optimizer(model, cfg.optim)
        scheduler = build_scheduler(optimizer, cfg.optim, total_steps)
    if set_tf32(cfg.precision, env.device, cfg.tf32):
        log.info("precision fp32 on CUDA: matmuls in TF32 (tf32=false for exact fp32)")
    step = build_step(cfg, task, model, optimizer, env.device)
    ema = WeightEMA(du.unwrap(model), cfg.ema) if cfg.ema.decay > 0 else None  # after wrapping: FSDP2 shards
    if ema is not None:
        step.hooks.append(ema.update)
    state = TrainerState(steps_per_epoch, cfg.accum_freq, cfg.data.batch_size * cfg.accum_freq * env.world_size)
    run = _Run(cfg, task, env, data, model, optimizer, scheduler, step, state, ema, total_steps, resume_from)
    saved_schedule = ckpt.saved_schedule(resume_from) if resume_from is not None else None
    if saved_schedule is not None:
        with as_config_error("resume"):  # a run extended past its schedule's end must say how (before any write)
            scheduler.plan_resume(saved_schedule)

    # every check passed: from here on the run writes to its folder
    if env.is_main:
        rd.clean_stale_tmp(ckpt_root)
        rd.write_run_info(run.run_dir, cfg, env.world_size, env.device)
    du.barrier()
    if resume_from is not None:
        ckpt.load_checkpoint(resume_from, model, optimizer, states=run.states, rank=env.rank,
                             world_size=env.world_size, strategy=cfg.dist.strategy)
        log.info("resumed from %s at step %d; %s", resume_from, state.step,
                 scheduler.resume_note or "the lr schedule restarts (the checkpoint saved none)")
    return run


def _ended(run_dir: Path, step: int) -> bool:
    """Whether the run's metrics log ends (its last start / resume / end event) with a finished ``end`` at ``step``: a
    run killed or stopped between its final checkpoint and the end of its final evaluation has none. A run folder
    without a metrics log counts as ended."""
    if not (Path(run_dir) / "metrics.jsonl").is_file():
        return True
    for record in reversed(read_metrics(run_dir)):
        if record.get("event") in ("end", "resume", "start"):
            return (record.get("event"), record.get("step"), record.get("status")) == ("end", step, "finished")
    return False


def _run(cfg: TrainCfg, task, env: du.DistEnv) -> TrainResult:
    run = _setup(cfg, task, env)
    state, total_steps = run.state, run.total_steps
    finished = state.step >= total_steps
    if finished and du.broadcast_object(_ended(run.run_dir, state.step) if env.is_main else None):
        log.info("run %s is finished (step %d of %d): nothing to do; train longer with resume=auto max_steps=N "
                 "optim.extend=segment (a new warmup + schedule over the added steps) or optim.extend=tail (the added "
                 "steps at the schedule's final lr)",
                 run.run_dir, state.step, total_steps)
        return TrainResult(run_dir=run.run_dir, step=state.step, status="finished", checkpoint=run.resume_from,
                           bad_steps=state.bad_steps_total)
    run.logger = logger = MetricLogger(run.run_dir, cfg.log, rank=env.rank, total_steps=total_steps,
                                       run_name=cfg.name or "run", config=to_dict(cfg))
    logger.event("resume" if run.resume_from else "start", step=state.step, world_size=env.world_size,
                 checkpoint=str(run.resume_from) if run.resume_from else None, global_batch=state.global_batch,
                 total_steps=total_steps, task=cfg.task)
    if finished:  # stopped after its final checkpoint, before its final evaluation and end: do those now
        log.info("run %s: its final checkpoint (step %d) is saved but the run stopped before its final evaluation; "
                 "evaluating now", run.run_dir, state.step)
        try:
            eval_results = run.evaluate()
            logger.event("end", step=state.step, status="finished")
        finally:
            logger.close()
        return TrainResult(run_dir=run.run_dir, step=state.step, status="finished", checkpoint=run.resume_from,
                           bad_steps=state.bad_steps_total, eval=eval_results)
    log.info("run %s (%s): %d steps of %d samples (%d per rank x %d accum x %d ranks), %d steps per epoch, %s on %s",
             run.run_dir, cfg.task, total_steps, state.global_batch, cfg.data.batch_size, cfg.accum_freq,
             env.world_size, state.steps_per_epoch, cfg.precision, env.device)
    try:
        return _loop(run)
    finally:
        logger.close()


def _loop(run: _Run) -> TrainResult:
    """The step loop: steps until the end (or a stop request), logging, checkpointing, then evaluating."""
    cfg, task, data, model, state, logger = run.cfg, run.task, run.data, run.model, run.state, run.logger
    epoch = state.epoch
    data.set_epoch(epoch, state.batch_in_epoch)
    batches = fresh_iter(data.loader)
    last_ckpt, status, eval_results = run.resume_from, "finished", {}
    meter = Throughput(state.step, run.total_steps)
    model.train()
    with StopSignal() as stop:
        stop.start_at(state.step)
        while state.step < run.total_steps:
            if state.epoch != epoch:
                _log_epoch_skips(data, epoch, logger, state.step)
                epoch = state.epoch
                data.set_epoch(epoch, 0)
                batches = fresh_iter(data.loader)
            task.before_step(model, state.step, logger)
            micro = [task.to_device(next_batch(batches, epoch)) for _ in range(cfg.accum_freq)]
            out, upd = run.step(micro, stop.poll(state.step + 1))
            consecutive_bad = state.record_update(upd.bad)
            if upd.bad:  # named by its number in the metrics log and the checkpoints: state.step + 1
                logger.event("bad_step", step=state.step + 1, loss_nonfinite=upd.bad_loss,
                             grad_nonfinite=upd.bad_grad, consecutive=consecutive_bad)
                log.warning("step %d: non-finite %s, update skipped (%d in a row, %d total)", state.step + 1,
                            "loss" if upd.bad_loss else "gradient norm", consecutive_bad, state.bad_steps_total)
                if consecutive_bad >= cfg.max_bad_steps:
                    raise TrainingStopped(_diverged_message(consecutive_bad, state.step + 1, cfg.max_bad_steps,
                                                            last_ckpt))
            else:
                state.add_loss(out["loss"])
            run.scheduler.step()  # also on skipped steps: the schedule follows the data
            state.step += 1
            step, last = state.step, state.step == run.total_steps

            if step % cfg.log.every == 0 or last:
                run.log_step(out, upd, state.pop_mean_loss(), meter)
            if upd.stop:
                status = "preempted"
                last_ckpt = run.save(stop)
                break
            if not upd.bad and cfg.ckpt.every and step % cfg.ckpt.every == 0 and not last:
                last_ckpt = run.save(stop)
            if cfg.eval.every and step % cfg.eval.every == 0 and not last:
                eval_results = run.evaluate()
        if status == "finished":  # the last step is never among the periodic saves (``not last``)
            last_ckpt = run.save(stop)
            eval_results = run.evaluate() or eval_results
    logger.event("end", step=state.step, status=status)
    return TrainResult(run_dir=run.run_dir, step=state.step, status=status, checkpoint=last_ckpt,
                       bad_steps=state.bad_steps_total, eval=eval_results, signal=stop.requested)
