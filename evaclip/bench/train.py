"""Training-step benchmark: samples/s, step time, peak memory and MFU of a full step, optionally vs open_clip.

Shapes: B batch, C channels, H/W image side, L context length, D embedding dim.

A step is what each trainer does per optimizer step on synthetic data. evaclip: the engine's own step (``build_step``)
(``ClipTask.forward_backward``, then ``apply_update``: the finite check with its one host read, gradient clipping at
the recipes' 5.0, the optimizer step; then the logit-scale clamp). open_clip: open_clip_train's step (autocast forward,
``ClipLoss``, backward, ``clip_grad_norm_`` at the same 5.0, optimizer step, zero_grad, logit-scale clamp).
``--vs open_clip`` builds open_clip's equivalent model in the same process: its EVA02 path (a timm ``Eva`` trunk
with the token-pool head as projection, registered under a name that encodes our shapes, so no weights are fetched),
its text transformer, its ``ClipLoss``, the same precision and patch-dropout ratio. Runs alternate (ours, theirs,
theirs, ours, ...) so a busy shared machine slows both alike; the figure per run is the median over rounds.

Optimizers: the headline pair is what each user gets: evaclip's foreach LAMB vs ``torch_optimizer.Lamb`` on
open_clip (the LAMB that EVA-CLIP's public training code uses; open_clip itself only ships AdamW). A third run,
open_clip's model with evaclip's foreach LAMB, isolates the model + loss speedup from the optimizer speedup.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from evaclip.bench.flops import count_flops, matmul_peak_flops, mfu
from evaclip.bench.measure import PeakMemory, median, memory_in_use, release_host_memory, time_calls
from evaclip.bench.report import section

__all__ = ["TRAIN_COLUMNS", "Runner", "TrainBenchCfg", "bench_train", "find_max_batch", "flops_per_sample",
           "open_clip_model", "resolve_device", "resolve_dtype", "run"]

TRAIN_COLUMNS = [("impl", "impl"), ("optimizer", "optimizer"), ("model", "model"), ("params_m", "params (M)"),
                 ("precision", "precision"), ("token_drop", "token drop"), ("batch", "B"),
                 ("samples_per_s", "samples/s"), ("step_ms", "step ms"), ("peak_mem_mb", "peak mem MB"),
                 ("gflops_per_sample", "GFLOP/sample"), ("mfu_pct", "MFU %"), ("host_syncs", "host syncs/step")]
DESCRIPTION = ("Training-step time, throughput, peak memory and MFU of an evaclip model on synthetic batches "
               "(with --vs open_clip: open_clip's equivalent model in the same run, alternating rounds).")
GRAD_CLIP_NORM = 5.0  # both sides clip at the recipes' norm (open_clip_train: --grad-clip-norm 5.0)


def resolve_device(name: str) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` through the trainer's own rule (``distributed.resolve_device``)."""
    from evaclip.distributed import resolve_device as trainer_device
    from evaclip.errors import ConfigError

    kind, _, index = name.partition(":")
    try:
        return trainer_device(kind, int(index or 0))
    except (ConfigError, ValueError) as e:
        raise ValueError(f"--device {name!r}: {e}") from None


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bf16 on CUDA, fp32 on CPU; else fp32 | bf16 | fp16 (the trainer's dtype table)."""
    from evaclip.errors import ConfigError
    from evaclip.precision import amp_dtype

    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return amp_dtype(precision) or torch.float32
    except ConfigError:
        raise ValueError(f"precision must be fp32, bf16, fp16 or auto, got {precision!r}") from None


@dataclass
class TrainBenchCfg:
    """What ``bench train`` measures; one row per (implementation, optimizer, token-drop ratio)."""

    model: str = "EVA02-CLIP-B-16"
    batch: int | str = 8  # int, or "auto": the largest batch that fits (CUDA only), searched per implementation
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 (autocast, fp32 master weights)
    token_drop: list = field(default_factory=lambda: [0.5])
    device: str = "auto"
    attn_backend: str = "auto"
    compile: bool = False  # torch.compile the towers (evaclip's model.compile)
    vs: Optional[str] = None  # "open_clip"
    steps: int = 3  # timed steps per round
    warmup: int = 2  # untimed steps before the first round (after the memory step)
    rounds: int = 3
    overrides: dict = field(default_factory=dict)  # architecture overrides for create_model (e.g. depth)
    seed: int = 0
    count_flops: bool = True
    profile: Optional[str] = None  # directory: write a torch.profiler table + trace per run
    peak_size: Optional[int] = None  # side of the matmul that measures the device peak (default 2048 CPU, 8192 CUDA)
    threads: Optional[int] = None  # torch CPU threads (default: torch's choice)


@dataclass
class Runner:
    """One measured configuration: a model, its optimizer and loss, and a synthetic batch on the device."""

    impl: str
    optimizer_name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    forward_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (images, tokens) -> scalar loss
    batch: tuple[torch.Tensor, torch.Tensor]
    token_drop: float
    amp_dtype: Optional[torch.dtype]
    peak_mem: Optional[int] = None
    flops: Optional[int] = None
    times: list = field(default_factory=list)
    train_step: Optional[Callable[[], None]] = None  # evaclip: the engine's own step (replaces the open_clip step)

    @property
    def batch_size(self) -> int:
        return self.batch[0].shape[0]

    def step(self) -> None:
        """One optimizer step: the engine's step (``build_step``) for evaclip; open_clip_train's step otherwise
        (forward, loss, backward, gradient clipping, optimizer step, zero_grad, logit-scale clamp)."""
        if self.train_step is not None:
            self.train_step()
            return
        images_BCHW, tokens_BL = self.batch
        device_type = images_BCHW.device.type
        amp = torch.autocast(device_type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()
        with amp:
            loss = self.forward_loss(images_BCHW, tokens_BL)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), GRAD_CLIP_NORM, norm_type=2.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100.0))


