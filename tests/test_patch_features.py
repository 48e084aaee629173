"""Patch features for multimodal models: per-patch tokens of any block from ``create_model`` (``encode_patches``),
``load_encoder`` (``patch_features``) and the ONNX export (``--outputs pooled patches``). Reference: timm's ``Eva``
with the same weights, ``forward_intermediates(output_fmt='NLC')``; exports against the model they came from."""
from __future__ import annotations

import json

import pytest
import torch

from evaclip.models import create_model
from evaclip.models.convert import visual_to_timm

NAME = "EVA02-CLIP-demo"  # the demo's architecture: 4 blocks, width 128, 8 x 8 patches


def _model(name=NAME):
    model = create_model(name, attn_backend="sdpa").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _images(size=32, n=2):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(3))


def _timm_tower(model):
    from timm.models.eva import Eva

    v = model.cfg.vision
    eva = Eva(img_size=v.image_size, patch_size=v.patch_size, embed_dim=v.width, depth=v.depth, num_heads=v.heads,
              qkv_fused=False, mlp_ratio=v.mlp_ratio, swiglu_mlp=True, scale_mlp=True, scale_attn_inner=True,
              use_rot_pos_emb=True, ref_feat_shape=(v.pt_hw_seq_len,) * 2, num_classes=model.cfg.embed_dim,
              global_pool="token").eval()
    visual = {k[len("visual."):]: t for k, t in model.state_dict().items() if k.startswith("visual.")}
    eva.load_state_dict(visual_to_timm(visual), strict=True)
    return eva


def test_patch_tokens_match_timms_forward_intermediates_per_layer():
    model = _model()
    eva, x = _timm_tower(model), _images()
    depth = model.cfg.vision.depth
    with torch.no_grad():
        for norm in (False, True):
            want = eva.forward_intermediates(x, indices=list(range(depth)), norm=norm, output_fmt="NLC",
                                             intermediates_only=True)
            for i in range(depth):
                got = model.encode_patches(x, i, norm=norm)
                assert got.shape == (2, 64, 128)
                torch.testing.assert_close(got, want[i], rtol=1e-5, atol=1e-5, msg=f"layer {i} norm {norm}")
                torch.testing.assert_close(model.encode_patches(x, i - depth, norm=norm), got)  # negative: from the end
            with_cls = eva.forward_intermediates(x, indices=[depth - 2], norm=norm, output_fmt="NLC",
                                                 intermediates_only=True, return_prefix_tokens=True)[0]
            patches_ref, cls_ref = with_cls  # timm: (patch tokens, prefix tokens)
            got = model.encode_patches(x, -2, norm=norm, prefix=True)
            torch.testing.assert_close(got[:, 1:], patches_ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got[:, :1], cls_ref, rtol=1e-5, atol=1e-5)
        # the whole forward: final tokens are the pooled embedding's input
        final, inter = model.visual.forward_intermediates(x, 2)
        assert len(inter) == 2
        torch.testing.assert_close(model.visual.head(final[:, 0]), model.encode_image(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="layer"):
        model.encode_patches(x, depth)


@pytest.mark.slow
def test_exported_demo_encoder_patch_features_equal_the_models(tmp_path):
    """evaclip export of a demo-architecture checkpoint: load_encoder's patch features equal the model's per block
    (1e-5), and the ONNX graph with --outputs pooled patches gives both outputs (LLaVA's -2 without norm, the last
    block with the final norm)."""
    import onnxruntime as ort

    from evaclip.encoder import load_encoder
    from evaclip.export import main as export_main

    model = _model()
    torch.save(model.state_dict(), tmp_path / "clip.pt")
    x = _images(n=3)
    for layer, norm in ((-2, False), (-1, True)):
        out = tmp_path / f"export{layer}"
        argv = [str(tmp_path / "clip.pt"), "--out", str(out), "--model", NAME, "--format", "safetensors", "onnx",
                "--outputs", "pooled", "patches", "--patch-layer", str(layer)] + (["--patch-norm"] if norm else [])
        assert export_main(argv) == 0
        enc = load_encoder(out, "image")
        with torch.no_grad():
            for i in range(model.cfg.vision.depth):
                for n in (False, True):
                    torch.testing.assert_close(enc.patch_features(x, i, norm=n), model.encode_patches(x, i, norm=n),
                                               rtol=1e-5, atol=1e-5)
            ref_pooled, ref_patches = model.encode_image(x), model.encode_patches(x, layer, norm=norm)
        cfg = json.loads((out / "image" / "config.json").read_text())
        assert cfg["onnx_outputs"] == ["features", "patches"]
        assert cfg["onnx_patches"] == {"layer": layer, "norm": norm, "prefix": False}
        sess = ort.InferenceSession(str(out / "image" / "model.onnx"), providers=["CPUExecutionProvider"])
        assert [o.name for o in sess.get_outputs()] == ["features", "patches"]
        pooled, patches = sess.run(None, {"images": x.numpy()})
        torch.testing.assert_close(torch.from_numpy(pooled), ref_pooled, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.from_numpy(patches), ref_patches, rtol=1e-5, atol=1e-5)
