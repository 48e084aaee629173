"""Model parity with the reference implementations (timm, open_clip), backends, hooks, token dropping and RoPE."""
import math

import pytest
import torch

from evaclip.models import AttentionBackendError, create_model, get_model_config, list_models
from evaclip.models.attention import resolve_backend
from evaclip.models.convert import image_tower_state, to_open_clip_state_dict
from evaclip.models.rope import apply_rope, rope_tables
from evaclip.models.token_drop import drop_tokens


def _randomize(module, std=0.5):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)


def _timm_eva(cfg):
    from timm.models.eva import Eva

    v = cfg.vision
    kw = dict(img_size=v.image_size, patch_size=v.patch_size, num_classes=cfg.embed_dim, embed_dim=v.width,
              depth=v.depth, num_heads=v.heads, qkv_bias=v.qkv_bias, mlp_ratio=v.mlp_ratio, global_pool="token",
              use_post_norm=v.postnorm, init_values=v.layer_scale)
    if v.swiglu:
        kw.update(qkv_fused=False, swiglu_mlp=True, scale_mlp=True, scale_attn_inner=True, use_rot_pos_emb=True,
                  ref_feat_shape=(v.pt_hw_seq_len, v.pt_hw_seq_len))
    return Eva(**kw).eval()


@pytest.mark.parametrize("name", ["EVA02-CLIP-tiny", "EVA01-CLIP-tiny"])
def test_image_tower_matches_timm(name):
    ours = create_model(name, attn_backend="eager").eval()
    ref = _timm_eva(ours.cfg)
    _randomize(ref)
    ours.visual.load_state_dict(image_tower_state(ref.state_dict(), ours.cfg.vision.swiglu))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ours.visual(x), ref(x), rtol=1e-4, atol=1e-4)