# ---------------------------------------------------------------------------------------------------------- builders


def _evaclip_model(cfg: TrainBenchCfg, token_drop: float, device: torch.device) -> nn.Module:
    from evaclip.models import create_model

    model = create_model(cfg.model, attn_backend=cfg.attn_backend, token_drop=token_drop, device=device,
                         precision=resolve_dtype(cfg.precision, device), **cfg.overrides)
    model = model.train()
    if cfg.compile:
        # In place (nn.Module.compile), so parameter names and the optimizer hooks stay as they are.
        model.visual.compile()
        model.text.compile()
    return model


def _evaclip_loss_fn(model: nn.Module) -> Callable:
    from evaclip.losses import LossCfg, build_loss

    loss = build_loss(LossCfg())

    def forward_loss(images_BCHW, tokens_BL):
        out = model(images_BCHW, tokens_BL)
        return loss(out.image_features, out.text_features, out.logit_scale, out.logit_bias)["loss"]

    return forward_loss


def evaclip_runner(cfg: TrainBenchCfg, token_drop: float, batch: tuple[torch.Tensor, torch.Tensor],
                   amp_dtype, impl: str = "evaclip") -> Runner:
    """evaclip's model and LAMB with the engine's own step (``build_step``: ``ClipTask`` + ``apply_update``)."""
    from evaclip.config import load_config
    from evaclip.distributed import DistEnv
    from evaclip.engine.step import build_step
    from evaclip.precision import precision_name
    from evaclip.tasks.clip import ClipTask

    device = batch[0].device
    model = _evaclip_model(cfg, token_drop, device)
    optimizer = _evaclip_lamb(model)
    task_cfg = load_config(None, {"model.name": cfg.model, "precision": precision_name(amp_dtype),
                                  "optim.grad_clip_norm": GRAD_CLIP_NORM})
    step = build_step(task_cfg, ClipTask(task_cfg, DistEnv(device=device)), model, optimizer, device)
    runner = Runner(impl, "lamb (foreach)", model, optimizer, _evaclip_loss_fn(model), batch, token_drop, amp_dtype)
    runner.train_step = lambda: step([batch])
    return runner


def _evaclip_lamb(model: nn.Module) -> torch.optim.Optimizer:
    from evaclip.config import OptimCfg
    from evaclip.optim import build_optimizer

    return build_optimizer(model, OptimCfg(name="lamb", impl="foreach"))


