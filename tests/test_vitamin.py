"""ViTamin image towers (timm's vitamin.py, open_clip's ViTamin configs): registry shapes, strict open_clip round
trips, token dropping after the conv stages, optimizer hooks, exports, and Locked-Text Tuning inits.

References: open_clip builds the same models from its own configs (``open_clip.create_model('ViTamin-S')``) and
loads our exports; timm's trunk pieces (``patch_embed``, ``_pos_embed``, ``blocks``) compute the token-drop reference.
"""
from __future__ import annotations

import math

import pytest
import torch

from evaclip.models import create_model, get_model_config
from evaclip.models.convert import CheckpointError, load_pretrained


def _perturb(model, seed: int = 0) -> None:
    """Random weights everywhere (norm gains and biases too), so a key mapped to the wrong place shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)


def _inputs(cfg, B: int = 2, seed: int = 0):
    import open_clip

    g = torch.Generator().manual_seed(seed)
    s = cfg.vision.image_size
    tokens_BL = open_clip.get_tokenizer("ViTamin-S", context_length=cfg.text.context_length)(
        ["a photo of a cat", "handwritten digit 7"][:B])
    return torch.randn(B, 3, s, s, generator=g), tokens_BL


def _open_clip_round_trip(name: str, tmp_path) -> None:
    """open_clip's own model (random weights) -> a torch file -> evaclip strict load -> evaclip export -> open_clip
    ``local-dir:`` load with no extra step -> the same image and text features as the model open_clip built."""
    import open_clip

    from evaclip.export import export_open_clip, is_custom_open_clip, model_config_of

    torch.manual_seed(0)
    ref = open_clip.create_model(get_model_config(name).open_clip_name, pretrained=None).eval()
    _perturb(ref)
    path = tmp_path / "open_clip.pt"
    torch.save(ref.state_dict(), path)
    ours = create_model(name, pretrained=str(path)).eval()
    export_open_clip(ours, model_config_of(ours, name), name, tmp_path, check=False)
    d = (tmp_path / "open_clip").resolve()
    assert not is_custom_open_clip(d)  # a shape open_clip ships: no register step
    back, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{d}")
    back.eval()
    assert preprocess.transforms[0].size == 224
    images_BCHW, tokens_BL = _inputs(ours.cfg)
    with torch.no_grad():
        for m in (ours, back):
            torch.testing.assert_close(m.encode_image(images_BCHW), ref.encode_image(images_BCHW), rtol=0, atol=1e-5)
            torch.testing.assert_close(m.encode_text(tokens_BL), ref.encode_text(tokens_BL), rtol=0, atol=1e-5)
    assert torch.equal(back.logit_scale, ref.logit_scale)


def test_registry_matches_open_clip_configs():
    """Every registered ViTamin has open_clip's config shapes: embed dim, text tower, timm model, pool / projection,
    drop path; and the image tower's parameter count (projection included) is the paper's (S 22.0M, B 87.5M,
    L 333.3M)."""
    import open_clip

    from evaclip.export import open_clip_model_config

    for name in ("ViTamin-S", "ViTamin-S-LTT", "ViTamin-B", "ViTamin-B-LTT", "ViTamin-L"):
        cfg = get_model_config(name)
        ref = open_clip.get_model_config(cfg.open_clip_name)
        ours = open_clip_model_config(cfg, cfg.vision.timm_model)
        assert ours["embed_dim"] == ref["embed_dim"] and ours["text_cfg"] == ref["text_cfg"], name
        assert {k: ours["vision_cfg"][k] for k in ref["vision_cfg"]} == ref["vision_cfg"], name
    with torch.device("meta"):
        for name, params_m in (("ViTamin-S", 22.0), ("ViTamin-B", 87.5), ("ViTamin-L", 333.3)):
            visual = create_model(name).visual
            assert sum(p.numel() for p in visual.parameters()) / 1e6 == pytest.approx(params_m, abs=0.05), name


@pytest.mark.slow
def test_vitamin_s_open_clip_round_trip(tmp_path):
    _open_clip_round_trip("ViTamin-S", tmp_path)


@pytest.mark.slow
def test_vitamin_b_ltt_open_clip_round_trip(tmp_path):
    _open_clip_round_trip("ViTamin-B-LTT", tmp_path)


# ----------------------------------------------------------------------------------------------------------------------
# token dropping after the conv stages
# ----------------------------------------------------------------------------------------------------------------------
def test_token_drop_keeps_half_of_the_transformer_tokens_after_full_conv_stages():
    """At 0.5 the conv stages see the whole image (B x P x D out of them) and the blocks K = P / 2 tokens; the
    features equal timm's own pieces run on the kept tokens (same draw); in eval mode nothing is dropped."""
    from evaclip.models.token_drop import gather_tokens, keep_indices

    model = create_model("ViTamin-tiny", token_drop=0.5, **{"vision.image_size": 64}).train()
    trunk = model.visual.trunk
    seen = {}
    trunk.patch_embed.register_forward_hook(lambda m, i, o: seen.__setitem__("conv", tuple(o.shape)))
    trunk.blocks[0].register_forward_pre_hook(lambda m, i: seen.__setitem__("blocks", tuple(i[0].shape)))
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(7)
    got = model.visual(x)
    assert seen == {"conv": (3, 16, 64), "blocks": (3, 8, 64)}  # 4 x 4 grid, half kept
    torch.manual_seed(7)
    with torch.no_grad():
        tokens_BPD = trunk._pos_embed(trunk.patch_embed(x))
        kept_BKD = gather_tokens(tokens_BPD, keep_indices(3, 16, 0.5))
        ref = model.visual.head(trunk.fc_norm(trunk.blocks(kept_BKD).mean(1)))
    torch.testing.assert_close(got.detach(), ref, rtol=0, atol=1e-6)
    model.eval()
    with torch.no_grad():
        model.visual(x)
    assert seen["blocks"] == (3, 16, 64)


