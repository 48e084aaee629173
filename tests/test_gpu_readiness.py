"""GPU readiness on a CPU: each CUDA-only failure of issue 15 reproduced without a GPU and checked fixed.

Stand-ins: ``torch.cuda.is_available`` / ``get_device_capability`` monkeypatched, fake ``flash_attn`` (FA2) and
``flash_attn.cute`` (FA4) modules in ``sys.modules``, ``meta`` tensors for a second device.
Shapes: B batch, H heads, N tokens, D head dim.
"""
from __future__ import annotations

import configparser
import gc
import importlib.abc
import importlib.machinery
import logging
import sys
import types
import weakref
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from evaclip.models import attention as attn_mod
from evaclip.models import create_model
from evaclip.models.attention import (
    Attend,
    AttentionBackendError,
    FlashKernel,
    flash_attn_usable,
    flash_kernel,
    resolve_backend,
)

ROOT = Path(__file__).resolve().parents[1]
MODEL = "EVA02-CLIP-tiny"


# ---------------------------------------------------------------------------------------------------- stand-ins
@pytest.fixture
def fake_cuda(monkeypatch):
    """torch reports a CUDA device of compute capability ``fake_cuda.capability`` (default 9.0, Hopper)."""
    state = types.SimpleNamespace(capability=(9, 0))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: state.capability)
    monkeypatch.setattr(attn_mod, "_LOGGED", set(), raising=False)
    monkeypatch.setattr(attn_mod, "_WARNED", set(), raising=False)
    return state


def _fa2_func(calls):
    def flash_attn_func(q, k, v, causal=False, **kw):  # FA2 registers its op for CUDA only
        calls.append(("FA2", q.device.type, q.dtype))
        if q.device.type != "cuda":
            raise NotImplementedError("flash_attn::_flash_attn_forward: no kernel for the CPU backend")
        raise AssertionError("unreachable on this machine")
    return flash_attn_func


class _InvisibleKernel(torch.autograd.Function):
    """FA4 stand-in: a kernel torch's dispatcher does not see (no aten matmul), output shaped like q."""

    @staticmethod
    def forward(ctx, q, k, v):
        return torch.empty_like(q)

    @staticmethod
    def backward(ctx, g):
        return torch.empty_like(g), torch.empty_like(g), torch.empty_like(g)


@pytest.fixture
def fake_flash(monkeypatch):
    """Install fake flash-attn packages: ``fake_flash(fa2=True, fa4=False)``; returns the list of kernel calls."""
    calls: list = []

    def install(fa2: bool = True, fa4: bool = False):
        pkg = types.ModuleType("flash_attn")
        pkg.__path__ = []
        if fa2:
            pkg.flash_attn_func = _fa2_func(calls)
        monkeypatch.setitem(sys.modules, "flash_attn", pkg)
        if fa4:
            cute = types.ModuleType("flash_attn.cute")

            def flash_attn_func(q, k, v, causal=False, **kw):
                calls.append(("FA4", q.device.type, q.dtype))
                return _InvisibleKernel.apply(q, k, v)

            cute.flash_attn_func = flash_attn_func
            # the entry points evaclip's FA4 custom op calls (models/fa4_op.py), 4.0.0b36's signatures
            interface = types.ModuleType("flash_attn.cute.interface")

            def _flash_attn_fwd(q, k, v, causal=False, return_lse=False, **kw):
                calls.append(("FA4", q.device.type, q.dtype))
                B, N, H, _ = q.shape
                return torch.empty_like(q), q.new_empty(B, H, N, dtype=torch.float32), None, None, None

            def _flash_attn_bwd(q, k, v, out, dout, lse, softmax_scale=None, causal=False, **kw):
                calls.append(("FA4 backward", q.device.type, q.dtype))
                return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

            interface._flash_attn_fwd, interface._flash_attn_bwd = _flash_attn_fwd, _flash_attn_bwd
            cute.interface = interface
            pkg.cute = cute
            monkeypatch.setitem(sys.modules, "flash_attn.cute", cute)
            monkeypatch.setitem(sys.modules, "flash_attn.cute.interface", interface)
        else:
            monkeypatch.setitem(sys.modules, "flash_attn.cute", None)  # import raises ImportError
        return calls

    return install