def model_dims(model_name: str, overrides: dict) -> dict:
    """The shapes of a registered evaclip architecture (after overrides) as plain numbers, for building twins."""
    from evaclip.models import get_model_config

    cfg = get_model_config(model_name, **overrides)
    v, t = cfg.vision, cfg.text
    pt_grid = getattr(v, "pt_hw_seq_len", getattr(v, "pt_grid", None)) or v.image_size // v.patch_size
    return dict(embed_dim=cfg.embed_dim, image_size=v.image_size, patch_size=v.patch_size, width=v.width,
                depth=v.depth, heads=v.heads, mlp_ratio=v.mlp_ratio, rope=v.rope, pt_grid=pt_grid,
                eva02=v.swiglu and v.subln and not v.postnorm and v.layer_scale is None, text_width=t.width,
                text_depth=t.layers, text_heads=t.heads, text_mlp_ratio=t.mlp_ratio,
                context_length=t.context_length, vocab_size=t.vocab_size,
                # a timm-built image tower (ViTamin): open_clip's own config when it ships this exact shape
                vision=dataclasses.asdict(v) if v.timm_model else None,
                open_clip_name=cfg.open_clip_name if v.timm_model and not overrides else None)


def _timm_eva_name(d: dict) -> str:
    """Register (once) a timm entrypoint building an EVA-02 CLIP trunk with these shapes; returns its name.

    This is open_clip's EVA02 path exactly (``eva02_*_clip_224`` arguments with other sizes); registering a name is
    the one way to give open_clip's TimmModel non-stock shapes without fetching weights.
    """
    import timm
    from timm.models import register_model
    from timm.models.eva import Eva

    if not d["eva02"]:
        raise ValueError("--vs open_clip builds open_clip's EVA02 path (SwiGLU, sub-LN, pre-norm); this model's image "
                         "tower is EVA-01 style, which open_clip builds differently: not supported")
    name = (f"evaclip_bench_eva02_clip_w{d['width']}_d{d['depth']}_h{d['heads']}_p{d['patch_size']}"
            f"_i{d['image_size']}_m{d['mlp_ratio']:.4f}_r{int(d['rope'])}g{d['pt_grid']}").replace(".", "_")
    if timm.models.is_model(name):
        return name
    args = dict(img_size=d["image_size"], patch_size=d["patch_size"], embed_dim=d["width"], depth=d["depth"],
                num_heads=d["heads"], qkv_fused=False, mlp_ratio=d["mlp_ratio"], swiglu_mlp=True, scale_mlp=True,
                scale_attn_inner=True, use_rot_pos_emb=d["rope"], ref_feat_shape=(d["pt_grid"], d["pt_grid"]))

    def entry(pretrained: bool = False, **kwargs) -> Eva:
        if pretrained:
            raise ValueError(f"{name} is a benchmark-only architecture with no weights")
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # create_model's, not the model's
            kwargs.pop(key, None)
        return Eva(**{**args, "global_pool": "token", **kwargs})

    entry.__name__ = name
    entry.__module__ = __name__
    register_model(entry)
    return name


def open_clip_model(d: dict, token_drop: float, device: torch.device) -> nn.Module:
    """open_clip's EVA02 CLIP (CustomTextCLIP, timm trunk, open_clip text transformer) with the shapes in ``d``."""
    from open_clip.model import CustomTextCLIP

    if d.get("vision"):  # ViTamin: open_clip's TimmModel with its ViTamin head (trunk avg pool, bias-free proj)
        vision_cfg = _open_clip_timm_vision(d)
    else:
        vision_cfg = dict(image_size=d["image_size"], timm_model_name=_timm_eva_name(d), timm_model_pretrained=False,
                          timm_pool="token", timm_proj=None)
    vision_cfg["patch_dropout"] = token_drop
    text_cfg = dict(context_length=d["context_length"], vocab_size=d["vocab_size"], width=d["text_width"],
                    heads=d["text_heads"], layers=d["text_depth"], mlp_ratio=d["text_mlp_ratio"])
    model = CustomTextCLIP(d["embed_dim"], vision_cfg, text_cfg)
    model.output_dict = False
    return model.to(device).train()


def _open_clip_timm_vision(d: dict) -> dict:
    """open_clip's ``vision_cfg`` of a timm-built tower: its own ``ViTamin-*`` config for a released shape, the same
    keys over a registered timm variant otherwise."""
    import open_clip

    from evaclip.models.registry import VisionCfg
    from evaclip.models.timm_vision import register_timm_variant

    if d.get("open_clip_name"):
        return dict(open_clip.get_model_config(d["open_clip_name"])["vision_cfg"])
    v = VisionCfg(**d["vision"])
    return dict(image_size=v.image_size, timm_model_name=register_timm_variant(v), timm_model_pretrained=False,
                timm_pool="", timm_proj="linear", timm_drop=0.0, timm_drop_path=v.drop_path)