def test_token_drop_zero_is_the_open_clip_forward():
    """Ratio 0 in training mode is open_clip's TimmModel forward (trunk, then head) on the same weights."""
    model = create_model("ViTamin-tiny", token_drop=0.5)
    model.visual.set_token_drop(0.0)
    model.train()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.visual(x), model.visual.head(model.visual.trunk(x)), rtol=0, atol=0)


def test_mim_with_a_hybrid_student_is_refused_in_one_line(tmp_path):
    from evaclip.config import ConfigError, load_config
    from evaclip.tasks.mim import check_mim_cfg

    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes(b"")
    cfg = load_config("demo_mim_cpu", {"model.name": "ViTamin-tiny", "mim.teacher": str(teacher)})
    with pytest.raises(ConfigError, match=r"model.name.*ViTamin-tiny.*hybrid") as e:
        check_mim_cfg(cfg)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------------------------------
# optimizer hooks: layer ids, weight decay as open_clip's training decides
# ----------------------------------------------------------------------------------------------------------------------
def test_weight_decay_groups_follow_open_clip_training():
    """The decayed image-tower parameters are exactly those open_clip_train decays (its rule: not ndim < 2, no
    'bn' / 'ln' / 'bias' / 'logit_scale' in the name): conv and linear weights and ``pos_embed``."""
    from evaclip.config import OptimCfg
    from evaclip.optim import build_param_groups

    model = create_model("ViTamin-tiny")
    groups = build_param_groups(model, OptimCfg(name="adamw", weight_decay=0.2))
    decayed = {n for g in groups if g["weight_decay"] > 0 for n in g["param_names"] if n.startswith("visual.")}

    def open_clip_exclude(n, p):  # open_clip_train/main.py
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    ref = {n for n, p in model.named_parameters() if n.startswith("visual.") and not open_clip_exclude(n, p)}
    assert decayed == ref and "visual.trunk.pos_embed" in decayed


