"""The CUDA paths of issue 22 checked on a CPU: host syncs of a step, the gpu-check report, the MIM task's devices,
compile order and TF32.

Stand-ins as in tests/conftest.py: ``meta`` tensors for the GPU (they take every non-CPU branch), a
monkeypatched ``torch.cuda``, and a fake ``flash_attn.cute`` module. ``HostSyncs`` counts what CUDA's sync debug mode
reports as a synchronisation, from the ops that reach the dispatcher: reads of device values (``.item()``,
``.tolist()``, copies to the host), blocking host -> device copies, and data-dependent shapes (``nonzero``, boolean
mask indexing).
Shapes: B batch, P patches, T teacher feature dim, M masked patches.
"""
from __future__ import annotations

import configparser

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

_ops = torch.ops.aten
_DATA_DEPENDENT = {_ops.nonzero.default, _ops.masked_select.default, _ops._local_scalar_dense.default,
                   _ops.masked_scatter.default, _ops.masked_scatter_.default}


def _is_mask(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)


class HostSyncs(TorchDispatchMode):
    """Counts host synchronisations of the ops run under it on ``meta`` tensors (the GPU stand-in), by kind.

    A read back to the host returns zeros (meta tensors hold no data); a data-dependent shape is taken as "every
    element selected" (the count is what matters here, not the values). ``torch.tensor(x, device=...)`` copies
    below the dispatcher, so ``watch_tensor_ctor`` (a monkeypatch of ``torch.tensor``) counts those.
    """

    def __init__(self):
        super().__init__()
        self.kinds: list[str] = []

    @property
    def count(self) -> int:
        return len(self.kinds)

    def watch_tensor_ctor(self, monkeypatch) -> None:
        real = torch.tensor

        def tensor(data, *args, device=None, **kw):
            if device is not None and torch.device(device).type != "cpu":
                self.kinds.append("torch.tensor(..., device=): blocking copy")
            return real(data, *args, device=device, **kw)

        monkeypatch.setattr(torch, "tensor", tensor)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        first = args[0] if args else None
        if func in (_ops._to_copy.default, _ops.copy_.default):
            src = first if func is _ops._to_copy.default else args[1]
            dst = kwargs.get("device", src.device) if func is _ops._to_copy.default else first.device
            dst = torch.device(dst)
            if src.device.type == "meta" and dst.type == "cpu":
                self.kinds.append("device -> host copy")
                return torch.zeros(src.shape, dtype=kwargs.get("dtype") or src.dtype)
            if src.device.type == "cpu" and dst.type == "meta" and not kwargs.get("non_blocking", False) \
                    and not (len(args) > 2 and args[2]):
                self.kinds.append("blocking host -> device copy")
        if func in _DATA_DEPENDENT:
            self.kinds.append(str(func))
        elif func in (_ops.index.Tensor, _ops.index_put.default, _ops.index_put_.default) and \
                any(_is_mask(i) for i in args[1] if i is not None):
            self.kinds.append(f"{func} with a boolean mask")
        if func is _ops._local_scalar_dense.default and first.device.type == "meta":
            return 0
        from torch.fx.experimental import _config as fx_config

        with fx_config.patch(meta_nonzero_assume_all_nonzero=True):
            return func(*args, **kwargs)


def test_host_syncs_counts_what_cuda_reports():
    x = torch.empty(4, 3, device="meta")
    mask = torch.empty(4, dtype=torch.bool, device="meta")
    with HostSyncs() as s:
        x.sum().tolist()
        x[mask]
        torch.ones(3).to("meta")
        torch.ones(3).to("meta", non_blocking=True)  # no sync
        torch.full((), 1.0, device="meta")  # no sync: filled on the device
    assert s.count == 3


# ---------------------------------------------------------------------------- 1. one host read per training step
def _meta_model_and_lamb():
    from evaclip.config import OptimCfg
    from evaclip.models import create_model
    from evaclip.optim import build_optimizer

    with torch.device("meta"):
        model = create_model("EVA02-CLIP-tiny", attn_backend="sdpa")
    for p in model.parameters():
        p.grad = torch.empty_like(p)
    return model, build_optimizer(model, OptimCfg(lr=1e-3, weight_decay=0.05, visual_ld=0.75, text_ld=0.75))