def _open_clip_loss_fn(model: nn.Module) -> Callable:
    from open_clip.loss import ClipLoss

    loss = ClipLoss()

    def forward_loss(images_BCHW, tokens_BL):
        image_BD, text_BD, scale = model(images_BCHW, tokens_BL)[:3]
        return loss(image_BD, text_BD, scale)

    return forward_loss


def open_clip_param_groups(model: nn.Module, weight_decay: float = 0.05) -> list[dict]:
    """open_clip's training script's two groups: no weight decay for gains, biases, norms and logit_scale."""
    def exclude(n, p):
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": weight_decay}]


def _lamb_kwargs() -> dict:
    from evaclip.config import OptimCfg

    o = OptimCfg()
    return dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps, clamp_value=o.clamp_value, debias=o.debias)


def _reference_lamb(groups: list[dict]) -> torch.optim.Optimizer:
    import torch_optimizer

    return torch_optimizer.Lamb(groups, **_lamb_kwargs())


def _foreach_lamb(groups: list[dict]) -> torch.optim.Optimizer:
    from evaclip.optim import Lamb

    return Lamb(groups, **_lamb_kwargs())


def _synthetic(batch: int, d: dict, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    from evaclip.data.synthetic import synthetic_batches

    images_BCHW, tokens_BL = next(synthetic_batches(batch, d["image_size"], d["context_length"], d["vocab_size"],
                                                    steps=1, seed=seed))
    return images_BCHW.to(device), tokens_BL.to(device)


# ------------------------------------------------------------------------------------------------------ measurement


def _free(device: torch.device) -> None:
    release_host_memory()
    if device.type == "cuda":
        torch.cuda.empty_cache()


_PRIMED: dict[str, bool] = {}


def _stages(cfg: TrainBenchCfg, d: dict, token_drop: float, batch: dict, device: torch.device,
            amp_dtype) -> list[tuple[str, str, int, Callable[[], Runner]]]:
    """(impl, optimizer, batch, build) per measured configuration, in report order. ``build`` makes the model and
    runs its first step under the memory meter (weights, grads, optimizer state and activations all count), the
    baseline being the memory in use before that model was built. The last one reuses open_clip's model (its memory
    is not comparable, so not reported)."""
    shared: dict = {}

    def first_step(runner: Runner, baseline: int) -> Runner:
        with PeakMemory(device, baseline=baseline) as mem:
            runner.step()
        runner.peak_mem = mem.peak_bytes
        _free(device)
        return runner

    def evaclip() -> Runner:
        base = memory_in_use(device)
        return first_step(evaclip_runner(cfg, token_drop, _synthetic(batch["evaclip"], d, device, cfg.seed),
                                         amp_dtype), base)

    def open_clip_reference() -> Runner:
        base = memory_in_use(device)
        oc = shared["open_clip"] = open_clip_model(d, token_drop, device)
        return first_step(Runner("open_clip", "torch_optimizer.Lamb", oc, _reference_lamb(open_clip_param_groups(oc)),
                                 _open_clip_loss_fn(oc), _synthetic(batch["open_clip"], d, device, cfg.seed),
                                 token_drop, amp_dtype), base)

    def open_clip_foreach() -> Runner:
        # Same model object, evaclip's optimizer: memory is not comparable (shares the weights), so not reported.
        oc = shared.pop("open_clip", None) or open_clip_model(d, token_drop, device)
        r = Runner("open_clip", "lamb (foreach)", oc, _foreach_lamb(open_clip_param_groups(oc)),
                   _open_clip_loss_fn(oc), _synthetic(batch["open_clip"], d, device, cfg.seed), token_drop, amp_dtype)
        r.step()
        return r

    out = [("evaclip", "lamb (foreach)", batch["evaclip"], evaclip)]
    if cfg.vs == "open_clip":
        out += [("open_clip", "torch_optimizer.Lamb", batch["open_clip"], open_clip_reference),
                ("open_clip", "lamb (foreach)", batch["open_clip"], open_clip_foreach)]
    return out


def _prime(cfg: TrainBenchCfg, d: dict, token_drop: float, batch: dict, device: torch.device, amp_dtype) -> None:
    if not _PRIMED.get(device.type):
        # One throw-away step first: the process's one-time allocations (thread pools, BLAS / oneDNN workspaces,
        # autograd engine) would otherwise be charged to whichever model is measured first.
        evaclip_runner(cfg, token_drop, _synthetic(batch["evaclip"], d, device, cfg.seed), amp_dtype,
                       impl="prime").step()
        _PRIMED[device.type] = True
    _free(device)


def _build_runners(cfg: TrainBenchCfg, d: dict, token_drop: float, batch: dict, device: torch.device,
                   amp_dtype) -> list[Runner]:
    """Every configuration built and alive together (for alternating rounds)."""
    _prime(cfg, d, token_drop, batch, device, amp_dtype)
    return [build() for _, _, _, build in _stages(cfg, d, token_drop, batch, device, amp_dtype)]


def _measure(runners: list[Runner], cfg: TrainBenchCfg, device: torch.device) -> dict:
    """Host syncs, FLOPs, timed rounds (alternating between ``runners``) and the optional profile; id -> syncs."""
    syncs = {id(r): count_host_syncs(r) for r in runners}
    if cfg.count_flops:
        for r in runners:
            _count(r)
    _alternate(runners, cfg, device)
    if cfg.profile:
        for r in runners:
            _profile(r, cfg.profile, device)
    return syncs


def _result(r: Runner, syncs: dict, dtype: torch.dtype, peak: float) -> dict:
    step_s = median(r.times)
    return {
        "impl": r.impl, "optimizer": r.optimizer_name, "params_m": _params_m(r.model),
        "precision": str(dtype).replace("torch.", ""), "token_drop": r.token_drop, "batch": r.batch_size,
        "samples_per_s": r.batch_size / step_s, "step_ms": 1e3 * step_s,
        "peak_mem_mb": r.peak_mem / 2 ** 20 if r.peak_mem is not None else None,
        "gflops_per_sample": r.flops / r.batch_size / 1e9 if r.flops else None,
        "mfu_pct": 100 * mfu(r.flops, step_s, peak) if r.flops else None, "host_syncs": syncs[id(r)],
        "attn_backend": getattr(r.model, "attn_backend", None), "step_ms_rounds": [1e3 * t for t in r.times],
    }


def _oom_row(impl: str, optimizer: str, batch: int, e: BaseException) -> dict:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else "CUDA out of memory"
    return {"impl": impl, "optimizer": optimizer, "batch": batch, "error": f"out of memory: {msg[:200]}"}


def _count(runner: Runner) -> None:
    runner.flops = count_flops(runner.step)


def count_host_syncs(runner: Runner) -> Optional[int]:
    """Host synchronisations in one step (CUDA only; None on CPU), caught by torch's sync debug mode.

    A sync (``.item()``, a data-dependent shape, a host copy) stalls the CPU until the GPU drains, so the next step's
    kernels are not queued in time; the fast path has none.
    """
    if runner.batch[0].device.type != "cuda":
        return None
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            runner.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def flops_per_sample(model_name: str, token_drop: float, overrides: Optional[dict] = None, batch: int = 2) -> float:
    """Counted training FLOPs (forward + loss + backward) per sample, on the meta device: no memory, no compute.

    For sizing runs (e.g. a GPU-sized model on a CPU machine); attention is counted with SDPA's formula.
    """
    from evaclip.models import create_model

    overrides = overrides or {}
    d = model_dims(model_name, overrides)
    with torch.device("meta"):
        model = create_model(model_name, attn_backend="sdpa", token_drop=token_drop, **overrides).train()
        images_BCHW = torch.empty(batch, 3, d["image_size"], d["image_size"])
        tokens_BL = torch.zeros(batch, d["context_length"], dtype=torch.long)
    forward_loss = _evaclip_loss_fn(model)
    return count_flops(lambda: forward_loss(images_BCHW, tokens_BL).backward()) / batch


def _alternate(runners: list[Runner], cfg: TrainBenchCfg, device: torch.device) -> None:
    for r in runners:
        for _ in range(cfg.warmup):
            r.step()
    for k in range(cfg.rounds):
        order = runners if k % 2 == 0 else runners[::-1]
        for r in order:
            r.times.append(time_calls(r.step, cfg.steps, device))


def _profile(runner: Runner, out_dir: str, device: torch.device, steps: int = 2) -> str:
    """torch.profiler over ``steps`` steps: the op table (sorted by self time) and a Chrome trace in ``out_dir``."""
    from pathlib import Path

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=False) as prof:
        for _ in range(steps):
            runner.step()
    tag = f"{runner.impl}_{runner.optimizer_name.split()[0]}_drop{runner.token_drop}".replace(".", "")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=25)
    (out / f"profile_{tag}.txt").write_text(table)
    prof.export_chrome_trace(str(out / f"trace_{tag}.json"))
    return table