def test_layer_ids_stem_stages_tokens_blocks_head():
    """Layer decay 0.5: the stem gets 0.5^(L+1), each conv stage one step more, the token embedding
    (strided conv + pos_embed) the next, each block one more, the norms and projection 1 (L = 2 + 1 + depth)."""
    from evaclip.config import OptimCfg
    from evaclip.optim import build_param_groups

    model = create_model("ViTamin-tiny")
    L = model.num_layers("visual")
    assert L == 2 + 1 + 2
    scale = {n: g["lr_scale"] for g in build_param_groups(model, OptimCfg(visual_ld=0.5)) for n in g["param_names"]}
    v, c = "visual.trunk.", "visual.trunk.patch_embed.backbone."
    expect = {f"{c}stem.conv1.weight": 0, f"{c}stages.0.0.conv1_1x1.weight": 1, f"{c}stages.1.0.conv1_1x1.weight": 2,
              f"{c}pool.proj.weight": 3, f"{v}pos_embed": 3, f"{v}blocks.0.attn.qkv.weight": 4,
              f"{v}blocks.1.mlp.w2.weight": 5, f"{v}fc_norm.weight": 6, "visual.head.proj.weight": 6}
    for name, layer in expect.items():
        assert scale[name] == pytest.approx(0.5 ** (L + 1 - layer)), name


# ----------------------------------------------------------------------------------------------------------------------
# Locked-Text Tuning: text tower and logit scale from another CLIP
# ----------------------------------------------------------------------------------------------------------------------
def _source_clip(tmp_path, name: str, scale: float, layout: str = "evaclip"):
    from evaclip.models.convert import to_open_clip_state_dict

    torch.manual_seed(3)
    src = create_model(name).eval()
    with torch.no_grad():
        src.logit_scale.fill_(scale)
    sd = to_open_clip_state_dict(src) if layout == "open_clip" else src.state_dict()
    path = tmp_path / f"{name}_{layout}.pt"
    torch.save(sd, path)
    return src, path


@pytest.mark.parametrize("layout", ["evaclip", "open_clip"])
def test_text_init_brings_the_text_tower_and_its_logit_scale(tmp_path, layout):
    src, path = _source_clip(tmp_path, "EVA02-CLIP-tiny", math.log(50.0), layout)
    model = create_model("ViTamin-tiny", text_init=str(path)).eval()
    tokens_BL = _inputs(model.cfg)[1]
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(tokens_BL), src.encode_text(tokens_BL), rtol=0, atol=0)
    assert float(model.logit_scale.detach()) == pytest.approx(math.log(50.0))


def test_text_init_logit_scale_is_clamped_at_ln_100(tmp_path):
    _, path = _source_clip(tmp_path, "EVA02-CLIP-tiny", math.log(300.0))
    report = load_pretrained(create_model("ViTamin-tiny"), text_init=str(path))
    assert any("logit_scale = 4.6052" in n for n in report.notes)


def test_text_projection_dropped_on_width_mismatch_stays_trainable_when_locked(tmp_path, caplog):
    """A text tower from a CLIP with another embedding width: the projection is dropped (one init-report line), the
    rest loads; with optim.lock_text only that projection (and nothing else of the text tower) trains."""
    from evaclip.config import OptimCfg
    from evaclip.optim import lock_towers

    src, path = _source_clip(tmp_path, "EVA02-CLIP-tiny", math.log(20.0))
    with caplog.at_level("INFO", logger="evaclip.models"):
        model = create_model("ViTamin-tiny", text_init=str(path), embed_dim=48)
    assert any("text.text_projection dropped: checkpoint (64, 32) vs model (64, 48)" in r.getMessage()
               for r in caplog.records)
    tokens_BL = _inputs(model.cfg)[1]
    with torch.no_grad():
        torch.testing.assert_close(model.text.forward_tokens(tokens_BL), src.text.forward_tokens(tokens_BL))
    lock_towers(model, OptimCfg(lock_text=True))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and n.startswith("text.")}
    assert trainable == {"text.text_projection"} and model.logit_scale.requires_grad
    with pytest.raises(CheckpointError, match="positional_embedding"):  # another text width is still an error
        create_model("ViTamin-tiny", text_init=str(path), **{"text.width": 32, "text.heads": 2})