@pytest.mark.parametrize("stop", [False, True])
def test_apply_update_reads_the_device_once(monkeypatch, stop):
    """The step's one documented read (the finite / stop flags), also on LAMB's first step (its cache fill). Before:
    the stop flag was a blocking torch.tensor(..., device=) copy and LAMB's first step copied its repeat counts with
    a blocking .to(device): 3 syncs on the first step."""
    from evaclip.engine.step import apply_update

    model, opt = _meta_model_and_lamb()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss = torch.empty((), device="meta")
    for _ in range(2):  # the first step fills LAMB's caches, the second is the steady state
        for p in model.parameters():
            p.grad = torch.empty_like(p)
        syncs = HostSyncs()
        syncs.watch_tensor_ctor(monkeypatch)
        with syncs:
            apply_update(model, opt, scaler, 1.0, loss, stop_requested=stop)
        monkeypatch.undo()
        assert syncs.kinds == ["device -> host copy"], syncs.kinds  # the flags' .tolist()


# ------------------------------------------------------------------- 2. gpu-check's report, section by section
def test_gpu_check_keeps_every_section_when_one_fails(monkeypatch, tmp_path):
    """FA4's first-ever compile fails (faked): that section is a row with the one-line error, the others keep their
    figures, the report on disk grows after every section, and the command exits 1. Before: the RuntimeError ended
    the run and no report was written."""
    import json

    from evaclip.bench import __main__ as bench_main
    from evaclip.bench import cli
    from evaclip.bench.report import section

    on_disk: list = []

    def sections_on_disk() -> list:
        path = tmp_path / "gpu-check.json"
        return [s["title"] for s in json.loads(path.read_text())["sections"]] if path.exists() else []

    def train_run(args):
        on_disk.append(sections_on_disk())
        if args.attn_backend == "flash_attn":
            raise RuntimeError("cutlass.cute: DSLRuntimeError: failed to compile flash_fwd_sm90\n  (a long trace)")
        return section(f"Training step: {args.model}", [("samples_per_s", "samples/s")], [{"samples_per_s": 9.0}])

    def bench_run(name):
        def run(args):
            on_disk.append(sections_on_disk())
            return section(f"bench {name}", [("ok", "ok")], [{"ok": True}])
        return run

    monkeypatch.setattr(bench_main.train_bench, "run", train_run)
    for name in bench_main.GPU_CHECK_ARGS:
        monkeypatch.setattr(bench_main.BENCHMARKS[name], "run", bench_run(name))
    assert cli(["gpu-check", "--device", "cpu", "--out", str(tmp_path)]) == 1

    report = json.loads((tmp_path / "gpu-check.json").read_text())
    titles = [s["title"] for s in report["sections"]]
    assert titles == ["Training step: EVA02-CLIP-B-16, attention flash_attn",
                      "Training step: EVA02-CLIP-B-16, attention sdpa", "bench attention", "bench mim"]
    assert report["sections"][0]["rows"] == [
        {"status": "failed", "error": "RuntimeError: cutlass.cute: DSLRuntimeError: failed to compile flash_fwd_sm90"}]
    assert report["sections"][1]["rows"] == [{"samples_per_s": 9.0}]
    assert on_disk == [[], titles[:1], titles[:2], titles[:3]]  # each section on disk before the next one runs
    assert "failed to compile" in (tmp_path / "gpu-check.md").read_text()


def test_gpu_check_without_a_flash_kernel_is_not_a_failure(monkeypatch, tmp_path):
    from evaclip.bench import __main__ as bench_main
    from evaclip.bench.report import section
    from evaclip.models.attention import AttentionBackendError

    def train_run(args):
        if args.attn_backend == "flash_attn":
            raise AttentionBackendError("attn_backend=flash_attn cannot run on cuda: compute capability 7.5")
        return section("Training step", [], [])

    monkeypatch.setattr(bench_main.train_bench, "run", train_run)
    monkeypatch.setattr(bench_main, "GPU_CHECK_ARGS", {})
    report = bench_main.main(["gpu-check", "--device", "cpu", "--out", str(tmp_path)])
    assert report["sections"][0]["rows"][0]["status"] == "not run"
    assert bench_main.exit_code(report) == 0


# ------------------------------------------------------------ 3, 4. the air-gapped install, the FA4 pin, the driver
ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def _make_var(name: str) -> list[str]:
    """A Makefile variable's words (``NAME := ...`` with backslash continuations)."""
    import re

    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    m = re.search(rf"^{name}\s*[:?]?=(.*)$", text, re.M)
    assert m, name
    return m.group(1).split()


