"""CUDA-only checks (marked ``gpu``; skipped without a GPU): flash_attn and torch's fused SDPA against the eager
reference in bf16, token dropping and backward on the fast path."""
import pytest
import torch

from evaclip.models import create_model
from evaclip.models.attention import flash_attn_usable

pytestmark = pytest.mark.gpu

BF16_TOL = dict(rtol=2e-2, atol=2e-2)


def _pair(backend, name="EVA02-CLIP-tiny", **kw):
    torch.manual_seed(0)
    ref = create_model(name, attn_backend="eager", device="cuda", **kw).eval()
    fast = create_model(name, attn_backend=backend, device="cuda", **kw).eval()
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def _inputs(model, batch=4):
    s = model.cfg.vision.image_size
    tokens = torch.randint(1, 49000, (batch, model.cfg.text.context_length), device="cuda")
    tokens[:, 9] = 49407
    return torch.randn(batch, 3, s, s, device="cuda"), tokens


def _compare(ref, fast):
    x, tok = _inputs(ref)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a, b = ref(x, tok), fast(x, tok)
    torch.testing.assert_close(b.image_features.float(), a.image_features.float(), **BF16_TOL)
    torch.testing.assert_close(b.text_features.float(), a.text_features.float(), **BF16_TOL)


@pytest.mark.parametrize("name", ["EVA02-CLIP-tiny", "EVA01-CLIP-tiny", "EVA02-CLIP-demo"])
def test_sdpa_cuda_equals_eager_bf16(name):
    _compare(*_pair("sdpa", name))


@pytest.mark.parametrize("name", ["EVA02-CLIP-tiny", "EVA02-CLIP-demo"])
def test_flash_attn_equals_eager_bf16(name):
    if not flash_attn_usable(torch.device("cuda")):
        pytest.skip("flash-attn is not installed")
    _compare(*_pair("flash_attn", name))


def test_auto_prefers_flash_attn_when_usable():
    m = create_model("EVA02-CLIP-tiny", device="cuda")
    assert m.attn_backend == ("flash_attn" if flash_attn_usable(torch.device("cuda")) else "sdpa")


@pytest.mark.parametrize("backend", ["sdpa", "flash_attn"])
def test_token_drop_train_step_on_fast_path(backend):
    if backend == "flash_attn" and not flash_attn_usable(torch.device("cuda")):
        pytest.skip("flash-attn is not installed")
    m = create_model("EVA02-CLIP-demo", attn_backend=backend, token_drop=0.5, grad_checkpointing=True,
                     device="cuda").train()
    x, tok = _inputs(m, batch=8)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = m(x, tok)
        loss = (out.logit_scale * out.image_features @ out.text_features.T).logsumexp(-1).mean()
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in m.parameters() if p.requires_grad)