# ----------------------------------------------------------------------------------------------------------------------
# exports of a shape open_clip does not ship: encoders, ONNX, open_clip after register_open_clip
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_tiny_vitamin_exports_load_encoder_onnx_and_open_clip(tmp_path):
    """A ViTamin-tiny checkpoint file -> safetensors encoders (``load_encoder``: same features), ONNX (checked
    against PyTorch by the export itself) and open_clip (``register_open_clip`` then ``local-dir:``): same
    features as the evaclip model."""
    import open_clip

    from evaclip.encoder import load_encoder
    from evaclip.export import export, register_open_clip

    torch.manual_seed(0)
    model = create_model("ViTamin-tiny").eval()
    _perturb(model)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    export(str(tmp_path / "model.pt"), str(tmp_path / "out"), ["safetensors", "onnx", "open_clip"],
           model_name="ViTamin-tiny")
    images_BCHW, tokens_BL = _inputs(model.cfg)
    image, text = load_encoder(tmp_path / "out", "image"), load_encoder(tmp_path / "out", "text")
    d = (tmp_path / "out" / "open_clip").resolve()
    register_open_clip(d)
    oc = open_clip.create_model(f"local-dir:{d}").eval()
    with torch.no_grad():
        ref_img, ref_txt = model.encode_image(images_BCHW), model.encode_text(tokens_BL)
        torch.testing.assert_close(image(images_BCHW), ref_img, rtol=0, atol=0)
        torch.testing.assert_close(text(tokens_BL), ref_txt, rtol=0, atol=0)
        torch.testing.assert_close(oc.encode_image(images_BCHW), ref_img, rtol=0, atol=1e-5)
        torch.testing.assert_close(oc.encode_text(tokens_BL), ref_txt, rtol=0, atol=1e-5)
    assert (tmp_path / "out" / "image" / "model.onnx").is_file()


def test_ltt_training_keeps_the_text_tower_and_trains_the_logit_scale(tmp_path):
    """``evaclip train`` with ``model.text_init`` + ``optim.lock_text`` (the LTT recipe's keys) on ViTamin-tiny: the
    text tower is bitwise the source CLIP's after training, and the logit scale trained from the source's value."""
    from evaclip.config import load_config
    from evaclip.train import main

    src, path = _source_clip(tmp_path, "EVA02-CLIP-tiny", math.log(30.0))
    cfg = load_config("demo_vitamin_ltt_cpu", [
        "model.name=ViTamin-tiny", f"model.text_init={path}", "data.synthetic=true", "data.batch_size=4",
        "max_steps=2", f"output_dir={tmp_path}", "name=ltt", "eval.zeroshot=null", "optim.warmup_steps=1"])
    result = main(cfg)
    sd = torch.load(result.checkpoint / "model.pt", weights_only=True)
    ref = src.state_dict()
    assert all(torch.equal(sd[k], ref[k]) for k in ref if k.startswith("text."))
    assert float(sd["logit_scale"]) != pytest.approx(math.log(30.0), abs=0)
    assert abs(float(sd["logit_scale"]) - math.log(30.0)) < 0.1


# ----------------------------------------------------------------------------------------------------------------------
# parallelism: FSDP2 units, 1 process = 2 processes, FSDP2 resume, composition (gloo, CPU)
# ----------------------------------------------------------------------------------------------------------------------
def test_fsdp_units_are_the_conv_stages_then_each_block():
    from evaclip.fsdp import towers, transformer_blocks

    model = create_model("ViTamin-tiny")
    names = {id(m): n for n, m in model.named_modules()}
    units = [names[id(b)] for b in transformer_blocks(model)]
    assert units[:3] == ["visual.trunk.patch_embed", "visual.trunk.blocks.0", "visual.trunk.blocks.1"]
    assert units[3:] == ["text.transformer.resblocks.0", "text.transformer.resblocks.1"]
    assert [names[id(t)] for t in towers(model, transformer_blocks(model))] == ["visual", "text"]


@pytest.fixture(scope="module")
def vitamin_runs(tmp_path_factory):
    import json

    import fsdp_harness as h

    d = tmp_path_factory.mktemp("vitamin_fsdp")
    out = {}
    for world in (1, 2):
        h.launch(h.tower_worker, world, str(d / f"w{world}.json"), str(d / "ckpt"), 6, 8, "ViTamin-tiny")
        out[world] = json.loads((d / f"w{world}.json").read_text())
    return out