def _norm(name: str) -> str:
    import re

    return re.sub(r"[-_.]+", "-", name.lower())


def _requirement_names(reqs) -> list[str]:
    import re

    return [_norm(re.match(r"[A-Za-z0-9_.\-]+", r.strip()).group(0)) for r in reqs
            if r.strip() and "extra ==" not in r]


def test_wheelhouse_covers_what_the_gpu_node_lacks():
    """Every requirement of evaclip (and of the tests gpu-check runs) is on the node or in the wheelhouse, once, at
    one exact version; the wheelhouse's own requirements (read from the installed distributions) are covered too;
    torch is never in it. Before: no wheelhouse, and wandb (a lazy, optional import) was a hard requirement."""
    import configparser
    from importlib.metadata import distribution

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    required = _requirement_names(cfg["options"]["install_requires"].splitlines())
    node = {_norm(n) for n in _make_var("GPU_NODE_HAS")}
    pins = [w.split("==") for w in _make_var("WHEELHOUSE")]
    assert all(len(p) == 2 for p in pins), "one exact version each (pip refuses two)"
    house = {_norm(n): v for n, v in pins}
    assert len(house) == len(pins) and not {"torch", "torchvision"} & set(house)
    assert [r for r in required if r not in node | set(house)] == []
    assert "wandb" not in required  # an extra: the node has no network for it
    for name, version in house.items():
        dist = distribution(name)
        assert dist.version == version, (name, dist.version, version)  # the versions this suite runs
        missing = [r for r in _requirement_names(dist.requires or []) if r not in node | set(house)]
        assert missing == [], (name, missing)


def test_gpu_check_installs_offline_over_the_system_torch():
    make = (ROOT / "Makefile").read_text()
    venv = make[make.index("\ngpu-venv:"):]
    venv = venv[:venv.index("\n\n")]
    assert "--system-site-packages" in venv and "--no-index" in venv and "$(WHEELHOUSE)" in venv
    check = make[make.index("\ngpu-check:"):]
    check = check[:check.index("\n\n")]
    assert "evaclip/cuda_env.py" in check and "gpu-venv" in check
    house = make[make.index("\nwheelhouse:"):]
    house = house[:house.index("\n\n")]
    assert "--no-deps" in house and "--only-binary=:all:" in house and "--python-version" in house
    assert "60" in house  # the size is printed against the budget


def test_flash_attn_4_pinned_to_the_beta_read_with_cuda13_variant():
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    extras = cfg["options.extras_require"]
    assert extras["flash"].strip().startswith("flash-attn-4==4.0.0b36")  # before: >=4.0.0b36 (resolves to b40)
    assert extras["flash-cu13"].strip().startswith("flash-attn-4[cu13]==4.0.0b36")
    assert "torch>=2.11" in cfg["options"]["install_requires"]
    assert _make_var("FA4") == ["flash-attn-4==4.0.0b36"]
    assert "nvidia-cutlass-dsl-libs-cu13==4.8.1" in _make_var("FA4_WHEELS")


@pytest.mark.parametrize("driver,built,expect", [
    ((12, 8), "13.0", "driver is too old for this torch: it supports CUDA up to 12.8, torch .* is built for CUDA 13.0; "
                      "update the driver \\(CUDA 13 needs >= 580\\)"),
    (None, "13.0", "no NVIDIA driver was found"),
    ((13, 0), None, "CPU-only build"),
])
def test_cuda_unavailable_says_why(monkeypatch, driver, built, expect):
    """A driver older than torch's CUDA (torch 2.11 cu130 on a CUDA 12 driver) is named as such; before: "torch sees
    no CUDA device" from the flash probe and from make gpu-check."""
    import re

    from evaclip import cuda_env
    from evaclip.models.attention import flash_kernel, resolve_backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", built)
    monkeypatch.setattr(cuda_env, "driver_cuda_version", lambda: driver)
    kernel, why = flash_kernel("cuda")
    assert kernel is None and re.search(expect, why), why
    assert re.search(expect, cuda_env.cuda_unavailable_reason())
    assert resolve_backend("auto", "cuda", "bf16") == "sdpa"