def _tiny_batch(model, n=2):
    s = model.cfg.vision.image_size
    tokens = torch.randint(1, model.cfg.text.vocab_size - 1, (n, model.cfg.text.context_length))
    tokens[:, -1] = model.cfg.text.vocab_size - 1
    return torch.randn(n, 3, s, s), tokens


# ------------------------------------------------------------------ 1. gradient norm over two devices (cpu_offload)
def test_clip_grad_norm_with_grads_on_two_devices():
    """FSDP2 cpu_offload: shard grads on the host, logit_scale's on the GPU (meta stands in for it)."""
    from evaclip.optim import clip_grad_norm_, global_sq_norms

    host = [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(2)]
    gpu = torch.nn.Parameter(torch.zeros((), device="meta"))
    for p in host:
        p.grad = torch.randn_like(p)
    gpu.grad = torch.ones((), device="meta")
    total = clip_grad_norm_([host[0], gpu, host[1]], None)  # before: torch.stack of cpu + meta norms raised
    assert total.shape == () and total.device.type == "meta"  # reduced on the accelerator
    sq = global_sq_norms([host[0].grad, gpu.grad, host[1].grad], [host[0], gpu, host[1]])
    assert sq.shape == (3,) and sq.device.type == "meta"
    cpu_only = global_sq_norms([p.grad for p in host], host)  # one device: unchanged
    torch.testing.assert_close(cpu_only, torch.stack([p.grad.norm() ** 2 for p in host]))


# ------------------------------------------------------------------------- 2. backend from the model's device
def test_cpu_model_on_a_flash_machine_uses_sdpa(fake_cuda, fake_flash):
    """device=None is the CPU: auto must not pick flash_attn because a GPU and flash-attn exist."""
    calls = fake_flash(fa2=True)
    m = create_model(MODEL, precision="bf16")  # before: auto -> flash_attn, then the forward hit FA2's CUDA op
    assert m.attn_backend == "sdpa" and m.visual.layout == "BHND"
    assert create_model(MODEL, device="cpu", precision="bf16").attn_backend == "sdpa"
    images, tokens = _tiny_batch(m)
    out = m(images, tokens)
    (out.image_features @ out.text_features.T).sum().backward()
    assert calls == []
    assert resolve_backend("auto", "cuda", "bf16") == "flash_attn"  # the same machine, a CUDA model


def test_auto_backend_follows_the_model_when_it_moves(monkeypatch):
    """meta stands in for a CUDA device with a working flash kernel: .to() re-resolves auto, explicit stays."""
    def fake_kernel(device="cuda"):
        if device is not None and torch.device(device).type == "meta":
            return FlashKernel(lambda q, k, v, causal=False: torch.empty_like(q), "FA4", False), "stand-in GPU"
        return None, "not the stand-in GPU"

    monkeypatch.setattr(attn_mod, "flash_kernel", fake_kernel)
    m = create_model(MODEL, precision="bf16")
    assert m.attn_backend == "sdpa"
    m.to("meta")  # before: stayed sdpa
    assert m.attn_backend == "flash_attn" and m.visual.layout == "BNHD"
    assert m.text.transformer.resblocks[0].attn.attend.layout == "BNHD"
    m.to_empty(device="cpu")
    assert m.attn_backend == "sdpa" and m.visual.layout == "BHND"
    images, tokens = _tiny_batch(m)
    m.eval()(images, tokens)  # the CPU forward runs again after the round trip
    fp32 = create_model(MODEL).to("meta")  # auto in fp32: never flash
    assert fp32.attn_backend == "sdpa"
    explicit = create_model(MODEL, attn_backend="sdpa", precision="bf16").to("meta")
    assert explicit.attn_backend == "sdpa"


