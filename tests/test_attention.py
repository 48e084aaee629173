"""Attention backends: sdpa (fast path) against the eager reference, causality, and backend resolution.

Shapes: B batch, H heads, N tokens, D head dim, L context length.
"""
import pytest
import torch

from evaclip.models import AttentionBackendError, create_model
from evaclip.models.attention import Attend, eager_attention, resolve_backend, sdpa_attention


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
