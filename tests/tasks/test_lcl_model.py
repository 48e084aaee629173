"""The LCL model (``evaclip.models.lcl``): token rows with image latents, the pairs and generation targets it reads
off them, one set of pooler weights for the pooled and per-patch latents, ``encode_text`` at ``<boi>``, token
dropping, every image tower evaclip builds, the optimizer hooks, LM init from a CLIP text tower, an LCL checkpoint as
a CLIP's ``model.image_init``, and contrastive weight 0 under DDP and FSDP2 (2 gloo processes).

Shapes: B rows, L context, N images, K latents per image, W LM width, E embedding.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gloo_ranks import run_gloo

from evaclip.losses import LCLLoss
from evaclip.models.lcl import create_lcl, image_latents_per_image
from evaclip.models.lcl_tokens import LCLTokens

TOK = LCLTokens()
L = 48
MODEL = "EVA02-CLIP-tiny"  # 32 px, 8 px patches: 16 latents per image


def row(parts, K, length=L):
    """A token row: ``parts`` is a list of ints (text ids) and "img" (one image block)."""
    out = [TOK.sot]
    for p in parts:
        out += [TOK.boi] + [TOK.image] * K + [TOK.eoi] if p == "img" else [p]
    out.append(TOK.eot)
    return torch.tensor(out + [TOK.pad] * (length - len(out)))


def batch(K, seed=0):
    """Two rows: caption-then-image-then-text with two images (a "!" = id 0 among the text), image-then-caption."""
    g = torch.Generator().manual_seed(seed)
    tokens_BL = torch.stack([row([320, 0, "img", 321, "img", 322], K), row(["img", 400, 401], K)])
    return torch.randn(3, 3, 32, 32, generator=g), tokens_BL


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_lcl(MODEL, L, attn_backend="sdpa").eval()


def test_pairs_and_generation_targets(model):
    K = image_latents_per_image(model.cfg, 0.0)
    assert K == 16
    images, tokens = batch(K)
    out = model(images, tokens)
    assert out.image_features.shape == out.text_features.shape == (3, model.cfg.embed_dim)
    torch.testing.assert_close(out.image_features, model.encode_image(images, normalize=True))
    # targets: every next token but image placeholders, eoi and pad; the BPE "!" (id 0) and eot are targets
    want = [320, 0, TOK.boi, 321, TOK.boi, 322, TOK.eot, TOK.boi, 400, 401, TOK.eot]
    assert out.labels.tolist() == want
    assert out.logits.shape == (len(want), TOK.vocab_size)
    assert out.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-5)


def test_image_placeholders_carry_the_latents_in_boi_order(model):
    K = 16
    images, tokens = batch(K)
    _, latents_NKW = model.image_latents(images)
    seen = {}
    hook = model.text.transformer.register_forward_pre_hook(lambda mod, args: seen.update(x=args[0]))
    try:
        model(images, tokens)
    finally:
        hook.remove()
    x_BLW = seen["x"] - model.text.positional_embedding[:L]
    slots = tokens == TOK.image
    torch.testing.assert_close(x_BLW[slots], latents_NKW.flatten(0, 1))
    torch.testing.assert_close(x_BLW[~slots], model.text.token_embedding(tokens)[~slots])
    with pytest.raises(ValueError, match="image placeholders"):
        model(images, torch.stack([row(["img"], K - 1), row(["img", "img"], K)]))
    with pytest.raises(ValueError, match="<boi> tokens for 2 images"):
        model(images[:2], tokens)


def test_pooled_latent_averages_the_per_patch_latents():
    """One set of weights: with one head, the pooled latent is the attention-weighted mean of the per-patch latents
    (the output projection is affine and the weights sum to 1)."""
    torch.manual_seed(0)
    m = create_lcl(MODEL, L, attn_backend="sdpa", **{"text.heads": 1}).eval()
    images, _ = batch(16)
    x_NKD = m.patch_features(images)
    pooled_NW, latents_NKW = m.pooler(x_NKD)
    attn, W = m.pooler.pool.attn, m.cfg.text.width
    w_q, w_k = attn.in_proj_weight.chunk(3)[:2] if attn._qkv_same_embed_dim else (attn.q_proj_weight,
                                                                                     attn.k_proj_weight)
    q_W = F.linear(m.pooler.pool.ln_q(m.pooler.pool.query[0]), w_q, attn.in_proj_bias[:W])
    k_NKW = F.linear(m.pooler.pool.ln_k(x_NKD), w_k, attn.in_proj_bias[W:2 * W])
    a_NK = torch.softmax(k_NKW @ q_W / W ** 0.5, dim=-1)
    torch.testing.assert_close(pooled_NW, (a_NK.unsqueeze(-1) * latents_NKW).sum(1), rtol=1e-5, atol=1e-5)


def test_encode_text_is_the_feature_at_boi(model):
    """A prompt's ``encode_text`` (its eot read as boi) is the text side of the pair the same prompt makes in a
    row (caption, then the image)."""
    images, _ = batch(16)
    tokens = torch.stack([row([320, 321, "img"], 16), row([320, 321, "img"], 16)])
    out = model(images[:2], tokens)
    prompt = torch.tensor([[TOK.sot, 320, 321, TOK.eot, 0, 0, 0]])
    torch.testing.assert_close(model.encode_text(prompt, normalize=True)[0], out.text_features[0], rtol=1e-5,
                               atol=1e-5)
    with pytest.raises(ValueError, match="eot"):
        model.encode_text(torch.tensor([[TOK.sot, 320, 321]]))


def test_token_drop_gives_the_kept_patch_count_per_image():
    torch.manual_seed(0)
    m = create_lcl(MODEL, L, attn_backend="sdpa", token_drop=0.5).train()
    K = image_latents_per_image(m.cfg, 0.5)
    assert K == 8
    images, tokens = batch(K)
    out = m(images, tokens)
    assert out.image_features.shape[0] == 3


@pytest.mark.parametrize("name", ["EVA01-CLIP-tiny", "ViTamin-tiny", "EVA02-CLIP-tiny"])
def test_every_image_tower_trains_and_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    m = create_lcl(name, 64, attn_backend="sdpa").train()
    assert m.visual.head is None  # the CLS readout is gone
    K = image_latents_per_image(m.cfg, 0.0)
    images, tokens = batch(K)
    tokens = torch.stack([row([320, 0, "img", 321, "img", 322], K, 64), row(["img", 400, 401], K, 64)])
    out = m(images, tokens)
    LCLLoss()(*out[:4], out.logit_scale)["loss"].backward()
    assert [n for n, p in m.named_parameters() if p.grad is None] == []


def test_optimizer_hooks_place_pooler_and_lm_head(model):
    from evaclip.config import OptimCfg
    from evaclip.optim.groups import build_param_groups

    L_vis, L_txt = model.num_layers("visual"), model.num_layers("text")
    assert model.param_tower("pooler.pool.query") == "visual" and model.layer_id("pooler.pool.query") == L_vis + 1
    assert model.param_tower("lm_head.1.weight") == "text" and model.layer_id("lm_head.1.weight") == L_txt + 1
    assert model.layer_id("text.transformer.resblocks.1.attn.in_proj_weight") == 2
    assert model.layer_id("visual.patch_embed.proj.weight") == 0
    assert model.param_tower("logit_scale") == "other"
    groups = build_param_groups(model, OptimCfg(visual_ld=0.5))
    seen = {n for g in groups for n in g["param_names"]}
    assert seen == {n for n, _ in model.named_parameters()}
    no_wd = {n for g in groups if g["weight_decay"] == 0 for n in g["param_names"]}
    assert "lm_head.0.weight" in no_wd and "logit_scale" in no_wd and "lm_head.1.weight" not in no_wd


def test_lm_init_from_a_clip_text_tower(tmp_path):
    from safetensors.torch import save_file

    from evaclip.models import create_model

    torch.manual_seed(1)
    clip = create_model(MODEL, attn_backend="sdpa")
    path = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(path))
    m = create_lcl(MODEL, L, text_init=str(path), attn_backend="sdpa")
    emb = m.text.token_embedding.weight
    torch.testing.assert_close(emb[:TOK.base_vocab], clip.text.token_embedding.weight)
    assert emb.shape[0] == TOK.vocab_size
    torch.testing.assert_close(m.text.positional_embedding, clip.text.positional_embedding[:L])
    torch.testing.assert_close(m.text.transformer.resblocks[1].mlp.c_fc.weight,
                               clip.text.transformer.resblocks[1].mlp.c_fc.weight)


@pytest.mark.parametrize("name", ["EVA02-CLIP-tiny", "ViTamin-tiny"])
def test_lcl_checkpoint_is_a_clip_image_init(tmp_path, name):
    from evaclip.models import create_model
    from evaclip.models.convert import CheckpointError

    torch.manual_seed(2)
    lcl = create_lcl(name, L, attn_backend="sdpa")
    path = tmp_path / "lcl.pt"
    torch.save(lcl.state_dict(), path)
    clip = create_model(name, image_init=str(path), attn_backend="sdpa")
    own = clip.visual.state_dict()
    for k, v in lcl.visual.state_dict().items():
        torch.testing.assert_close(own[k], v, msg=k)
    assert {k for k in own if k not in lcl.visual.state_dict()} == {k for k in own if k.startswith("head.")}
    with pytest.raises(CheckpointError, match="LCL model"):
        create_model(name, pretrained=str(path), attn_backend="sdpa")


# ---------------------------------------------------------------------------------------------------------------
# contrastive weight 0 under DDP and FSDP2: the graph still reaches every parameter
# ---------------------------------------------------------------------------------------------------------------
def _weight0_worker(rank: int) -> dict:
    from evaclip.config import DistCfg
    from evaclip.parallel import wrap_model

    results = {}
    for strategy in ("ddp", "fsdp"):
        torch.manual_seed(0)
        model = create_lcl(MODEL, L, attn_backend="sdpa").train()
        wrapped = wrap_model(model, DistCfg(strategy=strategy), torch.device("cpu"))
        opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-3)
        loss_fn = LCLLoss(contrastive_weight=0.0)
        losses, missing = [], set()
        for step in range(2):  # DDP would fail on the second step if a parameter had no gradient in the first
            images, tokens = batch(16, seed=10 * step + rank)
            if rank == 1:  # uneven: one image row less
                images, tokens = images[2:], tokens[1:]
            out = loss_fn(*wrapped(images, tokens)[:4], model.logit_scale.exp())
            out["loss"].backward()
            missing |= {n for n, p in model.named_parameters() if p.grad is None}
            opt.step()
            opt.zero_grad()
            losses.append(float(out["global_loss"]))
        results[strategy] = dict(losses=losses, missing=sorted(missing))
    return results


def test_contrastive_weight_zero_runs_under_ddp_and_fsdp2(tmp_path):
    ranks = run_gloo(_weight0_worker, tmp_path)
    for r, res in enumerate(ranks):
        for strategy in ("ddp", "fsdp"):
            assert res[strategy]["missing"] == [], (strategy, r)
            assert all(torch.isfinite(torch.tensor(res[strategy]["losses"]))), (strategy, r)
    assert ranks[0]["ddp"]["losses"] == pytest.approx(ranks[1]["ddp"]["losses"])  # the global loss, on every rank
    assert ranks[0]["ddp"]["losses"] == pytest.approx(ranks[0]["fsdp"]["losses"], rel=1e-4)