def test_cpu_training_and_eval_with_cuda_reported_and_flash_importable(fake_cuda, fake_flash, tmp_path):
    """`evaclip train device=cpu` and `evaclip eval --device cpu` on a GPU machine with flash-attn installed."""
    from evaclip.config import load_config
    from evaclip.evals.common import encode_images, encode_texts
    from evaclip.runs import load_model
    from evaclip.train import main

    calls = fake_flash(fa2=True)
    cfg = load_config("demo_cpu", [f"model.name={MODEL}", "data.synthetic=true", "data.batch_size=2", "max_steps=2",
                                   "optim.warmup_steps=1", "device=cpu", f"output_dir={tmp_path}", "name=run",
                                   "log.tensorboard=false", "eval.zeroshot=null", "model.token_drop=0.0"])
    main(cfg)
    path = tmp_path / "weights.pt"
    torch.save(create_model(MODEL, attn_backend="sdpa").state_dict(), path)
    model, _ = load_model(str(path), MODEL, device="cpu")
    assert model.attn_backend == "sdpa"
    images, tokens = _tiny_batch(model)
    assert encode_images(model, images, "cpu").shape == (2, 32)
    assert encode_texts(model, lambda texts: tokens[:len(texts)], ["a", "b"], "cpu").shape == (2, 32)
    assert calls == []


# --------------------------------------------------------------------------------------- 3. precision
def test_auto_picks_flash_only_for_half_precision(fake_cuda, fake_flash):
    fake_flash(fa2=True)
    assert resolve_backend("auto", "cuda", "fp32") == "sdpa"  # before: flash, then q/k/v cast to bf16
    assert resolve_backend("auto", "cuda", torch.float32) == "sdpa"
    assert resolve_backend("auto", "cuda", "bf16") == "flash_attn"
    assert resolve_backend("auto", "cuda", torch.float16) == "flash_attn"
    with pytest.raises(ValueError, match="fp32.*bf16/fp16 only"):
        resolve_backend("flash_attn", "cuda", "fp32")
    with pytest.raises(ValueError, match="fp32"):  # raised before the model would be moved to the device
        create_model(MODEL, attn_backend="flash_attn", device="cuda", precision="fp32")
    with pytest.raises(ValueError, match="precision"):
        resolve_backend("auto", "cuda", "int8")