@pytest.mark.slow
def test_vitamin_one_process_equals_two_and_fsdp_equals_ddp(vitamin_runs):
    """Global mean loss per step: 1 process (batch 8) = 2 gloo processes (4 each) under DDP and under FSDP2 (fp32
    rounding only: tests/test_fsdp.py's LOSS_RTOL), and the run trains."""
    one, two = vitamin_runs[1]["ddp"], vitamin_runs[2]
    assert one[-1] < one[0]
    assert two["ddp"] == pytest.approx(one, rel=1e-4)
    assert two["fsdp"] == pytest.approx(two["ddp"], rel=1e-4)


@pytest.mark.slow
def test_vitamin_fsdp_resume_is_bitwise(vitamin_runs):
    """Sharded checkpoint at step 3 of 6 by 2 ranks, loaded into a differently initialised 2-rank model: the next
    losses are bitwise the uninterrupted run's."""
    two = vitamin_runs[2]
    assert two["resumed"] == two["fsdp"][3:]


@pytest.mark.slow
def test_vitamin_fsdp_composes_with_grad_checkpointing_token_drop_and_compile(vitamin_runs):
    two = vitamin_runs[2]
    assert two["compose/fsdp"] == pytest.approx(two["compose/ddp"], rel=1e-4)


def test_grad_checkpointing_gives_the_same_gradients():
    """timm's checkpointing (each conv stage, each block) recomputes exactly: same loss and gradients."""
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = create_model("ViTamin-tiny", grad_checkpointing=ckpt, **{"vision.drop_path": 0.0}).train()
        _perturb(model)
        images_BCHW, tokens_BL = _inputs(model.cfg)
        out = model(images_BCHW, tokens_BL)
        (out.image_features @ out.text_features.T).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert model.visual.trunk.grad_checkpointing and model.visual.trunk.patch_embed.backbone.grad_checkpointing
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6, msg=n)


# ----------------------------------------------------------------------------------------------------------------------
# benchmark: a tiny run (the open_clip twin: tests/test_bench.py; figures: the commands in docs/BENCHMARKS.md)
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_bench_train_runs_vitamin_vs_open_clip_at_tiny_settings(tmp_path):
    from evaclip.bench.__main__ import main as bench_main

    rep = bench_main(["train", "--model", "ViTamin-tiny", "--batch", "4", "--token-drop", "0", "0.5", "--vs",
                      "open_clip", "--steps", "1", "--rounds", "1", "--warmup", "0", "--peak-size", "256",
                      "--set", "text.vocab_size=512", "vision.image_size=64", "--out", str(tmp_path)])
    sec = rep["sections"][0]
    by = {(r["impl"], r["optimizer"], r["token_drop"]): r for r in sec["rows"]}
    assert len(by) == 6 and all(r["step_ms"] > 0 for r in by.values())
    ours, theirs = by[("evaclip", "lamb (foreach)", 0.0)], by[("open_clip", "torch_optimizer.Lamb", 0.0)]
    assert ours["params_m"] == pytest.approx(theirs["params_m"])  # the same model on both sides
    # the text tower's fast path (the last block for the EOT row only) is evaclip's, the image tower is timm's
    assert ours["gflops_per_sample"] < theirs["gflops_per_sample"]
    dropped = by[("evaclip", "lamb (foreach)", 0.5)]
    assert dropped["gflops_per_sample"] < ours["gflops_per_sample"]
    assert "step_time_ratio_drop0.5_vs_0" in sec["summary"]


def test_ltt_recipes_are_the_upstream_short_schedule_and_its_lamb_twin():
    """vitamin_b_ltt: the upstream numbers (AdamW, batch 8192, lr 5e-4, warmup 500, beta2 0.98, wd 0.2, 1.28B
    samples, text tower locked); vitamin_b_ltt_lamb differs in the optimizer alone (LAMB), schedule included."""
    from evaclip.config import load_config, to_dict

    a, b = load_config("vitamin_b_ltt"), load_config("vitamin_b_ltt_lamb")
    assert (a.model.name, a.optim.name, a.global_batch, a.optim.lr, a.optim.warmup_steps, a.optim.betas[1],
            a.optim.weight_decay) == ("ViTamin-B-LTT", "adamw", 8192, 5e-4, 500, 0.98, 0.2)
    assert a.epochs * a.data.train_num_samples == 1_280_000_000 and a.optim.lock_text and a.model.text_init
    assert b.optim.name == "lamb"
    da, db = to_dict(a), to_dict(b)
    assert {k: v for k, v in da.items() if k not in ("optim", "name")} == \
        {k: v for k, v in db.items() if k not in ("optim", "name")}
    assert (db["optim"]["warmup_steps"], db["optim"]["schedule"], db["optim"]["lock_text"]) == (500, "cosine", True)