def find_max_batch(make_runner: Callable[[int], Runner], device: torch.device, start: int = 32,
                   limit: int = 4096, multiple: int = 8) -> int:
    """The largest batch (a multiple of ``multiple``) whose full step fits in GPU memory: doubling, then bisection."""
    if device.type != "cuda":
        raise ValueError("--batch auto searches the largest batch that fits in GPU memory; it needs --device cuda")

    def fits(b: int) -> bool:
        try:
            runner = make_runner(b)
            runner.step()
            runner.step()  # the second step holds the optimizer state as well
            del runner
            return True
        except torch.cuda.OutOfMemoryError:
            gc.collect()  # the failed step's frames hold tensors through the traceback's reference cycles
            return False
        finally:
            torch.cuda.empty_cache()

    lo, hi = 0, start
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    if lo == 0:
        raise RuntimeError(f"even batch {start} does not fit; pass a smaller --batch")
    hi = min(hi, limit + multiple)
    while hi - lo > multiple:
        mid = (lo + hi) // 2 // multiple * multiple
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _auto_batches(cfg: TrainBenchCfg, d: dict, token_drop: float, device: torch.device, amp_dtype) -> dict:
    def make(impl: str) -> Callable[[int], Runner]:
        def build(b: int) -> Runner:
            if impl == "evaclip":
                return evaclip_runner(cfg, token_drop, _synthetic(b, d, device, 0), amp_dtype)
            m = open_clip_model(d, token_drop, device)
            return Runner(impl, "", m, _reference_lamb(open_clip_param_groups(m)), _open_clip_loss_fn(m),
                          _synthetic(b, d, device, 0), token_drop, amp_dtype)
        return build

    out = {"evaclip": find_max_batch(make("evaclip"), device)}
    out["open_clip"] = find_max_batch(make("open_clip"), device) if cfg.vs == "open_clip" else out["evaclip"]
    return out


