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
    ref = create_model(name, attn_backend="eager", device="cuda", precision="bf16", **kw).eval()
    fast = create_model(name, attn_backend=backend, device="cuda", precision="bf16", **kw).eval()
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
    m = create_model("EVA02-CLIP-tiny", device="cuda", precision="bf16")
    assert m.attn_backend == ("flash_attn" if flash_attn_usable(torch.device("cuda")) else "sdpa")
    assert create_model("EVA02-CLIP-tiny", device="cuda").attn_backend == "sdpa"  # fp32 run: never flash
    assert create_model("EVA02-CLIP-tiny", precision="bf16").attn_backend == "sdpa"  # device None: the CPU


def test_auto_backend_follows_moves_between_cpu_and_cuda():
    m = create_model("EVA02-CLIP-tiny", precision="bf16").eval()
    x, tok = _inputs(m)
    cpu_out = m(x.cpu(), tok.cpu())
    m.cuda()
    assert m.attn_backend == ("flash_attn" if flash_attn_usable("cuda") else "sdpa")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        gpu_out = m(x, tok)
    torch.testing.assert_close(gpu_out.image_features.float().cpu(), cpu_out.image_features, **BF16_TOL)
    m.cpu()
    assert m.attn_backend == "sdpa"
    m(x.cpu(), tok.cpu())


def test_clip_grad_norm_with_host_and_gpu_grads():
    """FSDP2 cpu_offload's layout: most gradients on the host, logit_scale's on the GPU."""
    from evaclip.optim import clip_grad_norm_

    host = [torch.nn.Parameter(torch.randn(64, 32)) for _ in range(3)]
    gpu = torch.nn.Parameter(torch.tensor(2.0, device="cuda"))
    for p in host:
        p.grad = torch.randn_like(p)
    gpu.grad = torch.tensor(3.0, device="cuda")
    expected = torch.cat([p.grad.flatten() for p in host] + [gpu.grad.cpu().view(1)]).norm()
    total = clip_grad_norm_(host + [gpu], 1.0)
    assert total.is_cuda
    torch.testing.assert_close(total.cpu(), expected)
    after = torch.cat([p.grad.flatten() for p in host] + [gpu.grad.cpu().view(1)]).norm()
    torch.testing.assert_close(after, torch.tensor(1.0), rtol=1e-4, atol=1e-4)


def test_lamb_step_kernels_do_not_grow_with_the_tensor_count():
    from torch.profiler import ProfilerActivity, profile

    from evaclip.optim import Lamb

    params = [torch.nn.Parameter(torch.randn(8 + i, 16, device="cuda")) for i in range(100)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = Lamb(params, lr=1e-3, weight_decay=0.05)
    opt.step()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        opt.step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert 0 < len(kernels) < 60, len(kernels)  # one kernel per tensor (the old 0-d scaling) would be >= 100


def test_flash_attention_flops_are_counted():
    from evaclip.bench.flops import count_flops
    from evaclip.models.attention import Attend

    if not flash_attn_usable("cuda"):
        pytest.skip("no flash-attn kernel on this GPU")
    b, h, n, d = 2, 4, 197, 64
    q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    att = Attend("flash_attn", precision="bf16")
    assert count_flops(lambda: att(q, k, v).sum().backward()) == 7 * 2 * b * h * n * n * d


@pytest.mark.parametrize("backend", ["sdpa", "flash_attn"])
def test_token_drop_train_step_on_fast_path(backend):
    if backend == "flash_attn" and not flash_attn_usable(torch.device("cuda")):
        pytest.skip("flash-attn is not installed")
    m = create_model("EVA02-CLIP-demo", attn_backend=backend, token_drop=0.5, grad_checkpointing=True,
                     device="cuda", precision="bf16").train()
    x, tok = _inputs(m, batch=8)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = m(x, tok)
        loss = (out.logit_scale * out.image_features @ out.text_features.T).logsumexp(-1).mean()
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in m.parameters() if p.requires_grad)