def test_image_tower_336_rope_rescaled_matches_timm():
    """A grid larger than the pretraining grid (336 px on a 224 px MIM grid): RoPE positions rescale like timm."""
    ours = create_model("EVA02-CLIP-tiny", attn_backend="eager", **{"vision.image_size": 48}).eval()
    ref = _timm_eva(ours.cfg)
    _randomize(ref)
    ours.visual.load_state_dict(image_tower_state(ref.state_dict(), True))
    x = torch.randn(2, 3, 48, 48)
    torch.testing.assert_close(ours.visual(x), ref(x), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_clip_matches_open_clip():
    """A whole open_clip EVA02 CLIP (timm tower + custom text tower) gives the same image and text features."""
    import open_clip
    from open_clip.factory import _MODEL_CONFIGS
    from timm.models import register_model

    ours = create_model("EVA02-CLIP-tiny", attn_backend="sdpa").eval()
    _randomize(ours, 0.2)
    v, t = ours.cfg.vision, ours.cfg.text
    timm_name = "evaclip_test_eva02_tiny"

    def evaclip_test_eva02_tiny(pretrained=False, num_classes=0, global_pool="token", **_timm_create_kwargs):
        # open_clip builds its tower through timm by name
        from timm.models.eva import Eva

        return Eva(img_size=v.image_size, patch_size=v.patch_size, embed_dim=v.width, depth=v.depth,
                   num_heads=v.heads, qkv_fused=False, mlp_ratio=v.mlp_ratio, swiglu_mlp=True, scale_mlp=True,
                   scale_attn_inner=True, use_rot_pos_emb=True, ref_feat_shape=(v.pt_hw_seq_len,) * 2,
                   num_classes=num_classes, global_pool=global_pool)

    evaclip_test_eva02_tiny.__name__ = timm_name
    register_model(evaclip_test_eva02_tiny)
    _MODEL_CONFIGS["evaclip-test-EVA02-tiny"] = dict(
        embed_dim=ours.cfg.embed_dim, custom_text=True,
        vision_cfg=dict(image_size=v.image_size, timm_model_name=timm_name, timm_model_pretrained=False,
                        timm_pool="token", timm_proj=None),
        text_cfg=dict(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width, heads=t.heads,
                      layers=t.layers))
    ref = open_clip.create_model("evaclip-test-EVA02-tiny", pretrained=None).eval()
    ref.load_state_dict(to_open_clip_state_dict(ours))
    x = torch.randn(2, 3, 32, 32)
    tokens = open_clip.get_tokenizer("ViT-B-32")(["a photo of a cat", "two dogs"])
    torch.testing.assert_close(ours.encode_image(x), ref.encode_image(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.encode_text(tokens), ref.encode_text(tokens), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["EVA02-CLIP-tiny", "EVA01-CLIP-tiny"])
def test_sdpa_equals_eager(name):
    a = create_model(name, attn_backend="sdpa").eval()
    b = create_model(name, attn_backend="eager").eval()
    _randomize(a, 0.3)
    b.load_state_dict(a.state_dict())
    x, tok = torch.randn(2, 3, 32, 32), torch.randint(1, 49407, (2, 77))
    tok[:, 9] = 49407
    oa, ob = a(x, tok), b(x, tok)
    torch.testing.assert_close(oa.image_features, ob.image_features, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(oa.text_features, ob.text_features, rtol=1e-5, atol=1e-5)


def test_forward_output_and_normalize(tiny_model):
    x, tok = torch.randn(3, 3, 32, 32), torch.randint(1, 49407, (3, 77))
    out = tiny_model(x, tok)
    assert out.image_features.shape == out.text_features.shape == (3, 32)
    torch.testing.assert_close(out.image_features.norm(dim=-1), torch.ones(3))
    assert math.isclose(out.logit_scale.item(), 1 / 0.07, rel_tol=1e-5) and out.logit_bias is None
    raw = tiny_model.encode_image(x)
    torch.testing.assert_close(tiny_model.encode_image(x, normalize=True), raw / raw.norm(dim=-1, keepdim=True))


def test_backend_resolution_errors():
    assert resolve_backend("auto", torch.device("cpu")) == "sdpa"
    with pytest.raises(AttentionBackendError, match="flash"):
        create_model("EVA02-CLIP-tiny", attn_backend="flash_attn")
    with pytest.raises(AttentionBackendError, match="unknown attention backend"):
        create_model("EVA02-CLIP-tiny", attn_backend="xformers")


def test_token_drop_zero_equals_no_drop():
    a = create_model("EVA02-CLIP-tiny", token_drop=0.0).train()
    b = create_model("EVA02-CLIP-tiny").eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(a.encode_image(x), b.encode_image(x))


def test_token_drop_keeps_half_per_sample_and_cls():
    torch.manual_seed(0)
    x = torch.arange(2 * 17 * 4, dtype=torch.float).view(2, 17, 4)
    kept, idx = drop_tokens(x, keep_ratio=0.5, num_prefix=1)
    assert kept.shape == (2, 9, 4) and idx.shape == (2, 8)
    torch.testing.assert_close(kept[:, 0], x[:, 0])  # CLS kept
    for b in range(2):
        assert len(set(idx[b].tolist())) == 8 and (idx[b].diff() > 0).all()
        torch.testing.assert_close(kept[b, 1:], x[b, 1:][idx[b]])
    # per-sample choice: 8 samples drawing 8 of 16 each all alike would have chance (1 / 12870) ** 7
    _, idx8 = drop_tokens(torch.zeros(8, 17, 4), keep_ratio=0.5, num_prefix=1)
    assert len({tuple(r.tolist()) for r in idx8}) > 1


def test_token_drop_is_per_sample():
    x = torch.randn(64, 65, 8)
    _, idx = drop_tokens(x, keep_ratio=0.5, num_prefix=1)
    assert len({tuple(r.tolist()) for r in idx}) > 60


def test_token_drop_only_in_training():
    m = create_model("EVA02-CLIP-tiny", token_drop=0.5)
    m.eval()
    m2 = create_model("EVA02-CLIP-tiny")
    m2.load_state_dict(m.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(m.encode_image(x), m2.eval().encode_image(x))


def test_gathered_rope_equals_full_rope_indexed():
    cos, sin = rope_tables(32, 4, 16)
    q = torch.randn(3, 2, 16, 32)  # B H P D
    full = apply_rope(q, cos, sin)
    idx = torch.stack([torch.randperm(16)[:8].sort().values for _ in range(3)])
    q_kept = q.gather(2, idx[:, None, :, None].expand(3, 2, 8, 32))
    gathered = apply_rope(q_kept, cos[idx].unsqueeze(1), sin[idx].unsqueeze(1))
    torch.testing.assert_close(gathered, full.gather(2, idx[:, None, :, None].expand(3, 2, 8, 32)))


def test_token_drop_matches_manual_subnetwork():
    """With dropping, the tower equals running it on the kept tokens with the RoPE of their original positions."""
    m = create_model("EVA02-CLIP-tiny", attn_backend="eager", token_drop=0.5).train()
    _randomize(m.visual, 0.3)
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(123)
    out = m.visual(x)
    torch.manual_seed(123)
    v = m.visual
    tokens = torch.cat([v.cls_token.expand(2, -1, -1), v.patch_embed(x)], 1) + v.pos_embed
    kept, idx = drop_tokens(tokens, 0.5, 1)
    full_idx = torch.cat([torch.zeros(2, 1, dtype=torch.long), idx + 1], 1)
    rope = (v.rope_cos[full_idx].unsqueeze(1), v.rope_sin[full_idx].unsqueeze(1))
    for blk in v.blocks:
        kept = blk(kept, rope)
    torch.testing.assert_close(out, v.head(v.norm(kept)[:, 0]))


def test_grad_checkpointing_same_grads():
    a = create_model("EVA02-CLIP-tiny").train()
    b = create_model("EVA02-CLIP-tiny", grad_checkpointing=True).train()
    b.load_state_dict(a.state_dict())
    x, tok = torch.randn(2, 3, 32, 32), torch.randint(1, 49407, (2, 77))
    for m in (a, b):
        o = m(x, tok)
        (o.image_features @ o.text_features.T).sum().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=n)


def test_optimizer_hooks(tiny_model):
    m = tiny_model
    assert m.param_tower("visual.blocks.0.attn.qkv.weight") == "visual"
    assert m.param_tower("text.token_embedding.weight") == "text" and m.param_tower("logit_scale") == "other"
    assert m.num_layers("visual") == 2 and m.num_layers("text") == 2
    assert m.layer_id("visual.patch_embed.proj.weight") == 0 and m.layer_id("visual.cls_token") == 0
    assert m.layer_id("visual.pos_embed") == 0 and m.layer_id("text.positional_embedding") == 0
    assert m.layer_id("visual.blocks.1.mlp.w3.weight") == 2
    assert m.layer_id("text.transformer.resblocks.0.ln_1.bias") == 1
    assert m.layer_id("visual.head.weight") == 3 and m.layer_id("text.text_projection") == 3
    nwd = m.no_weight_decay()
    assert {"visual.pos_embed", "visual.cls_token", "logit_scale", "text.positional_embedding"} <= nwd
    assert "visual.blocks.0.attn.q_bias" in nwd and "visual.blocks.0.attn.qkv.weight" not in nwd
    assert "text.token_embedding.weight" not in nwd


def test_registry_released_shapes():
    assert {"EVA02-CLIP-B-16", "EVA02-CLIP-L-14", "EVA02-CLIP-L-14-336", "EVA02-CLIP-bigE-14",
            "EVA02-CLIP-bigE-14-plus", "EVA01-CLIP-g-14", "EVA01-CLIP-g-14-plus"} <= set(list_models())
    b16 = get_model_config("EVA02-CLIP-B-16")
    assert (b16.vision.width, b16.vision.depth, b16.vision.heads, b16.vision.mlp_hidden) == (768, 12, 12, 2048)
    l14 = get_model_config("EVA02-CLIP-L-14-336")
    assert (l14.vision.image_size, l14.vision.grid, l14.vision.mlp_hidden, l14.embed_dim) == (336, 24, 2730, 768)
    g = get_model_config("EVA01-CLIP-g-14")
    assert (g.vision.width, g.vision.depth, g.vision.mlp_hidden, g.vision.rope) == (1408, 40, 6144, False)
    e = get_model_config("EVA02-CLIP-bigE-14-plus")
    assert (e.vision.width, e.vision.depth, e.vision.mlp_hidden, e.vision.postnorm) == (1792, 64, 15360, True)
    assert (e.text.width, e.text.layers) == (1280, 32)
    with pytest.raises(ValueError, match="unknown model"):
        get_model_config("EVA02-CLIP-X")
    with pytest.raises(ValueError, match="unknown model override"):
        get_model_config("EVA02-CLIP-tiny", **{"vision.widht": 3})


def test_bigE_param_count_meta():
    """The registered bigE-plus shape has the published ~4.4B image + ~0.7B text parameters (built on meta)."""
    with torch.device("meta"):
        m = create_model("EVA02-CLIP-bigE-14-plus", attn_backend="sdpa")
    vis = sum(p.numel() for p in m.visual.parameters())
    txt = sum(p.numel() for p in m.text.parameters())
    assert 4.3e9 < vis < 4.5e9 and 0.6e9 < txt < 0.75e9


def test_tokenizer_and_transforms_follow_the_model():
    """open_clip's BPE at the model's context length (long captions truncated, EOT kept) and its image transforms."""
    from PIL import Image

    import evaclip

    tok = evaclip.get_tokenizer("EVA02-CLIP-demo")
    ids = tok(["a photo of the digit seven " * 10, "zero"])
    assert ids.shape == (2, 16) and (ids.argmax(dim=-1) == torch.tensor([15, 2])).all()  # EOT = highest id
    for train in (True, False):
        img = evaclip.get_transforms("EVA02-CLIP-tiny", train=train)(Image.new("RGB", (50, 40), (255, 0, 0)))
        assert img.shape == (3, 32, 32)


# --------------------------------------------------------------------------------- bf16 autocast (issue 15)
def test_eva02_tower_matches_timm_eva_in_bf16_autocast():
    ours = create_model("EVA02-CLIP-tiny", attn_backend="sdpa", **{"vision.image_size": 64}).eval()
    ref = _timm_eva(ours.cfg)
    _randomize(ref, 0.2)
    ours.visual.load_state_dict(image_tower_state(ref.state_dict(), True))
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = ours.visual(x).float(), ref(x).float()
    torch.testing.assert_close(a, b, rtol=0, atol=2e-3)  # before: 7.8e-3 apart
