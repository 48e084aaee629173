"""Attention backends: sdpa (fast path) against the eager reference, causality, and backend resolution; the
resolution on a GPU machine checked on a CPU (issue 15: the GPU stand-ins of tests/conftest.py).

Shapes: B batch, H heads, N tokens, D head dim, L context length.
"""
import importlib.abc
import importlib.machinery
import logging
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from evaclip.models import AttentionBackendError, create_model
from evaclip.models.attention import (
    Attend,
    eager_attention,
    flash_attn_usable,
    flash_kernel,
    resolve_backend,
    sdpa_attention,
)

MODEL = "EVA02-CLIP-tiny"


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_equals_eager_kernel(causal):
    q_BHND, k_BHND, v_BHND = (torch.randn(2, 3, 17, 16, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(sdpa_attention(q_BHND, k_BHND, v_BHND, causal),
                               eager_attention(q_BHND, k_BHND, v_BHND, causal))


def test_eager_causal_mask_hides_the_future():
    q_BHND, k_BHND, v_BHND = (torch.randn(1, 2, 6, 8) for _ in range(3))
    out = eager_attention(q_BHND, k_BHND, v_BHND, causal=True)
    k2, v2 = k_BHND.clone(), v_BHND.clone()
    k2[:, :, 4:], v2[:, :, 4:] = 9.0, -9.0  # change only positions 4, 5
    out2 = eager_attention(q_BHND, k2, v2, causal=True)
    torch.testing.assert_close(out[:, :, :4], out2[:, :, :4])
    assert not torch.allclose(out[:, :, 4:], out2[:, :, 4:])


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_text_tower_is_causal(backend):
    """Tokens after the EOT cannot change the pooled text feature (is_causal for sdpa, explicit mask for eager)."""
    m = create_model("EVA02-CLIP-tiny", attn_backend=backend).eval()
    tokens_BL = torch.randint(1, 49000, (2, 77))
    tokens_BL[:, 5] = 49407
    other = tokens_BL.clone()
    other[:, 6:] = torch.randint(1, 49000, (2, 71))
    torch.testing.assert_close(m.encode_text(tokens_BL), m.encode_text(other))


def test_backend_layouts_and_resolution():
    assert Attend("sdpa").layout == Attend("eager").layout == "BHND"
    assert resolve_backend("auto", torch.device("cpu")) == "sdpa"
    assert resolve_backend("eager") == "eager"
    assert create_model("EVA02-CLIP-tiny", attn_backend="eager").attn_backend == "eager"
    if not torch.cuda.is_available():
        with pytest.raises(AttentionBackendError, match="flash"):
            resolve_backend("flash_attn")


# ------------------------------------------------------------------- issue 15 on a CPU: backend from the model's device
def _tiny_batch(model, n=2):
    s = model.cfg.vision.image_size
    tokens = torch.randint(1, model.cfg.text.vocab_size - 1, (n, model.cfg.text.context_length))
    tokens[:, -1] = model.cfg.text.vocab_size - 1
    return torch.randn(n, 3, s, s), tokens


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


def test_auto_backend_follows_the_model_when_it_moves(flash_on_meta):
    """meta stands in for a CUDA device with a working flash kernel: .to() re-resolves auto, explicit stays."""
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


def test_cpu_training_and_eval_with_cuda_reported_and_flash_importable(fake_cuda, fake_flash, tmp_path, run_cfg):
    """`evaclip train device=cpu` and `evaclip eval --device cpu` on a GPU machine with flash-attn installed."""
    from evaclip.evals.common import encode_images, encode_texts
    from evaclip.runs import load_model
    from evaclip.train import main

    calls = fake_flash(fa2=True)
    main(run_cfg("data.batch_size=2", "max_steps=2", "model.token_drop=0.0"))
    path = tmp_path / "weights.pt"
    torch.save(create_model(MODEL, attn_backend="sdpa").state_dict(), path)
    model, _ = load_model(str(path), MODEL, device="cpu")
    assert model.attn_backend == "sdpa"
    images, tokens = _tiny_batch(model)
    assert encode_images(model, images, "cpu").shape == (2, 32)
    assert encode_texts(model, lambda texts: tokens[:len(texts)], ["a", "b"], "cpu").shape == (2, 32)
    assert calls == []


# ----------------------------------------------------------------------------------------- issue 15 on a CPU: precision
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


# ----------------------------------------------------------------------------------------- issue 15 on a CPU: the probe
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