def test_cuda_env_script_exits_1_with_the_reason_on_a_machine_without_gpu():
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run([sys.executable, str(ROOT / "evaclip" / "cuda_env.py")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("gpu-check: ") and len(proc.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------------- 9. TF32
def test_fp32_on_cuda_gets_tf32_matmuls_unless_switched_off(monkeypatch):
    from evaclip.precision import set_tf32

    seen = []
    monkeypatch.setattr(torch, "set_float32_matmul_precision", seen.append)
    cuda = torch.device("cuda")  # a device object needs no GPU
    assert set_tf32("fp32", cuda) and seen == ["high"]  # before: fp32 on CUDA stayed at "highest"
    assert not set_tf32("fp32", cuda, enabled=False) and seen[-1] == "highest"
    seen.clear()
    assert not set_tf32("bf16", cuda) and not set_tf32("fp32", torch.device("cpu")) and seen == []


def test_the_training_loop_applies_the_tf32_key(monkeypatch, run_cfg):
    from evaclip.engine import loop
    from evaclip.train import main

    calls = []
    monkeypatch.setattr(loop, "set_tf32", lambda *a: calls.append(a) or False)
    main(run_cfg("data.batch_size=2", "max_steps=1", "optim.warmup_steps=0", "tf32=false"))
    assert calls == [("fp32", torch.device("cpu"), False)]


# ------------------------------------------------------------------- 5, 7. the MIM task on a GPU (meta stands in)
def _mim_task(tmp_path, teacher, precision, backend, device):
    from evaclip.config import load_config
    from evaclip.distributed import DistEnv
    from evaclip.tasks.mim import MIMTask

    cfg = load_config(None, ["task=mim", f"mim.teacher={teacher}", "mim.teacher_model=EVA02-CLIP-tiny",
                             "model.name=EVA02-CLIP-tiny", f"model.attn_backend={backend}", "data.synthetic=true",
                             f"precision={precision}", "device=cpu", f"output_dir={tmp_path}",
                             "model.token_drop=0.0"])
    return MIMTask(cfg, DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device(device)))


@pytest.mark.parametrize("backend", ["flash_attn", "auto"])
def test_mim_builds_student_and_teacher_for_the_runs_device_and_precision(flash_on_meta, teacher_file, tmp_path,
                                                                         backend):
    """Before: the student was built for the CPU (flash_attn refused there: "cannot run on cpu"), and the teacher
    stayed an fp32 SDPA replica on the GPU."""
    task = _mim_task(tmp_path, teacher_file, "bf16", backend, "meta")
    student = task.build_model()
    assert student.cls_token.device.type == "meta" and student.layout == "BNHD"  # flash_attn's layout
    assert {m.backend for m in student.modules() if type(m).__name__ == "Attend"} == {"flash_attn"}
    task.setup(student)
    teacher = task.teacher
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in teacher.parameters()} == {"meta"}
    assert all(b.dtype != torch.bfloat16 for b in teacher.buffers())  # RoPE tables stay fp32
    attends = [m for m in teacher.modules() if type(m).__name__ == "Attend"]
    assert attends and {(a.backend, a.precision) for a in attends} == {("flash_attn", "bf16")}


def test_mim_fp32_run_keeps_an_fp32_sdpa_teacher(flash_on_meta, teacher_file, tmp_path):
    task = _mim_task(tmp_path, teacher_file, "fp32", "auto", "meta")
    task.setup(task.build_model())
    assert {p.dtype for p in task.teacher.parameters()} == {torch.float32}
    assert {m.backend for m in task.teacher.modules() if type(m).__name__ == "Attend"} == {"sdpa"}


def test_mim_step_reads_nothing_back_to_the_host(teacher_file, tmp_path):
    """Two micro-batches with different mask counts: before, x[mask] in the student and in the loss made two host
    syncs per micro-batch (the count of True) and a shape that changes with it."""
    import contextlib

    from evaclip.engine.step import step_context

    task = _mim_task(tmp_path, teacher_file, "fp32", "sdpa", "meta")
    student = task.build_model()
    task.setup(student)
    size = student.cfg.image_size
    micro = [(torch.empty(2, 3, size, size, device="meta"),
              torch.empty(2, student.cfg.grid ** 2, dtype=torch.bool, device="meta")) for _ in range(2)]
    ctx = step_context(contextlib.nullcontext, None, torch.device("meta"))
    with HostSyncs() as syncs:
        out = task.forward_backward(student, micro, ctx)
    assert syncs.kinds == [] and out["loss"].shape == ()
    assert student.lm_head.weight.grad is not None


def test_mim_loss_over_every_position_equals_the_masked_rows():
    """The weighted B x P x T form against the loss on the masked rows picked by boolean indexing (value and
    gradient)."""
    from evaclip.losses import mim_cosine_loss

    g = torch.Generator().manual_seed(0)
    pred = torch.randn(3, 16, 8, generator=g, requires_grad=True)
    target = torch.randn(3, 16, 8, generator=g)
    mask = torch.rand(3, 16, generator=g) < 0.4
    dense = mim_cosine_loss(pred, target, mask, denom=torch.tensor(7.0))
    (g_dense,) = torch.autograd.grad(dense, pred)
    rows = -torch.nn.functional.cosine_similarity(pred[mask], target[mask], dim=-1).sum() / 7.0
    (g_rows,) = torch.autograd.grad(rows, pred)
    torch.testing.assert_close(dense, rows)
    torch.testing.assert_close(g_dense, g_rows)
    assert (g_dense[~mask] == 0).all()


# ------------------------------------------------------------------------- 8. FA4 as a torch op; compile order
def _attention_math(q, k, v):
    """softmax(q k^T / sqrt(F)) v of B N H F tensors, and the row log-sum-exp B H N (what FA4 computes)."""
    qt, kt, vt = (t.transpose(1, 2).float() for t in (q, k, v))
    s = qt @ kt.transpose(-1, -2) / qt.shape[-1] ** 0.5
    lse = torch.logsumexp(s, dim=-1)
    return (torch.exp(s - lse[..., None]) @ vt).transpose(1, 2).to(q.dtype), lse


@pytest.fixture
def cpu_fa4(monkeypatch):
    """flash_attn.cute whose kernels compute real attention on the CPU but, like FA4's CuTe-DSL launches, cannot be
    traced by torch.compile (``torch.compiler.disable``); its public ``flash_attn_func`` is an autograd.Function
    around them, as FA4's is."""
    import sys
    import types

    @torch.compiler.disable
    def _flash_attn_fwd(q, k, v, causal=False, return_lse=False, **kw):
        assert not causal
        out, lse = _attention_math(q, k, v)
        return out, lse, None, None, None

    @torch.compiler.disable
    def _flash_attn_bwd(q, k, v, out, dout, lse, softmax_scale=None, causal=False, **kw):
        qt, kt, vt, o, do = (t.transpose(1, 2).float() for t in (q, k, v, out, dout))
        scale = qt.shape[-1] ** -0.5
        p = torch.exp(qt @ kt.transpose(-1, -2) * scale - lse[..., None])
        dv = p.transpose(-1, -2) @ do
        ds = p * (do @ vt.transpose(-1, -2) - (do * o).sum(-1, keepdim=True))
        dq, dk = ds @ kt * scale, ds.transpose(-1, -2) @ qt * scale
        return tuple(g.transpose(1, 2).to(q.dtype) for g in (dq, dk, dv))

    class FlashAttnFunc(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            out, lse = _flash_attn_fwd(q, k, v)[:2]
            ctx.save_for_backward(q, k, v, out, lse)
            return out

        @staticmethod
        def backward(ctx, dout):
            return _flash_attn_bwd(*ctx.saved_tensors[:4], dout, ctx.saved_tensors[4])

    pkg, cute, interface = (types.ModuleType(n) for n in ("flash_attn", "flash_attn.cute", "flash_attn.cute.interface"))
    interface._flash_attn_fwd, interface._flash_attn_bwd = _flash_attn_fwd, _flash_attn_bwd
    cute.flash_attn_func = lambda q, k, v, causal=False: FlashAttnFunc.apply(q, k, v)
    cute.interface, pkg.cute, pkg.__path__ = interface, cute, []
    for name, mod in (("flash_attn", pkg), ("flash_attn.cute", cute), ("flash_attn.cute.interface", interface)):
        monkeypatch.setitem(sys.modules, name, mod)
    return cute


def _qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 7, 3, 8, generator=g, requires_grad=True) for _ in range(3)]  # B N H F