def test_flash_backend_does_not_round_fp32_inputs(fake_cuda, fake_flash):
    """fp32 q/k/v reaching a flash_attn module (no autocast) run through SDPA in fp32, with a warning."""
    calls = fake_flash(fa2=False, fa4=True)
    att = Attend("flash_attn")
    q, k, v = (torch.randn(2, 5, 3, 8, device="meta") for _ in range(3))  # B N H D
    with pytest.warns(UserWarning, match="fp32 inputs"):
        out = att(q, k, v)
    assert out.dtype == torch.float32 and out.shape == q.shape
    assert calls == []  # before: the kernel got them cast to bf16
    seen = _OpsSeen()
    with seen:  # FA4 runs as evaclip's custom op; on meta its shape-only (fake) implementation answers
        out = att(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert "evaclip.fa4_fwd.default" in seen.ops and out.dtype == torch.bfloat16 and out.shape == q.shape


class _OpsSeen(TorchDispatchMode):
    """Names of the ops dispatched under it."""

    def __init__(self):
        super().__init__()
        self.ops: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


# ------------------------------------------------------------------------------------------ 4. the probe
def test_probe_checks_compute_capability(fake_cuda, fake_flash):
    fake_flash(fa2=True, fa4=True)
    fake_cuda.capability = (7, 5)  # Turing: neither FA2 nor FA4
    assert not flash_attn_usable("cuda")  # before: True (no capability check)
    assert resolve_backend("auto", "cuda", "bf16") == "sdpa"
    with pytest.raises(AttentionBackendError, match="compute capability"):
        resolve_backend("flash_attn", "cuda", "bf16")
    fake_cuda.capability = (8, 0)  # Ampere: FA2 only (FA4's backward needs Hopper)
    assert flash_kernel("cuda")[0].name == "FA2"
    fake_cuda.capability = (9, 0)  # Hopper: FA4 first
    kernel, why = flash_kernel("cuda")
    assert kernel.name == "FA4" and kernel.torch_op and "9.0" in why  # evaclip::fa4_fwd (models/fa4_op.py)
    assert flash_kernel(None)[0] is None and flash_kernel("cpu")[0] is None


class _BrokenImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """flash_attn whose import raises RuntimeError (as cutlass' DSL does without a matching driver)."""

    def find_spec(self, name, path=None, target=None):
        if name == "flash_attn" or name.startswith("flash_attn."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise RuntimeError("cutlass.cute: CUDA driver initialisation failed")


def test_import_errors_of_any_kind_fall_back_to_sdpa(fake_cuda, monkeypatch, caplog):
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    monkeypatch.delitem(sys.modules, "flash_attn.cute", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_BrokenImport(), *sys.meta_path])
    kernel, why = flash_kernel("cuda")
    assert kernel is None and "RuntimeError" in why
    with caplog.at_level(logging.INFO, logger="evaclip.models.attention"):
        for _ in range(3):  # before: the RuntimeError escaped create_model
            assert resolve_backend("auto", "cuda", "bf16") == "sdpa"
    logged = [r.getMessage() for r in caplog.records if r.name == "evaclip.models.attention"]
    assert len(logged) == 1 and "auto -> sdpa" in logged[0] and "RuntimeError" in logged[0]  # once, with why


# ------------------------------------------------------------------------------ 5. bench: one model at a time
def _bench_cfg(monkeypatch, **kw):
    from evaclip.bench import train as train_bench

    monkeypatch.setattr(train_bench, "matmul_peak_flops", lambda *a, **k: 1e12)  # not what these tests are about
    monkeypatch.setattr(train_bench, "_auto_batches", lambda *a, **k: {"evaclip": 2, "open_clip": 2})  # no CUDA

    base = dict(model=MODEL, batch="auto", token_drop=[0.0], device="cpu", precision="fp32", vs="open_clip",
                steps=1, warmup=0, rounds=1, count_flops=False, peak_size=64, overrides={"text.vocab_size": 512})
    return train_bench.TrainBenchCfg(**{**base, **kw})


@pytest.mark.slow
def test_bench_auto_batch_frees_each_model_before_building_the_next(monkeypatch):
    from evaclip.bench import train as train_bench

    ours, seen = [], []
    make_ours, make_theirs = train_bench._evaclip_model, train_bench.open_clip_model

    def evaclip_model(*a, **k):
        m = make_ours(*a, **k)
        ours.append(weakref.ref(m))
        return m

    def open_clip_model(*a, **k):
        seen.append(sum(r() is not None for r in ours))  # evaclip models alive when open_clip's is built
        return make_theirs(*a, **k)

    monkeypatch.setattr(train_bench, "_evaclip_model", evaclip_model)
    monkeypatch.setattr(train_bench, "open_clip_model", open_clip_model)
    sec = train_bench.bench_train(_bench_cfg(monkeypatch))
    assert seen == [0]  # before: the evaclip runner (weights + LAMB state) was still alive
    assert [(r["impl"], r["optimizer"]) for r in sec["rows"]] == [
        ("evaclip", "lamb (foreach)"), ("open_clip", "torch_optimizer.Lamb"), ("open_clip", "lamb (foreach)")]
    assert all(r["samples_per_s"] > 0 for r in sec["rows"])


@pytest.mark.slow
@pytest.mark.parametrize("batch", ["auto", 2])
def test_bench_out_of_memory_is_a_reported_row(monkeypatch, batch):
    from evaclip.bench import train as train_bench

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train_bench, "open_clip_model", oom)
    sec = train_bench.bench_train(_bench_cfg(monkeypatch, batch=batch))  # before: the error ended the run, no report
    rows = sec["rows"]
    assert rows[0]["impl"] == "evaclip" and rows[0]["samples_per_s"] > 0
    assert [r["impl"] for r in rows[1:]] == ["open_clip", "open_clip"]
    assert all(r["error"].startswith("out of memory") for r in rows[1:])
    assert ["error", "error"] in sec["columns"] and sec["summary"] == {}
    gc.collect()