@pytest.mark.slow
def test_torch_compile_trains_like_eager():
    """``model.compile`` (the DDP path's; aot_eager: dynamo + AOT autograd without a C++ compiler) through timm's
    trunk and the token drop: the same losses as eager for the same token-drop draws."""
    from evaclip.config import OptimCfg
    from evaclip.losses import ClipLoss
    from evaclip.optim import build_optimizer

    losses = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = create_model("ViTamin-tiny", token_drop=0.5, **{"vision.image_size": 64}).train()
        if compiled:
            model.compile(backend="aot_eager")
        optimizer = build_optimizer(model, OptimCfg(lr=1e-3))
        images_BCHW, tokens_BL = _inputs(model.cfg)
        torch.manual_seed(5)
        run = []
        for _ in range(3):
            out = model(images_BCHW, tokens_BL)
            loss = ClipLoss()(out.image_features, out.text_features, out.logit_scale)["loss"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            run.append(loss.item())
        losses.append(run)
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_patch_tokens_of_the_last_block_are_the_trunks_features():
    """``CLIP.encode_patches`` on a ViTamin: the last block's tokens are what timm's ``forward_features`` gives
    (B x P x D over the stride-16 grid); an earlier block's differ."""
    model = create_model("ViTamin-tiny", **{"vision.image_size": 64}).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        last = model.encode_patches(x, -1)
        torch.testing.assert_close(last, model.visual.trunk.forward_features(x), rtol=0, atol=0)
        assert last.shape == (2, 16, 64) and not torch.allclose(model.encode_patches(x, 0), last)


def test_demo_arms_cost_the_same_training_flops():
    """docs/DEMO.md's ViTamin-vs-EVA-02 table compares at equal steps because a training step (text locked, no
    token dropping) costs the same FLOPs in both arms: counted, within 2 %."""
    from evaclip.demo_ltt import ARMS, ltt_table, train_flops_per_sample

    vit, eva = (train_flops_per_sample(m, batch=2) for m in ARMS.values())
    assert vit / eva == pytest.approx(1.0, abs=0.02)
    rows = [{"seed": 0, "seconds": {"ltt_vitamin": 1.0, "ltt_eva02": 2.0},
             "ltt_vitamin": {25: 0.5, 100: 0.9}, "ltt_eva02": {100: 0.6}}]
    table = ltt_table(rows, {50: 0.2, 300: 0.95})
    assert "| 0 | ViTamin-demo | 50.0 | - | - | 90.0 | 1 |" in table and "95.0 % at 50 / 300 steps" in table


def test_image_init_from_a_bare_timm_vitamin_trunk():
    """A timm ``vitamin_*`` state dict (no ``visual.trunk.`` prefix, timm's own classifier) as ``model.image_init``:
    the trunk loads strictly, timm's classifier is no CLIP projection, so ``head.proj`` stays fresh (reported)."""
    import timm

    from evaclip.models.registry import get_model_config
    from evaclip.models.timm_vision import timm_trunk_kwargs

    kwargs = {**timm_trunk_kwargs(get_model_config("ViTamin-tiny").vision), "num_classes": 10}
    trunk = timm.create_model("vitamin_small_224", pretrained=False, **kwargs)
    _perturb(trunk)
    model = create_model("ViTamin-tiny")
    report = load_pretrained(model, image_init=trunk.state_dict())
    assert report.formats["image_init"] == "timm" and report.fresh == ["visual.head.proj.weight"]
    assert sorted(report.ignored) == ["head.bias", "head.weight"]
    ours = model.visual.trunk.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in trunk.state_dict().items() if not k.startswith("head."))
