"""Shared test settings and fixtures: CUDA-only tests (marked ``gpu``) skip cleanly on machines without a GPU; the
tiny models and files several test modules use."""
import sys
import types

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_model():
    from evaclip.models import create_model

    return create_model("EVA02-CLIP-tiny", attn_backend="sdpa")


@pytest.fixture(scope="session")
def teacher_file(tmp_path_factory):
    """A tiny CLIP's state dict (weights drawn with std 0.2, so its features are not the init's), as a MIM teacher."""
    from evaclip.models import create_model

    clip = create_model("EVA02-CLIP-tiny", attn_backend="sdpa")
    with torch.no_grad():
        for p in clip.parameters():
            p.normal_(0, 0.2)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save(clip.state_dict(), path)
    return str(path)


# ---------------------------------------------------------------------------------------------------- tiny runs
TINY_RUN = ("demo_cpu", "model.name=EVA02-CLIP-tiny", "data.synthetic=true", "data.batch_size=4", "device=cpu",
            "name=run", "log.every=1", "log.tensorboard=false", "optim.warmup_steps=1", "model.token_drop_until=null")


def _tiny_run_args(output_dir, *extra: str) -> list[str]:
    return [*TINY_RUN, f"output_dir={output_dir}", *extra]


@pytest.fixture
def run_args(tmp_path):
    """``run_args(*extra)``: the ``evaclip train`` arguments of a tiny CLIP run in ``tmp_path/run``: the ``demo_cpu``
    recipe with EVA02-CLIP-tiny on synthetic data, batch 4, one warmup step, every step logged to metrics.jsonl (no
    TensorBoard). ``extra`` overrides come last, so they win."""
    return lambda *extra: _tiny_run_args(tmp_path, *extra)


@pytest.fixture
def run_cfg(run_args):
    """``run_cfg(*extra)``: ``run_args``' run as a validated config."""
    from evaclip.config import load_config

    def cfg(*extra):
        args = run_args(*extra)
        return load_config(args[0], args[1:])
    return cfg


@pytest.fixture(scope="session")
def teacher_run(tmp_path_factory):
    """A tiny CLIP run folder (two synthetic steps; its config.yaml names the architecture), to teach MIM runs."""
    from evaclip.train import cli

    out = tmp_path_factory.mktemp("teacher_run")
    assert cli(_tiny_run_args(out, "max_steps=2", "name=clip")) == 0
    return out / "clip"


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """The digits (``data_tools.make_demo``, one copy per digit, 160 samples a shard): real image-text shards."""
    from data_tools.make_demo import make_demo

    out = tmp_path_factory.mktemp("digits")
    return make_demo(str(out), seed=0, copies=1, samples_per_shard=160, show_progress=False)


@pytest.fixture
def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a test's gloo process group (``MASTER_PORT``)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------- GPU stand-ins
# A GPU on a CPU: ``torch.cuda`` monkeypatched, fake ``flash_attn`` (FA2) / ``flash_attn.cute`` (FA4) modules in
# ``sys.modules``, ``meta`` tensors for the device. Shapes: B batch, N tokens, H heads, D head dim.
@pytest.fixture
def fake_cuda(monkeypatch):
    """torch reports a CUDA device of compute capability ``fake_cuda.capability`` (default 9.0, Hopper)."""
    from evaclip.models import attention as attn_mod

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


@pytest.fixture
def flash_on_meta(monkeypatch):
    """A flash kernel that runs on the meta device (the GPU stand-in) and nowhere else."""
    from evaclip.models import attention as attn_mod

    def fake_kernel(device="cuda"):
        if device is not None and torch.device(device).type == "meta":
            return attn_mod.FlashKernel(lambda q, k, v, causal=False: torch.empty_like(q), "FA4", False), "stand-in"
        return None, "flash-attn runs on the stand-in GPU only"

    monkeypatch.setattr(attn_mod, "flash_kernel", fake_kernel)