def _params_m(model: nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def bench_train(cfg: TrainBenchCfg) -> dict:
    """Run the benchmark described by ``cfg``; returns a report section (rows + ratios in the notes and summary)."""
    if cfg.vs not in (None, "open_clip"):
        raise ValueError(f"--vs must be open_clip, got {cfg.vs!r}")
    if cfg.steps < 1 or cfg.rounds < 1 or cfg.warmup < 0:
        raise ValueError(f"need steps >= 1, rounds >= 1, warmup >= 0; got {cfg.steps}, {cfg.rounds}, {cfg.warmup}")
    for r in cfg.token_drop:
        if not 0.0 <= r < 1.0:
            raise ValueError(f"--token-drop ratios must be in [0, 1), got {r}")
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.precision, device)
    if dtype == torch.float16:
        raise ValueError("bench train runs fp32 or bf16 (fp16 would need a GradScaler in both loops); use bf16")
    amp_dtype = None if dtype == torch.float32 else dtype
    torch.manual_seed(cfg.seed)
    d = model_dims(cfg.model, cfg.overrides)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    peak = matmul_peak_flops(device, dtype, size=cfg.peak_size)
    rows, runners_by_drop = [], {}
    for token_drop in cfg.token_drop:
        if cfg.batch == "auto":
            batch = _auto_batches(cfg, d, token_drop, device, amp_dtype)
        else:
            batch = {"evaclip": int(cfg.batch), "open_clip": int(cfg.batch)}
        stages = _stages(cfg, d, token_drop, batch, device, amp_dtype)
        new_rows: list = []
        if cfg.batch == "auto":
            # Each largest batch was found with nothing else in memory: each configuration is measured alone and
            # freed before the next is built (rounds are not interleaved across configurations).
            for impl, opt, b, build in stages:
                runner = None
                try:
                    _prime(cfg, d, token_drop, batch, device, amp_dtype)
                    runner = build()
                    new_rows.append(_result(runner, _measure([runner], cfg, device), dtype, peak))
                except torch.cuda.OutOfMemoryError as e:
                    new_rows.append(_oom_row(impl, opt, b, e))
                del runner
                _free(device)
        else:
            runners: dict = {}  # alive together: rounds alternate between them
            failed: dict = {}
            for i, (impl, opt, b, build) in enumerate(stages):
                try:
                    _prime(cfg, d, token_drop, batch, device, amp_dtype)
                    runners[i] = build()
                except torch.cuda.OutOfMemoryError as e:
                    failed[i] = _oom_row(impl, opt, b, e)
                    _free(device)
            try:
                syncs = _measure(list(runners.values()), cfg, device)
                done = {i: _result(r, syncs, dtype, peak) for i, r in runners.items()}
            except torch.cuda.OutOfMemoryError as e:
                done = {i: _oom_row(stages[i][0], stages[i][1], stages[i][2], e) for i in runners}
            new_rows = [done[i] if i in done else failed[i] for i in range(len(stages))]
            del runners
            _free(device)
        for r in new_rows:
            r.update(model=cfg.model, token_drop=token_drop, precision=str(dtype).replace("torch.", ""))
        rows += new_rows
        runners_by_drop[token_drop] = [(r["impl"], r["optimizer"]) for r in new_rows]
    # Measured again at the end, the better of the two kept: on a shared machine a busy moment lowers the peak
    # (and inflates MFU); a busy moment cannot raise it.
    peak = max(peak, matmul_peak_flops(device, dtype, size=cfg.peak_size))
    for r in rows:
        if r.get("mfu_pct") is not None:
            r["mfu_pct"] = 100 * mfu(r["gflops_per_sample"] * 1e9 * r["batch"], r["step_ms"] / 1e3, peak)
    summary = _summary(rows)
    notes = _notes(cfg, device, dtype, peak, summary)
    used = sorted({r["attn_backend"] for r in rows if r["impl"] == "evaclip" and r.get("attn_backend")})
    if used:
        notes.append(f"evaclip attention backend: {', '.join(used)} (requested {cfg.attn_backend})")
    columns = TRAIN_COLUMNS + ([("error", "error")] if any("error" in r for r in rows) else [])
    sec = section(f"Training step: {cfg.model}", columns, rows, notes)
    sec["summary"] = summary
    sec["config"] = dataclasses.asdict(cfg)
    sec["matmul_peak_tflops"] = peak / 1e12
    return sec


