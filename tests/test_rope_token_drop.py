"""RoPE tables against timm's EVA RoPE, and token dropping against timm's patch dropout on the same kept indices.

Shapes: B batch, H heads, N tokens, D head dim, K kept patches.
"""
import pytest
import torch

from evaclip.models import create_model
from evaclip.models import vision as vision_mod
from evaclip.models.convert import load_visual
from evaclip.models.rope import apply_rope, rope_tables
from evaclip.models.token_drop import drop_tokens, num_kept


def _timm_eva(cfg, **kw):
    from timm.models.eva import Eva

    v = cfg.vision
    return Eva(img_size=v.image_size, patch_size=v.patch_size, num_classes=cfg.embed_dim, embed_dim=v.width,
               depth=v.depth, num_heads=v.heads, mlp_ratio=v.mlp_ratio, qkv_fused=False, swiglu_mlp=True,
               scale_mlp=True, scale_attn_inner=True, use_rot_pos_emb=True,
               ref_feat_shape=(v.pt_hw_seq_len, v.pt_hw_seq_len), global_pool="token", **kw)


@pytest.mark.parametrize("grid,pt_grid", [(4, 4), (6, 4), (14, 16)])  # same grid; 336-on-224 style; B-16 on 224/14
def test_rope_tables_match_timm(grid, pt_grid):
    """EVA's frequency layout (rows then columns, interleaved pairs) and the rescaling to the pretraining grid."""
    from timm.layers import RotaryEmbeddingCat, apply_rot_embed_cat

    D = 32
    rope = RotaryEmbeddingCat(D, in_pixels=False, feat_shape=[grid, grid], ref_feat_shape=[pt_grid, pt_grid])
    x_BHND = torch.randn(2, 3, grid * grid, D)
    cos, sin = rope_tables(D, grid, pt_grid)
    torch.testing.assert_close(apply_rope(x_BHND, cos, sin), apply_rot_embed_cat(x_BHND, rope.get_embed()),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="divisible by 4"):
        rope_tables(30, grid)


def test_token_drop_matches_timm_patch_dropout(monkeypatch):
    """Same weights, same kept indices (timm's choice): evaclip's tower gives timm's output with patch dropout on."""
    ours = create_model("EVA02-CLIP-tiny", attn_backend="eager", token_drop=0.5).train()
    ref = _timm_eva(ours.cfg, patch_drop_rate=0.5).train()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.3)
    load_visual(ours, ref.state_dict())
    seen = {}
    ref.patch_drop.register_forward_hook(lambda mod, inp, out: seen.update(idx=out[1]))  # returns None: output kept
    x = torch.randn(3, 3, 32, 32)
    expected = ref(x)
    idx_BK = seen["idx"]
    assert idx_BK.shape == (3, 8)

    def timm_choice(batch, num_patches, keep_ratio, device=None, generator=None):
        assert keep_ratio == 0.5 and (batch, num_patches) == (3, 16)
        return idx_BK

    monkeypatch.setattr(vision_mod, "keep_indices", timm_choice)
    torch.testing.assert_close(ours.visual(x), expected, rtol=1e-4, atol=1e-4)


def test_drop_tokens_counts_and_order():
    x_BND = torch.randn(4, 1 + 49, 8)
    kept, idx = drop_tokens(x_BND, keep_ratio=0.25, num_prefix=1)
    K = num_kept(49, 0.75)
    assert K == 12 and kept.shape == (4, 1 + K, 8) and idx.shape == (4, K)
    assert (idx.diff(dim=1) > 0).all() and idx.min() >= 0 and idx.max() < 49  # sorted raster order, in range
    torch.testing.assert_close(kept[:, 1:], torch.stack([x_BND[b, 1:][idx[b]] for b in range(4)]))
    assert num_kept(16, 0.99) == 1  # never drops every patch
    g = torch.Generator().manual_seed(7)
    a = drop_tokens(x_BND, 0.5, 1, generator=g)[1]
    b = drop_tokens(x_BND, 0.5, 1, generator=torch.Generator().manual_seed(7))[1]
    torch.testing.assert_close(a, b)  # a seeded generator reproduces the choice


def test_set_token_drop_switches_phases():
    m = create_model("EVA02-CLIP-tiny", token_drop=0.5).train()
    seen = []
    m.visual.blocks[0].register_forward_hook(lambda mod, inp, out: seen.append(out.shape[1]))
    x = torch.randn(2, 3, 32, 32)
    m.encode_image(x)
    m.visual.set_token_drop(0.0)  # unmasked tuning phase (FLIP)
    m.encode_image(x)
    assert seen == [1 + 8, 1 + 16]
    with pytest.raises(ValueError, match="token_drop"):
        m.visual.set_token_drop(1.0)


def test_token_drop_backward_reaches_all_parameters():
    m = create_model("EVA02-CLIP-tiny", token_drop=0.5, grad_checkpointing=True).train()
    m.encode_image(torch.randn(2, 3, 32, 32)).sum().backward()
    missing = [n for n, p in m.visual.named_parameters() if p.grad is None]
    assert not missing, missing


def _full_path_pooled(v, x):
    """Reference pooling: every block on every token, then the CLS row (the path without the last-block cut)."""
    return v.head(v.forward_features(x)[:, 0])