# ----------------------------------------------------------------------- 6. LAMB scaling on the multi-tensor path
class _ForeachRoutes(TorchDispatchMode):
    """Records foreach calls whose tensor lists differ in shape at some index: CUDA runs those one kernel per
    tensor (``can_use_fast_route`` needs the same sizes and strides at each index)."""

    def __init__(self):
        super().__init__()
        self.per_tensor: list = []
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name.startswith("_foreach_"):
            self.calls += 1
            lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
            if any(x.shape != y.shape or x.stride() != y.stride()
                   for other in lists[1:] for x, y in zip(lists[0], other)):
                self.per_tensor.append(str(func))
        return func(*args, **(kwargs or {}))


def _lamb_params(device="cpu"):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s).to(device)) for s in ((16, 8), (8,), (3, 4, 5), ())]
    for p in params:
        p.grad = torch.randn_like(p)
    return [{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:]}], params


def test_lamb_cuda_path_scales_updates_on_the_multi_tensor_route():
    """meta parameters take LAMB's non-CPU (CUDA) branch: every foreach call must stay on the multi-tensor route."""
    from evaclip.optim import Lamb

    groups, _ = _lamb_params("meta")
    opt = Lamb(groups, lr=1e-2)
    routes = _ForeachRoutes()
    with routes:
        opt.step()
    assert routes.calls > 0 and routes.per_tensor == []  # before: aten._foreach_mul_.List with 0-d factors


def test_lamb_cuda_branch_computes_the_cpu_branchs_update(monkeypatch):
    from evaclip.optim import Lamb
    from evaclip.optim import lamb as lamb_mod

    monkeypatch.setattr(Lamb, "cpu_tensorwise", False)
    out = []
    for multi_tensor in (True, False):  # the CUDA branch run on CPU tensors, then the CPU branch
        monkeypatch.setattr(lamb_mod, "_multi_tensor_device", lambda t, m=multi_tensor: m)
        groups, params = _lamb_params()
        Lamb(groups, lr=1e-2).step()
        out.append([p.detach().clone() for p in params])
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_lamb_step_launches_counted_from_a_profiler_trace():
    """torch.profiler CPU trace of a LAMB step on meta parameters (the CUDA branch): no foreach call off CUDA's
    multi-tensor route (before: _foreach_mul_ with 0-d factors, one kernel per tensor)."""
    from torch.profiler import ProfilerActivity, profile

    from evaclip.bench.measure import cuda_launches
    from evaclip.optim import Lamb

    params = [torch.nn.Parameter(torch.empty(s, device="meta")) for s in ((16, 8), (8,), (3, 4, 5))]
    for p in params:
        p.grad = torch.empty_like(p)
    opt = Lamb(params, lr=1e-2, weight_decay=0.1)
    opt.step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        opt.step()
    total, per_tensor = cuda_launches(prof)
    assert per_tensor == {} and 0 < total < 40