def _row(rows: list[dict], impl: str, optimizer: str, token_drop: float) -> Optional[dict]:
    for r in rows:
        if "error" in r:  # out of memory: no figures
            continue
        if r["impl"] == impl and r["optimizer"] == optimizer and r["token_drop"] == token_drop:
            return r
    return None


def _paired(a: dict, b: dict) -> float:
    """Median over rounds of b's step time / a's step time within the same round (throughput of a over b).

    Runs of one round sit next to each other in time, so on a shared machine the per-round ratio cancels most of the
    load that the separate medians of each run keep.
    """
    ratios = [tb / ta * (a["batch"] / b["batch"]) for ta, tb in zip(a["step_ms_rounds"], b["step_ms_rounds"])]
    return median(ratios)


def _summary(rows: list[dict]) -> dict:
    """The ratios the targets are stated in (paired per round): vs open_clip (headline and same optimizer), and
    evaclip's step time at each token-drop ratio vs no dropping (ratio of medians: different rounds)."""
    out = {}
    for td in sorted({r["token_drop"] for r in rows}):
        ours = _row(rows, "evaclip", "lamb (foreach)", td)
        theirs = _row(rows, "open_clip", "torch_optimizer.Lamb", td)
        same = _row(rows, "open_clip", "lamb (foreach)", td)
        if ours and theirs:
            out[f"speedup_vs_open_clip@drop{td}"] = _paired(ours, theirs)
        if ours and same:
            out[f"speedup_vs_open_clip_same_optimizer@drop{td}"] = _paired(ours, same)
    drops = sorted({r["token_drop"] for r in rows if r["impl"] == "evaclip"})
    base = _row(rows, "evaclip", "lamb (foreach)", 0.0)
    if base:
        for td in drops:
            if td > 0:
                row = _row(rows, "evaclip", "lamb (foreach)", td)
                if row and row["batch"] == base["batch"]:
                    out[f"step_time_ratio_drop{td}_vs_0"] = row["step_ms"] / base["step_ms"]
    return out


