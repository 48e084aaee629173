"""Checkpoint conversion: format detection, strict key accounting, layouts in and out, shape adaptation, safe reads."""
import dataclasses
import os

import pytest
import torch

from evaclip.models import build_tower, create_model
from evaclip.models.convert import (
    CheckpointError,
    detect_format,
    interpolate_pos_embed,
    load_pretrained,
    load_state_dict_file,
    resize_patch_embed,
    to_eva_clip_state_dict,
    to_open_clip_state_dict,
)


def _randomized(name="EVA02-CLIP-tiny", std=0.2, **kw):
    model = create_model(name, attn_backend="sdpa", **kw).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model


def _inputs(model):
    s = model.cfg.vision.image_size
    tokens = torch.randint(1, 49000, (2, model.cfg.text.context_length))
    tokens[:, 7] = 49407  # EOT
    return torch.randn(2, 3, s, s), tokens


def _assert_same(a, b):
    x, tok = _inputs(a)
    oa, ob = a(x, tok), b(x, tok)
    torch.testing.assert_close(oa.image_features, ob.image_features, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(oa.text_features, ob.text_features, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(oa.logit_scale, ob.logit_scale)


def test_eva_clip_release_round_trip(tmp_path):
    """EVA-CLIP release layout (split q/k/v, RoPE tables saved, DDP prefix, state_dict wrapper) loads back exactly."""
    src = _randomized()
    sd = to_eva_clip_state_dict(src)
    assert "visual.blocks.0.attn.q_proj.weight" in sd and "visual.blocks.0.attn.qkv.weight" not in sd
    assert "visual.blocks.1.mlp.ffn_ln.weight" in sd and "visual.blocks.1.attn.inner_attn_ln.bias" in sd
    sd["visual.rope.freqs_cos"] = torch.zeros(16, 32)  # released files carry the RoPE tables: ignorable
    sd["visual.blocks.0.attn.rope.freqs_sin"] = torch.zeros(16, 32)
    assert detect_format(sd) == "eva_clip"
    path = tmp_path / "eva_clip.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, path)
    dst = create_model("EVA02-CLIP-tiny", pretrained=str(path), attn_backend="sdpa").eval()
    _assert_same(src, dst)


def test_eva01_release_keeps_fused_qkv():
    """EVA-01 towers have no sub-LN: the release keeps the fused qkv, as evaclip does."""
    src = _randomized("EVA01-CLIP-tiny")
    sd = to_eva_clip_state_dict(src)
    assert "visual.blocks.0.attn.qkv.weight" in sd and "visual.blocks.0.gamma_1" in sd
    dst = create_model("EVA01-CLIP-tiny", attn_backend="sdpa").eval()
    load_pretrained(dst, pretrained=sd)
    _assert_same(src, dst)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_evaclip_own_files(tmp_path, suffix):
    from safetensors.torch import save_file

    src = _randomized()
    path = tmp_path / f"model{suffix}"
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    save_file(sd, str(path)) if suffix == ".safetensors" else torch.save(sd, path)
    assert detect_format(load_state_dict_file(path)) == "evaclip"
    dst = create_model("EVA02-CLIP-tiny", pretrained=str(path), attn_backend="sdpa").eval()
    _assert_same(src, dst)
    folder = tmp_path / "step_00000010"  # an evaclip checkpoint folder is accepted as well
    folder.mkdir()
    torch.save(sd, folder / "model.pt")
    _assert_same(src, create_model("EVA02-CLIP-tiny", pretrained=str(folder), attn_backend="sdpa").eval())


def test_open_clip_layout_round_trip():
    src = _randomized()
    sd = to_open_clip_state_dict(src)
    assert detect_format(sd) == "open_clip"
    assert "visual.trunk.blocks.0.mlp.fc1_g.weight" in sd and "visual.trunk.blocks.0.attn.norm.weight" in sd
    dst = create_model("EVA02-CLIP-tiny", attn_backend="sdpa").eval()
    report = load_pretrained(dst, pretrained=sd)
    assert report.formats["pretrained"] == "open_clip"
    _assert_same(src, dst)


def _open_clip_tiny(cfg):
    """open_clip's own EVA02 CLIP (timm Eva tower + custom text tower) at the tiny shapes, from a config dict."""
    import open_clip
    from open_clip.factory import _MODEL_CONFIGS
    from timm.models import register_model
    from timm.models.eva import Eva

    v, t = cfg.vision, cfg.text
    timm_name = "evaclip_convert_test_eva02"

    def build(pretrained=False, **kwargs):
        kwargs = {k: a for k, a in kwargs.items() if k in ("num_classes", "global_pool")}  # drop hub/cache args
        return Eva(img_size=v.image_size, patch_size=v.patch_size, embed_dim=v.width, depth=v.depth,
                   num_heads=v.heads, qkv_fused=False, mlp_ratio=v.mlp_ratio, swiglu_mlp=True, scale_mlp=True,
                   scale_attn_inner=True, use_rot_pos_emb=True, ref_feat_shape=(v.pt_hw_seq_len,) * 2, **kwargs)

    build.__name__ = timm_name
    register_model(build)
    _MODEL_CONFIGS["evaclip-convert-test"] = dict(
        embed_dim=cfg.embed_dim, custom_text=True,
        vision_cfg=dict(image_size=v.image_size, timm_model_name=timm_name, timm_model_pretrained=False,
                        timm_pool="token", timm_proj=None),
        text_cfg=dict(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width, heads=t.heads,
                      layers=t.layers))
    return open_clip.create_model("evaclip-convert-test", pretrained=None).eval()


@pytest.mark.slow
def test_open_clip_checkpoint_loads_with_same_features(tmp_path):
    """An open_clip EVA02 checkpoint file (open_clip's own weights) -> evaclip: same image and text features."""
    cfg = create_model("EVA02-CLIP-tiny").cfg
    ref = _open_clip_tiny(cfg)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.2)
    path = tmp_path / "open_clip.pt"
    torch.save(ref.state_dict(), path)
    ours = create_model("EVA02-CLIP-tiny", pretrained=str(path), attn_backend="eager").eval()
    x, tok = _inputs(ours)
    torch.testing.assert_close(ours.encode_image(x), ref.encode_image(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.encode_text(tok), ref.encode_text(tok), rtol=1e-4, atol=1e-4)


def test_eva_mim_image_init_adapts_shapes():
    """An EVA MIM checkpoint (no prefix, patch 14 kernel, another grid, mask_token / lm_head / rope tables) initialises
    the image tower: kernel resized, position embedding interpolated, CLIP head and attention sub-LN fresh."""
    src = _randomized(**{"vision.image_size": 42, "vision.patch_size": 7})  # grid 6, kernel 7 (the "14")
    mim = {k[len("visual."):]: v for k, v in to_eva_clip_state_dict(src).items()
           if k.startswith("visual.") and not k.startswith("visual.head.") and "inner_attn_ln" not in k}
    mim.update({"mask_token": torch.zeros(1, 1, 64), "lm_head.weight": torch.zeros(10, 64),
                "lm_head.bias": torch.zeros(10), "rope.freqs_cos": torch.zeros(36, 32)})
    assert detect_format(mim) == "eva_mim"
    dst = create_model("EVA02-CLIP-tiny", attn_backend="sdpa")  # grid 4, kernel 8 (the "16")
    report = load_pretrained(dst, image_init=mim)
    assert report.formats["image_init"] == "eva_mim"
    assert set(report.adapted) == {"visual.pos_embed", "visual.patch_embed.proj.weight"}
    assert "visual.head.weight" in report.fresh and "visual.blocks.0.attn.inner_attn_ln.weight" in report.fresh
    assert {"mask_token", "lm_head.weight", "rope.freqs_cos"} <= set(report.ignored)
    assert float(dst.visual.head.weight.detach().abs().max()) < 1e-3  # EVA-CLIP's head init (test_mim_models)
    torch.testing.assert_close(dst.visual.blocks[1].mlp.w3.weight, src.visual.blocks[1].mlp.w3.weight)
    torch.testing.assert_close(dst.visual.pos_embed[:, 0], src.visual.pos_embed[:, 0])  # CLS row kept as is
    torch.testing.assert_close(dst.visual.patch_embed.proj.weight,
                               resize_patch_embed(src.visual.patch_embed.proj.weight.detach(), 8))


def test_timm_image_init_and_openai_text_init():
    """Tower-wise inits: a bare timm Eva state dict for the image, an OpenAI-layout (top-level) text tower."""
    src = _randomized()
    timm_sd = {k[len("visual.trunk."):]: v for k, v in to_open_clip_state_dict(src).items()
               if k.startswith("visual.trunk.")}
    openai = {k[len("text."):]: v for k, v in src.state_dict().items() if k.startswith("text.")}
    openai.update({"visual.conv1.weight": torch.zeros(8, 3, 4, 4), "input_resolution": torch.tensor(224)})
    assert detect_format(timm_sd) == "timm" and detect_format(openai) == "openai_text"
    dst = create_model("EVA02-CLIP-tiny", attn_backend="sdpa").eval()
    report = load_pretrained(dst, image_init=timm_sd, text_init=openai)
    assert report.formats == {"image_init": "timm", "text_init": "openai_text", "visual": "timm",
                              "text": "openai_text"}
    with torch.no_grad():
        dst.logit_scale.copy_(src.logit_scale)
    _assert_same(src, dst)


def test_strict_load_names_missing_and_unexpected_keys():
    sd = to_eva_clip_state_dict(_randomized())
    bad = dict(sd)
    del bad["visual.norm.weight"]
    bad["visual.blocks.0.attn.surprise"] = torch.zeros(3)
    model = create_model("EVA02-CLIP-tiny", attn_backend="sdpa")
    with pytest.raises(CheckpointError, match=r"visual\.norm\.weight") as e:
        load_pretrained(model, pretrained=bad)
    assert "visual.blocks.0.attn.surprise" in str(e.value)
    no_scale = {k: v for k, v in sd.items() if k != "logit_scale"}
    with pytest.raises(CheckpointError, match="logit_scale"):
        load_pretrained(model, pretrained=no_scale)
    wrong = dict(sd, **{"text.ln_final.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"text\.ln_final\.weight"):
        load_pretrained(model, pretrained=wrong)
    with pytest.raises(CheckpointError, match="one tower only"):
        load_pretrained(model, pretrained={k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")})


class _RunsCode:
    def __reduce__(self):  # unpickling this would call os.getcwd: weights_only must refuse before that
        return (os.getcwd, ())


def test_pickle_that_runs_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _RunsCode()}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_state_dict_file(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_state_dict_file(tmp_path / "missing.pt")
    torch.save({"meta": {"epoch": 1}}, tmp_path / "empty.pt")
    with pytest.raises(CheckpointError, match="no state dict"):
        load_state_dict_file(tmp_path / "empty.pt")


def test_pos_embed_interpolation_matches_timm():
    from timm.layers import resample_abs_pos_embed

    pos = torch.randn(1, 1 + 16, 8)
    up = interpolate_pos_embed(pos, 6)
    ref = resample_abs_pos_embed(pos, (6, 6), (4, 4), num_prefix_tokens=1, interpolation="bicubic", antialias=False)
    torch.testing.assert_close(up, ref)
    assert interpolate_pos_embed(pos, 4) is pos
    with pytest.raises(CheckpointError, match="square"):
        interpolate_pos_embed(torch.randn(1, 1 + 15, 8), 4)


def test_patch_embed_resize():
    w = torch.randn(4, 3, 14, 14)
    assert resize_patch_embed(w, 16).shape == (4, 3, 16, 16)
    torch.testing.assert_close(resize_patch_embed(torch.ones(2, 3, 14, 14), 16), torch.ones(2, 3, 16, 16))
    # FlexiViT's pseudo-inverse resize keeps the response to a patch resized the same way (timm's reference)
    from timm.layers import resample_patch_embed

    torch.testing.assert_close(resize_patch_embed(w, 16, "pinv"), resample_patch_embed(w, [16, 16], verbose=False))
    with pytest.raises(ValueError, match="interpolate"):
        resize_patch_embed(w, 16, "nearest")


def test_build_tower_from_config_dict():
    src = _randomized()
    tower = build_tower(dataclasses.asdict(src.cfg), "visual").eval()
    tower.load_state_dict({k[len("visual."):]: v for k, v in src.state_dict().items() if k.startswith("visual.")})
    x, _ = _inputs(src)
    torch.testing.assert_close(tower(x), src.encode_image(x))
    with pytest.raises(ValueError, match="tower"):
        build_tower("EVA02-CLIP-tiny", "audio")