@pytest.mark.parametrize("name", ["EVA02-CLIP-tiny", "EVA01-CLIP-tiny"])
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("drop,ckpt", [(0.0, False), (0.5, False), (0.5, True)])
def test_cls_only_last_block_is_exact(name, backend, drop, ckpt):
    """forward() runs the last block on the CLS query only: same embeddings and same gradients as the full path."""
    m = create_model(name, attn_backend=backend, token_drop=drop, grad_checkpointing=ckpt).train()
    with torch.no_grad():
        for p in m.visual.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    v = m.visual
    x = torch.randn(3, 3, 32, 32)
    w = torch.randn(3, m.cfg.embed_dim)
    outs, grads, last_rows = [], [], []
    v.blocks[-1].register_forward_hook(lambda mod, inp, out: last_rows.append(out.shape[1]))
    for fn in (v, lambda t: _full_path_pooled(v, t)):
        torch.manual_seed(5)  # same kept patches in both
        out = fn(x)
        (out * w).sum().backward()
        outs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in v.named_parameters()})
        v.zero_grad(set_to_none=True)
    assert last_rows[0] == 1 and last_rows[-1] == (9 if drop else 17)  # the cut path really ran on CLS only
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        scale = grads[1][n].abs().max().item()  # fp32 rounding differs with the GEMM shapes: compare to the scale
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-5 * scale,
                                   msg=lambda s, n=n: f"{n}: {s}")


def test_kept_patch_embedding_equals_conv_then_gather():
    """Embedding only the kept patches (gather pixels, GEMM with the conv weight) == conv on all, then gather."""
    v = create_model("EVA02-CLIP-tiny").visual
    x = torch.randn(4, 3, 32, 32)
    idx_BK = torch.stack([torch.randperm(16)[:8].sort().values for _ in range(4)])
    full_BPD = v.patch_embed(x)
    expected = full_BPD.gather(1, idx_BK.unsqueeze(-1).expand(-1, -1, full_BPD.shape[-1]))
    torch.testing.assert_close(v.patch_embed(x, idx_BK), expected, rtol=1e-5, atol=1e-5)


class _SdpaInFlashLayout(torch.nn.Module):
    """flash_attn's B N H D layout computed by SDPA: runs the tower's BNHD code paths (RoPE head axis, CLS-only
    query, output reshape) on a machine without flash-attn."""

    layout, backend = "BNHD", "sdpa"

    def forward(self, q, k, v, causal=False):
        from evaclip.models.attention import sdpa_attention

        return sdpa_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal).transpose(1, 2)


@pytest.mark.parametrize("drop", [0.0, 0.5])
def test_flash_layout_paths_equal_sdpa_layout(drop):
    a = create_model("EVA02-CLIP-tiny", attn_backend="sdpa", token_drop=drop).train()
    b = create_model("EVA02-CLIP-tiny", attn_backend="sdpa", token_drop=drop).train()
    b.load_state_dict(a.state_dict())
    for blk in b.visual.blocks:
        blk.attn.attend = _SdpaInFlashLayout()
    assert b.visual.layout == "BNHD"  # read from the blocks
    x = torch.randn(3, 3, 32, 32)
    outs = []
    for m in (a, b):
        torch.manual_seed(3)
        outs.append((m.visual(x), m.visual.forward_features(x)))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_rope_complex_and_real_forms_agree(monkeypatch):
    """The fp32 complex form and the real form (bf16 / fp16 / tracers) give the same rotation and gradients."""
    from evaclip.models import rope as rope_mod

    cos, sin = rope_tables(32, 4, 8)
    qkv = torch.randn(2, 16, 3, 2, 32, requires_grad=True)  # a strided q view, as in the tower
    q = qkv.unbind(2)[0].transpose(1, 2)
    assert rope_mod._complex_ok(q) and not rope_mod._complex_ok(q.bfloat16())
    assert not rope_mod._complex_ok(torch.randn(4, 7)[:, ::2])  # pairs not viewable in place
    g = torch.randn(2, 2, 16, 32)
    results = []
    for complex_ok in (True, False):
        monkeypatch.setattr(rope_mod, "_complex_ok", lambda x, ok=complex_ok: ok)
        q = qkv.unbind(2)[0].transpose(1, 2)
        out = rope_mod.apply_rope(q, cos, sin)
        (grad,) = torch.autograd.grad(out, qkv, g)
        results.append((out, grad))
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-6)


def test_gated_silu_matches_autograd():
    """The one-tensor backward of silu(h1) * h2 equals autograd's (chunk, silu, mul) in value and gradient."""
    from evaclip.models.vision import gated_silu

    h = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(gated_silu, (h,))
    g = torch.randn(3, 5, 8, dtype=torch.float64)
    ref_h = h.detach().clone().requires_grad_()
    gate, up = ref_h.chunk(2, dim=-1)
    (torch.nn.functional.silu(gate) * up).backward(g)
    gated_silu(h).backward(g)
    torch.testing.assert_close(h.grad, ref_h.grad)


# ----------------------------------------------------------------------------------------- issue 15 on a CPU: bf16 RoPE
def test_bf16_rope_rotation_matches_timm():
    from timm.layers import RotaryEmbeddingCat, apply_rot_embed_cat

    D, grid = 32, 14
    rope = RotaryEmbeddingCat(D, in_pixels=False, feat_shape=[grid, grid], ref_feat_shape=[16, 16])
    cos, sin = rope_tables(D, grid, 16)
    x = torch.randn(2, 3, grid * grid, D).bfloat16()
    ours, ref = apply_rope(x, cos, sin), apply_rot_embed_cat(x, rope.get_embed())
    assert ours.dtype == ref.dtype == torch.bfloat16
    # before: the tables rounded to bf16 first, ~20 % of the outputs one bf16 step off timm's
    assert (ours != ref).float().mean() < 1e-3
    torch.testing.assert_close(ours.float(), ref.float(), rtol=0, atol=8e-3)