def test_cuda_launch_count_reads_the_multi_tensor_route():
    from torch.profiler import ProfilerActivity, profile

    from evaclip.bench.measure import cuda_launches

    u = [torch.empty(s, device="meta") for s in ((4, 3), (5,), (2, 2, 2))]
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        torch._foreach_mul_(u, [torch.empty((), device="meta") for _ in u])  # 0-d factors: per tensor
    assert cuda_launches(prof) == (3, {"aten::_foreach_mul_": 3})
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        torch._foreach_mul_(u, 0.5)
        torch._foreach_addcmul_(u, u, u, value=2.0)
    assert cuda_launches(prof) == (2, {})


# ------------------------------------------------------------------------------------------ 7. bf16 RoPE
def test_bf16_rope_rotation_matches_timm():
    from timm.layers import RotaryEmbeddingCat, apply_rot_embed_cat

    from evaclip.models.rope import apply_rope, rope_tables

    D, grid = 32, 14
    rope = RotaryEmbeddingCat(D, in_pixels=False, feat_shape=[grid, grid], ref_feat_shape=[16, 16])
    cos, sin = rope_tables(D, grid, 16)
    x = torch.randn(2, 3, grid * grid, D).bfloat16()
    ours, ref = apply_rope(x, cos, sin), apply_rot_embed_cat(x, rope.get_embed())
    assert ours.dtype == ref.dtype == torch.bfloat16
    # before: the tables rounded to bf16 first, ~20 % of the outputs one bf16 step off timm's
    assert (ours != ref).float().mean() < 1e-3
    torch.testing.assert_close(ours.float(), ref.float(), rtol=0, atol=8e-3)


def test_eva02_tower_matches_timm_eva_in_bf16_autocast():
    from test_models import _randomize, _timm_eva

    from evaclip.models.convert import image_tower_state

    ours = create_model(MODEL, attn_backend="sdpa", **{"vision.image_size": 64}).eval()
    ref = _timm_eva(ours.cfg)
    _randomize(ref, 0.2)
    ours.visual.load_state_dict(image_tower_state(ref.state_dict(), True))
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = ours.visual(x).float(), ref(x).float()
    torch.testing.assert_close(a, b, rtol=0, atol=2e-3)  # before: 7.8e-3 apart


# ---------------------------------------------------------------------------------- 8. FLOPs of FA4 attention
def test_count_flops_sees_flash_attention_4(fake_cuda, fake_flash):
    from evaclip.bench.flops import count_flops

    fake_flash(fa2=False, fa4=True)
    b, h, n, d = 2, 3, 16, 8
    q, k, v = (torch.empty(b, n, h, d, device="meta", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    att = Attend("flash_attn")

    def fwd_bwd():
        att(q, k, v).sum().backward()

    # forward 2 matmuls, backward 5, each 2·B·H·N²·D: SDPA's formulas, registered for evaclip's FA4 ops (before
    # issue 22 Attend tallied them; before issue 15: 0, no torch op to see)
    assert count_flops(fwd_bwd) == 7 * 2 * b * h * n * n * d
    with torch.no_grad():
        assert count_flops(lambda: att(q, k, v)) == 2 * 2 * b * h * n * n * d


# ------------------------------------------------------------------------------------------ 9. installing flash
def test_flash_extra_and_gpu_check_install_only_wheels():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    flash = [r.strip() for r in cfg["options.extras_require"]["flash"].strip().splitlines() if r.strip()]
    # FA2 has no wheel for this torch: pip would compile it for about an hour
    assert flash and all(r.startswith("flash-attn-4") for r in flash), flash
    make = (ROOT / "Makefile").read_text()
    target = make[make.index("\ngpu-check:"):]
    assert "--only-binary=:all:" in target and "pytest" in target and "-m gpu" in target
    assert "evaclip.bench gpu-check" in target
    readme = (ROOT / "README.md").read_text()
    assert "Hopper" in readme and "not measured on a gpu" in readme.lower()
    assert "not measured on a gpu" in (ROOT / "docs" / "BENCHMARKS.md").read_text().lower()