def _notes(cfg: TrainBenchCfg, device: torch.device, dtype: torch.dtype, peak: float, summary: dict) -> list[str]:
    notes = [f"{k}: {v:.3f}" for k, v in summary.items()]
    if summary:
        notes.append("speedups: median over rounds of the per-round ratio (runs of a round are adjacent in time); "
                     "drop-ratio: ratio of the two medians")
    mem = ("peak torch.cuda.max_memory_allocated over the first step minus memory in use before the model was built"
           if device.type == "cuda" else
           "peak RSS (sampled every 2 ms) over the first step minus RSS before the model was built")
    notes += [
        f"step = forward + contrastive loss + backward + optimizer step on synthetic data; median over {cfg.rounds} "
        f"alternating rounds of {cfg.steps} steps after {cfg.warmup} warm-up steps",
        f"MFU = counted FLOPs per step (torch FlopCounterMode: matmuls, convs, SDPA) / step time / matmul peak "
        f"{peak / 1e12:.3g} TFLOP/s measured in this run (best of start and end; {str(dtype).replace('torch.', '')} "
        f"{cfg.peak_size or ('8192' if device.type == 'cuda' else '2048')}^3 matmul, {torch.get_num_threads()} "
        f"CPU threads)",
        f"peak memory: {mem}; not reported for open_clip + foreach LAMB (it shares the model of the run above)",
    ]
    if cfg.batch == "auto":
        notes.append("--batch auto: each configuration is measured alone at its own largest batch and freed before "
                     "the next is built, so the rounds of different configurations are not interleaved")
    if cfg.compile:
        notes.append("evaclip towers wrapped in torch.compile (compile time excluded: it happens in the memory step)")
    return notes


def add_args(p: argparse.ArgumentParser) -> None:
    """The ``bench train`` command-line options."""
    p.add_argument("--model", default=TrainBenchCfg.model, help="a registered evaclip architecture")
    p.add_argument("--batch", default="8", help="per-device batch, or 'auto' (largest that fits; CUDA only)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--token-drop", type=float, nargs="+", default=[0.5], help="one or more ratios, e.g. 0 0.5")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto, CUDA when available)")
    p.add_argument("--attn-backend", default="auto", choices=["auto", "flash_attn", "sdpa", "eager"],
                   help="attention implementation of the evaclip model (default: auto)")
    p.add_argument("--compile", action="store_true", help="torch.compile the evaclip towers")
    p.add_argument("--vs", default=None, choices=["open_clip"], help="also run open_clip's equivalent model")
    p.add_argument("--steps", type=int, default=3, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before each round (default: 2)")
    p.add_argument("--rounds", type=int, default=3,
                   help="timed rounds, alternating evaclip and open_clip; the median is reported (default: 3)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="architecture overrides for create_model, e.g. depth=6 (see evaclip.models)")
    p.add_argument("--no-flops", action="store_true", help="skip FLOP counting (and MFU)")
    p.add_argument("--profile", default=None, metavar="DIR", help="write torch.profiler tables and traces here")
    p.add_argument("--peak-size", type=int, default=None, help="matmul side for the peak (2048 CPU, 8192 CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def cfg_from_args(args: argparse.Namespace) -> TrainBenchCfg:
    """Parsed ``bench train`` options -> TrainBenchCfg (overrides parsed as YAML scalars, like config overrides)."""
    from evaclip.config import load_config, parse_overrides

    batch = args.batch if args.batch == "auto" else int(args.batch)
    # checked against the model's CLIPCfg exactly as the trainer's model.overrides are
    overrides = load_config(None, {"model.name": args.model, **{f"model.overrides.{k}": v for k, v in
                                                                parse_overrides(args.set).items()}}).model.overrides
    return TrainBenchCfg(model=args.model, batch=batch, precision=args.precision, token_drop=list(args.token_drop),
                         device=args.device, attn_backend=args.attn_backend, compile=args.compile, vs=args.vs,
                         steps=args.steps, warmup=args.warmup, rounds=args.rounds, overrides=overrides,
                         count_flops=not args.no_flops, profile=args.profile, peak_size=args.peak_size,
                         threads=args.threads)


def run(args: argparse.Namespace) -> dict:
    """Run from parsed ``bench train`` options; returns the report section."""
    return bench_train(cfg_from_args(args))