def test_fa4_op_is_registered_with_fake_and_autograd(cpu_fa4):
    from evaclip.models.fa4_op import flash_attn_func  # noqa: F401  (registers the ops)

    torch.library.opcheck(torch.ops.evaclip.fa4_fwd.default, (*_qkv(), False))


def test_compiled_fa4_call_is_one_graph_and_matches_sdpa(cpu_fa4):
    """Before: FA4's call (a Python autograd.Function around CuTe launches) broke the compiled graph at every
    attention; as evaclip::fa4_fwd it compiles with fullgraph=True, and values and gradients match SDPA."""
    from torch._dynamo.exc import Unsupported

    from evaclip.models.fa4_op import flash_attn_func

    def loss(attn, q, k, v):
        return (attn(q, k, v) * torch.linspace(-1, 1, 8)).sum()

    torch._dynamo.reset()
    with pytest.raises(Unsupported):  # FA4's own entry point: a graph break (fullgraph refuses it)
        torch.compile(lambda q, k, v: loss(cpu_fa4.flash_attn_func, q, k, v), fullgraph=True, backend="eager")(*_qkv())
    torch._dynamo.reset()
    q, k, v = _qkv()
    compiled = torch.compile(lambda q, k, v: loss(flash_attn_func, q, k, v), fullgraph=True, backend="aot_eager")
    got = compiled(q, k, v)
    grads = torch.autograd.grad(got, (q, k, v))
    q2, k2, v2 = _qkv()

    def sdpa(q, k, v):  # B N H F in and out, as FA4
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)

    want = loss(sdpa, q2, k2, v2)
    torch.testing.assert_close(got, want)
    for a, b in zip(grads, torch.autograd.grad(want, (q2, k2, v2))):
        torch.testing.assert_close(a, b)


def _tiny_wheel(folder, name="evaclip_probe", version="1.0"):
    """A one-module wheel, built by hand (no network, no build backend)."""
    import base64
    import hashlib
    import zipfile

    files = {f"{name}.py": "VALUE = 42\n",
             f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{name}-{version}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\n"
                                                  "Tag: py3-none-any\n"}
    record = [f"{p},sha256={base64.urlsafe_b64encode(hashlib.sha256(t.encode()).digest()).rstrip(b'=').decode()},"
              f"{len(t.encode())}" for p, t in files.items()] + [f"{name}-{version}.dist-info/RECORD,,"]
    files[f"{name}-{version}.dist-info/RECORD"] = "\n".join(record) + "\n"
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as z:
        for p, t in files.items():
            z.writestr(p, t)


def test_gpu_venv_over_a_venv_python_sees_its_torch_and_installs_offline(tmp_path):
    """The GPU image's python3 is itself a venv (/opt/torch/.venv): a venv made over it with --system-site-packages
    sees only the interpreter beneath, without torch. gpu-venv adds the venv's site-packages (this suite's Python is a
    venv too) and installs the wheelhouse with --no-index."""
    import os
    import subprocess
    import sys

    if sys.prefix == sys.base_prefix:
        pytest.skip("this suite's Python is not a venv")
    _tiny_wheel(tmp_path / "wh")
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": "", "PIP_CONSTRAINT": ""}
    proc = subprocess.run(["make", "-s", "gpu-venv", f"GPU_PY={sys.executable}", f"GPU_VENV={tmp_path / 'gv'}",
                           f"WHEELS={tmp_path / 'wh'}", "WHEELHOUSE=evaclip_probe==1.0"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "--no-index" in proc.stdout
    check = subprocess.run([str(tmp_path / "gv" / "bin" / "python"), "-c",
                            "import torch, evaclip_probe; print(torch.__file__, evaclip_probe.__file__)"],
                           capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stderr
    torch_file, probe_file = check.stdout.split()
    assert str(tmp_path / "gv") not in torch_file and str(tmp_path / "gv") in probe_file  # torch not reinstalled


def test_device_choice_says_why_cuda_is_not_usable(monkeypatch):
    """device=cuda on a node whose driver is older than torch's CUDA names the driver; device=auto falls back to the
    CPU with a warning on a machine that has a driver (before: "no CUDA device is available", and a silent CPU run)."""
    from evaclip import cuda_env
    from evaclip.distributed import resolve_device
    from evaclip.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cuda_env, "driver_cuda_version", lambda: (12, 8))
    with pytest.raises(ConfigError, match="driver is too old for this torch.*CUDA 13 needs >= 580"):
        resolve_device("cuda")
    with pytest.warns(UserWarning, match="device=auto runs on the CPU: the NVIDIA driver is too old"):
        assert resolve_device("auto") == torch.device("cpu")


# ---------------------------------------------------------------------------------- issue 15 on a CPU: installing flash
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
