"""Masked image modeling, model side: the student (mask token in place, EVA-02 init, optimizer hooks), the frozen CLIP
teacher and its targets, the loss, and the EVA-02 released MIM layout (timm, ``model.image_init``, ``evaclip export``).
Tiny towers, CPU, fp32."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from evaclip.losses import mim_cosine_loss
from evaclip.models import create_model
from evaclip.models.convert import load_pretrained, load_state_dict_file, to_eva_mim_state_dict
from evaclip.models.mim import (
    MIMStudent,
    MIMTeacher,
    build_student,
    resize_target_map,
)
from evaclip.runs import load_student, load_teacher

T = 32  # the tiny CLIPs' embed dim: the teachers' feature size


def _student(name="EVA02-CLIP-tiny", target_dim=T, **kw) -> MIMStudent:
    return build_student(name, target_dim, attn_backend="sdpa", **kw)


def _images(n=2, size=32, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _mask(n=2, patches=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, patches, generator=g) < 0.4
    mask[:, 0] = True  # at least one masked and one visible patch per image
    mask[:, 1] = False
    return mask


def _randomize_(module, std=0.2):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)
    return module


def _teacher(name="EVA02-CLIP-tiny", **overrides) -> MIMTeacher:
    clip = _randomize_(create_model(name, attn_backend="sdpa", **overrides))
    return MIMTeacher(clip.visual)


# ----------------------------------------------------------------------------------------------------------------------
# student
# ----------------------------------------------------------------------------------------------------------------------
def test_student_layout_is_eva_mim():
    s = _student()
    keys = set(s.state_dict())
    assert {"cls_token", "mask_token", "pos_embed", "patch_embed.proj.weight", "norm.weight", "lm_head.weight",
            "lm_head.bias", "blocks.1.attn.q_bias", "blocks.1.mlp.ffn_ln.weight"} <= keys
    assert not any(k.startswith("head.") or "inner_attn_ln" in k for k in keys)  # EVA-02 B / L MIM: no attention sub-LN
    assert s.lm_head.weight.shape == (T, 64) and s.mask_token.shape == (1, 1, 64)
    assert any("inner_attn_ln" in k for k in _student(attn_subln=True).state_dict())


def test_masked_patches_become_the_mask_token():
    """Pixels under a masked patch never reach the output; predictions come in ``x[mask]`` order."""
    s = _student().eval()
    x, mask = _images(), _mask()
    out_MT = s(x, mask)
    assert out_MT.shape == (int(mask.sum()), T)
    torch.testing.assert_close(out_MT, s(x, mask, all_positions=True)[mask])
    p = 8  # patch side of the tiny tower: patch i of the 4 x 4 grid is rows 8*(i//4).., cols 8*(i%4)..
    x2 = x.clone()
    for b, i in mask.nonzero().tolist():
        x2[b, :, p * (i // 4):p * (i // 4 + 1), p * (i % 4):p * (i % 4 + 1)] = 100.0
    torch.testing.assert_close(s(x2, mask, all_positions=True), s(x, mask, all_positions=True))
    # the same pixels do change the output when not masked
    assert not torch.allclose(s(x2, None), s(x, None))
    # a mask given as B x G x G is the same mask
    torch.testing.assert_close(s(x, mask.view(2, 4, 4)), out_MT)


def test_mask_token_gets_gradient_only_from_masked_positions():
    s = _student()
    x, mask = _images(), _mask()
    s(x, torch.zeros_like(mask), all_positions=True).sum().backward()
    assert s.mask_token.grad is None or s.mask_token.grad.abs().max() == 0
    s.zero_grad()
    s(x, mask).sum().backward()
    assert s.mask_token.grad.abs().max() > 0


def test_token_dropping_is_refused():
    s = _student()
    with pytest.raises(ValueError, match="token_drop"):
        s.set_token_drop(0.5)
    s.token_drop = 0.5  # even if forced, the masked forward refuses to drop patches
    with pytest.raises(ValueError, match="token_drop"):
        s.train()(_images(), _mask())


def _xavier_std(fan_in: int, fan_out: int) -> float:
    """torch.nn.init.xavier_normal_'s std for a Linear(fan_in, fan_out) (gain 1), the init EVA-02 applies."""
    return math.sqrt(2.0 / (fan_in + fan_out))


def _trunc_std(std: float) -> float:
    """The std of EVA's trunc_normal_(std) (EVA-01/eva/modeling_pretrain.py:24-25 and EVA-02/asuka/
    modeling_pretrain.py:28-29: timm's trunc_normal_ with a=-std, b=std), a normal cut at one std:
    std * sqrt(1 - 2 phi(1) / (2 Phi(1) - 1))."""
    phi1 = math.exp(-0.5) / math.sqrt(2 * math.pi)
    mass = math.erf(1 / math.sqrt(2))  # 2 Phi(1) - 1
    return std * math.sqrt(1 - 2 * phi1 / mass)


def test_eva02_init_sub_ln_uses_each_eva_linear_fan():
    """EVA-02 B / L (sub-LN): q, k, v are three Linear(D, D) (EVA-02/asuka/modeling_finetune.py:139-141), SwiGLU w1 / w2
    two Linear(D, Hd) (:99-100); xavier_normal_ per layer (modeling_pretrain.py:121-122), then v_proj, attn.proj and
    the mlp.w* weights x sqrt(ln(2 depth)) (modeling_pretrain.py:144-154). Each block of evaclip's fused weights must
    have the std of EVA's separate layer."""
    torch.manual_seed(0)
    D, L = 128, 4
    s = _student(**{"vision.depth": L, "vision.width": D, "vision.heads": 4})
    Hd, scale = s.cfg.mlp_hidden, math.sqrt(math.log(2 * L))
    for blk in s.blocks:
        q, k, v = blk.attn.qkv.weight.split(D)
        w1, w2 = blk.mlp.w12.weight.split(Hd)
        want = {"q": (q, _xavier_std(D, D)), "k": (k, _xavier_std(D, D)), "v": (v, scale * _xavier_std(D, D)),
                "w1": (w1, scale * _xavier_std(D, Hd)), "w2": (w2, scale * _xavier_std(D, Hd)),
                "w3": (blk.mlp.w3.weight, scale * _xavier_std(Hd, D)),
                "proj": (blk.attn.proj.weight, scale * _xavier_std(D, D))}
        for name, (w, std) in want.items():
            assert w.std().item() == pytest.approx(std, rel=0.05), name
    assert s.lm_head.weight.std().item() == pytest.approx(_xavier_std(D, T), rel=0.05)
    assert float(s.blocks[0].mlp.w12.bias.detach().abs().max()) == 0.0
    assert float(s.mask_token.detach().abs().max()) <= 0.02 and float(s.cls_token.detach().abs().max()) <= 0.02
    assert s.pos_embed.std().item() == pytest.approx(_trunc_std(0.02), rel=0.05)


def test_eva02_init_fused_towers_keep_the_fused_fan():
    """Ti / S and EVA-01-shaped towers have one fused qkv (modeling_finetune.py:143) and xformers' fused SwiGLU w12 in
    EVA-02 too: xavier over the fused weight, no rescale without sub-LN."""
    torch.manual_seed(0)
    D = 128
    s = _student(**{"vision.width": D, "vision.heads": 4, "vision.subln": False})
    Hd = s.cfg.mlp_hidden
    assert s.blocks[1].attn.qkv.weight.std().item() == pytest.approx(_xavier_std(D, 3 * D), rel=0.05)
    assert s.blocks[1].mlp.w12.weight.std().item() == pytest.approx(_xavier_std(D, 2 * Hd), rel=0.05)
    e1 = _student("EVA01-CLIP-tiny", **{"vision.width": D, "vision.heads": 4})
    assert e1.blocks[1].attn.proj.weight.std().item() == pytest.approx(_xavier_std(D, D), rel=0.05)


@pytest.mark.parametrize("init", ["eva01", "beit"])
def test_eva01_init(init):
    """EVA-01's init (EVA-01/eva/modeling_pretrain.py:74-80, 95-114): trunc_normal(init_std, cut +-init_std) on the
    tokens, every Linear and the patch Conv2d, zero biases, attn.proj and mlp.fc2 / sqrt(2 layer_id); g/14 uses
    init_std 0.015 (:171-172)."""
    torch.manual_seed(0)
    D, std = 256, 0.015
    s = _student("EVA01-CLIP-tiny", init=init, init_std=std, **{"vision.width": D, "vision.heads": 8,
                                                                 "vision.depth": 3})
    t = _trunc_std(std)
    for w in (s.blocks[0].attn.qkv.weight, s.blocks[2].mlp.fc1.weight, s.lm_head.weight, s.patch_embed.proj.weight,
              s.pos_embed):
        assert w.std().item() == pytest.approx(t, rel=0.05)
        assert float(w.detach().abs().max()) <= std
    for i, blk in enumerate(s.blocks):
        for w in (blk.attn.proj.weight, blk.mlp.fc2.weight):
            assert w.std().item() == pytest.approx(t / math.sqrt(2.0 * (i + 1)), rel=0.05)
    assert float(s.patch_embed.proj.bias.detach().abs().max()) == 0.0
    assert float(s.blocks[1].mlp.fc1.bias.detach().abs().max()) == 0.0
    # a SwiGLU tower under EVA-02's BEiT branch rescales w3 (EVA-02/asuka/modeling_pretrain.py:166-175)
    e2 = _student(init=init, init_std=std, **{"vision.width": D, "vision.heads": 8, "vision.depth": 2})
    assert e2.blocks[1].mlp.w3.weight.std().item() == pytest.approx(t / 2.0, rel=0.05)


def test_patch_embed_grad_scale():
    torch.manual_seed(0)
    a = _student()
    b = _student(patch_embed_grad_scale=0.1)
    b.load_state_dict(a.state_dict())
    x, mask = _images(), _mask()
    la, lb = a(x, mask).square().mean(), b(x, mask).square().mean()
    torch.testing.assert_close(la, lb)
    la.backward()
    lb.backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        want = 0.1 * pa.grad if name.startswith("patch_embed.") else pa.grad
        torch.testing.assert_close(pb.grad, want, msg=name)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    a = _student()
    b = _student(grad_checkpointing=True)
    b.load_state_dict(a.state_dict())
    x, mask = _images(), _mask()
    a(x, mask).sum().backward()
    b(x, mask).sum().backward()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad)


def test_optimizer_hooks_and_groups():
    from evaclip.config import OptimCfg
    from evaclip.optim import build_optimizer, build_param_groups

    s = _student()
    assert s.layer_id("mask_token") == s.layer_id("patch_embed.proj.weight") == s.layer_id("pos_embed") == 0
    assert s.layer_id("blocks.1.attn.qkv.weight") == 2 and s.layer_id("lm_head.weight") == s.layer_id("norm.bias") == 3
    assert s.num_layers("visual") == 2 and {s.param_tower(n) for n, _ in s.named_parameters()} == {"visual"}
    groups = build_param_groups(s, OptimCfg(name="adamw", weight_decay=0.05, visual_ld=0.8))
    wd = {n: g["weight_decay"] for g in groups for n in g["param_names"]}
    assert wd["pos_embed"] == wd["cls_token"] == wd["norm.weight"] == wd["blocks.0.attn.q_bias"] == 0.0
    assert wd["lm_head.bias"] == wd["blocks.0.mlp.w12.bias"] == 0.0
    assert wd["mask_token"] == wd["lm_head.weight"] == wd["blocks.0.attn.qkv.weight"] == 0.05
    scale = {n: g["lr_scale"] for g in groups for n in g["param_names"]}
    assert scale["lm_head.weight"] == 1.0 and scale["mask_token"] == pytest.approx(0.8 ** 3)
    for name in ("adamw", "lamb"):  # both optimizers take a step
        opt = build_optimizer(s, OptimCfg(name=name, lr=1e-3))
        s(_images(), _mask()).square().mean().backward()
        before = s.lm_head.weight.detach().clone()
        opt.step()
        opt.zero_grad()
        assert not torch.equal(before, s.lm_head.weight)


def test_pooled_features_are_the_mean_normed_patch_token():
    s = _student().eval()
    x = _images()
    tokens = s.forward_features(x)
    torch.testing.assert_close(s.pooled_features(x), tokens[:, 1:].mean(1))


# ----------------------------------------------------------------------------------------------------------------------
# loss
# ----------------------------------------------------------------------------------------------------------------------
def test_loss_is_negative_cosine_on_masked_positions():
    g = torch.Generator().manual_seed(1)
    pred_BPT = torch.randn(3, 16, T, generator=g, requires_grad=True)
    target_BPT = torch.randn(3, 16, T, generator=g)
    mask = _mask(3)
    terms = [-(pred_BPT[b, p] @ target_BPT[b, p]) / (pred_BPT[b, p].norm() * target_BPT[b, p].norm())
             for b in range(3) for p in range(16) if mask[b, p]]
    ref = torch.stack(terms).mean()
    loss = mim_cosine_loss(pred_BPT, target_BPT, mask)
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert pred_BPT.grad[~mask].abs().max() == 0 and pred_BPT.grad[mask].abs().min() > 0
    # predictions already gathered at the masked positions (the student's default output) give the same loss
    torch.testing.assert_close(mim_cosine_loss(pred_BPT.detach()[mask], target_BPT, mask), ref.detach())
    # a global denominator: two halves with the count of the whole give the loss of the whole
    n = mask.sum()
    halves = sum(mim_cosine_loss(pred_BPT.detach()[i:j], target_BPT[i:j], mask[i:j], denom=n)
                 for i, j in ((0, 1), (1, 3)))
    torch.testing.assert_close(halves, ref.detach())
    with pytest.raises(ValueError, match="predictions"):
        mim_cosine_loss(pred_BPT.detach()[mask][1:], target_BPT, mask)


# ----------------------------------------------------------------------------------------------------------------------
# teacher
# ----------------------------------------------------------------------------------------------------------------------
def test_teacher_targets_frozen_and_without_grad():
    teacher = _teacher()
    tower = teacher.tower
    x = _images().requires_grad_(True)
    teacher.train()
    assert not teacher.training and not tower.training
    assert not any(p.requires_grad for p in teacher.parameters())
    target = teacher(x)
    assert target.shape == (2, 16, T) and not target.requires_grad
    ref = tower.head(tower.norm(tower._blocks(tower._embed(x)[0], tower._rope(None), False))[:, 1:])
    torch.testing.assert_close(target, ref.detach())  # per-token norm then CLIP head, not L2-normalised
    assert not torch.allclose(target.norm(dim=-1), torch.ones(2, 16))
    # a student trained on it leaves the teacher without gradients
    s = _student()
    mask = _mask()
    mim_cosine_loss(s(x, mask), teacher(x), mask).backward()
    assert all(p.grad is None for p in teacher.parameters()) and s.lm_head.weight.grad is not None


def test_resize_target_map():
    g = torch.Generator().manual_seed(0)
    t_BPT = torch.randn(2, 64, 5, generator=g)  # an 8 x 8 teacher grid
    area = resize_target_map(t_BPT, 4, "area")  # each student patch: the mean of the 2 x 2 teacher patches under it
    blocks = t_BPT.view(2, 4, 2, 4, 2, 5).mean(dim=(2, 4)).reshape(2, 16, 5)
    torch.testing.assert_close(area, blocks)
    const = torch.ones(1, 64, 3) * torch.tensor([1.0, -2.0, 3.0])
    for mode in ("bilinear", "area"):
        for grid in (4, 6, 11):
            torch.testing.assert_close(resize_target_map(const, grid, mode), const[:, :1].expand(1, grid * grid, 3))
    up = resize_target_map(t_BPT[:, :16], 8, "bilinear")  # enlarging 4 -> 8: plain bilinear interpolation
    ref = F.interpolate(t_BPT[:, :16].transpose(1, 2).reshape(2, 5, 4, 4), size=(8, 8), mode="bilinear",
                        align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(up, ref)
    assert resize_target_map(t_BPT, 8) is t_BPT


def test_teacher_on_another_grid_and_image_size():
    """A patch-4 teacher (8 x 8 grid) for a patch-8 student (4 x 4): targets resized to the student's grid. Images of
    another size than the teacher's are resized to it first."""
    teacher = _teacher(**{"vision.patch_size": 4, "vision.pt_hw_seq_len": 8})
    assert teacher.grid == 8
    x = _images()
    full = teacher(x)
    assert full.shape == (2, 64, T)
    torch.testing.assert_close(teacher(x, grid=4), resize_target_map(full, 4, "bilinear"))
    small = _images(size=16)
    up = F.interpolate(small, size=(32, 32), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(teacher(small, grid=4), resize_target_map(teacher(up), 4))
    area = MIMTeacher(teacher.tower, resize="area")
    torch.testing.assert_close(area(x, grid=4), resize_target_map(full, 4, "area"))


def test_load_teacher_from_files_and_exports(tmp_path):
    from evaclip.export import export_safetensors
    from evaclip.models.convert import to_eva_clip_state_dict

    clip = _randomize_(create_model("EVA02-CLIP-tiny", attn_backend="sdpa")).eval()
    x = _images()
    want = MIMTeacher(clip.visual)(x)
    torch.save(clip.state_dict(), tmp_path / "evaclip.pt")
    torch.save({"state_dict": to_eva_clip_state_dict(clip)}, tmp_path / "release.pt")
    export_safetensors(clip, clip.cfg, "EVA02-CLIP-tiny", tmp_path / "export")
    visual_only = {k[len("visual."):]: v for k, v in clip.state_dict().items() if k.startswith("visual.")}
    torch.save(visual_only, tmp_path / "visual.pt")
    for src in ("evaclip.pt", "release.pt", "export", "export/image", "visual.pt"):
        teacher = load_teacher(tmp_path / src, "EVA02-CLIP-tiny", attn_backend="sdpa")
        torch.testing.assert_close(teacher(x), want, msg=src)
    with pytest.raises(Exception, match="architecture"):
        load_teacher(tmp_path / "evaclip.pt")  # a bare file says nothing about its architecture
    no_head = {k: v for k, v in visual_only.items() if not k.startswith("head.")}
    torch.save(no_head, tmp_path / "no_head.pt")
    with pytest.raises(Exception, match="head"):
        load_teacher(tmp_path / "no_head.pt", "EVA02-CLIP-tiny", attn_backend="sdpa")


# ----------------------------------------------------------------------------------------------------------------------
# the EVA-02 released MIM layout: export, timm, model.image_init
# ----------------------------------------------------------------------------------------------------------------------
def _timm_eva(student: MIMStudent):
    from timm.models.eva import Eva

    v = student.cfg
    kw = dict(img_size=v.image_size, patch_size=v.patch_size, embed_dim=v.width, depth=v.depth, num_heads=v.heads,
              mlp_ratio=v.mlp_ratio, qkv_fused=not v.subln, swiglu_mlp=v.swiglu, scale_mlp=v.subln,
              use_rot_pos_emb=v.rope, init_values=v.layer_scale, num_classes=0, global_pool="avg")
    if v.rope:
        kw["ref_feat_shape"] = (v.pt_hw_seq_len, v.pt_hw_seq_len)
    return Eva(**kw).eval()


@pytest.mark.parametrize("name,overrides", [("EVA02-CLIP-tiny", {}), ("EVA02-CLIP-tiny", {"vision.subln": False}),
                                            ("EVA01-CLIP-tiny", {})], ids=["eva02-subln", "eva02-ti-s", "eva01"])
def test_export_loads_into_timm_eva_with_same_features(tmp_path, name, overrides):
    from timm.models.eva import checkpoint_filter_fn

    from evaclip.export import export_eva_mim

    student = _randomize_(_student(name, **overrides), std=0.1).eval()
    sd = to_eva_mim_state_dict(student)
    if student.cfg.subln:  # EVA-02 B / L release: q / k / v apart, SwiGLU w1 / w2 apart
        assert {"blocks.0.attn.q_proj.weight", "blocks.0.attn.k_proj.weight", "blocks.0.attn.v_proj.weight",
                "blocks.0.mlp.w1.weight", "blocks.0.mlp.w2.weight", "blocks.0.mlp.ffn_ln.weight"} <= set(sd)
    else:  # EVA-01 and EVA-02 Ti / S releases keep the fused qkv (and w12)
        assert "blocks.0.attn.qkv.weight" in sd
    assert {"cls_token", "mask_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
            "blocks.1.attn.q_bias", "blocks.1.attn.v_bias", "norm.weight", "norm.bias", "lm_head.weight",
            "lm_head.bias"} <= set(sd)
    x = _images()
    ours = student.forward_features(x)  # every token after the final norm
    for path in export_eva_mim(student, tmp_path / "mim.pt") + export_eva_mim(student, tmp_path / "mim.safetensors"):
        raw = torch.load(path, weights_only=True) if path.suffix == ".pt" else __import__(
            "safetensors.torch", fromlist=["load_file"]).load_file(str(path))
        assert path.suffix != ".pt" or set(raw) == {"module"}
        timm_model = _timm_eva(student)
        timm_model.load_state_dict(checkpoint_filter_fn(raw, timm_model), strict=True)
        with torch.no_grad():  # timm moves a MIM checkpoint's final norm to fc_norm (its fine-tuning head)
            theirs = timm_model.fc_norm(timm_model.forward_features(x))
        torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4, msg=str(path))
        # and back into evaclip: the same student
        back = load_student(path, name, **overrides)
        torch.testing.assert_close(back(x, _mask(), all_positions=True), student(x, _mask(), all_positions=True))


def _fake_checkpoint(student, folder, name="EVA02-CLIP-tiny", overrides="{}"):
    """A training checkpoint folder of a MIM run as the engine writes it (model.pt + config.yaml + meta.json)."""
    from evaclip.checkpoint import save_checkpoint

    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    cfg_yaml = f"task: mim\nmodel:\n  name: {name}\n  overrides: {overrides}\n"
    return save_checkpoint(folder / "ckpt", 3, student, opt, states={}, config_yaml=cfg_yaml)


def _eva02_rope_freqs(head_dim: int, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """EVA-02's MIM RoPE buffers, by its own formula: VisionRotaryEmbeddingFast(dim=head_dim // 2, pt_seq_len=
    img_size // patch_size) (EVA-02/asuka/modeling_pretrain.py:73-80; rope.py, class VisionRotaryEmbeddingFast:
    freqs_for 'lang', theta 10000, t = arange(ft) / ft * pt, repeat (n r) r=2, broadcat rows then columns,
    view(-1, F))."""
    dim = head_dim // 2
    freqs = 1.0 / (10000 ** (torch.arange(0, dim, 2)[:(dim // 2)].float() / dim))
    t = torch.arange(grid) / grid * grid
    freqs = torch.einsum("..., f -> ... f", t, freqs).repeat_interleave(2, dim=-1)
    freqs = torch.cat([freqs[:, None, :].expand(grid, grid, dim), freqs[None, :, :].expand(grid, grid, dim)], dim=-1)
    return freqs.cos().view(-1, freqs.shape[-1]), freqs.sin().view(-1, freqs.shape[-1])


def test_eva_mim_export_carries_evas_rope_buffers(tmp_path):
    """EVA-02's MIM model holds rope.freqs_cos / freqs_sin (registered buffers, persistent) at the model and, as each
    Attention keeps ``self.rope = rope``, under every block's attn (modeling_finetune.py Attention.__init__); the
    released files carry them. The export writes exactly those keys with EVA's values; model.image_init drops them."""
    from evaclip.export import export_eva_mim

    student = _student()  # EVA02-CLIP-tiny: 4 x 4 grid (pt_hw_seq_len 4), head dim 32
    want_keys = {f"{p}rope.freqs_{c}" for p in [""] + [f"blocks.{i}.attn." for i in range(2)] for c in ("cos", "sin")}
    cos, sin = _eva02_rope_freqs(32, 4)
    for path in export_eva_mim(student, tmp_path / "m.safetensors") + export_eva_mim(student, tmp_path / "m.pt"):
        sd = load_state_dict_file(path)
        assert {k for k in sd if "rope" in k} == want_keys, path
        for k in want_keys:
            torch.testing.assert_close(sd[k], cos if k.endswith("cos") else sin, atol=1e-6, rtol=0, msg=k)
    assert not any("rope" in k for k in to_eva_mim_state_dict(_student("EVA01-CLIP-tiny")))  # no RoPE, no tables


def test_image_init_from_mim_export_checkpoint_and_run(tmp_path):
    """model.image_init takes a MIM export, checkpoint folder or run folder; the report names exactly the dropped and
    the fresh keys."""
    from evaclip.export import export_eva_mim

    student = _randomize_(_student()).eval()
    step_dir = _fake_checkpoint(student, tmp_path / "run")
    sources = [*export_eva_mim(student, tmp_path / "mim.pt"), *export_eva_mim(student, tmp_path / "m.safetensors"),
               step_dir, tmp_path / "run"]
    mim_sd = student.state_dict()
    for src in sources:
        clip = create_model("EVA02-CLIP-tiny", attn_backend="sdpa")
        report = load_pretrained(clip, image_init=str(src))
        assert report.formats["image_init"] == "eva_mim", src
        rope = {k for k in to_eva_mim_state_dict(student) if "freqs_" in k} if src.is_file() else set()
        assert set(report.ignored) == {"lm_head.bias", "lm_head.weight", "mask_token"} | rope, src
        fresh = {"visual.head.weight", "visual.head.bias"} | {f"visual.blocks.{i}.attn.inner_attn_ln.{p}"
                                                             for i in range(2) for p in ("weight", "bias")}
        assert set(report.fresh) == fresh and report.adapted == [], src
        assert set(report.reinit) == {"visual.head.weight", "visual.head.bias"}, src
        for k, v in clip.visual.state_dict().items():
            if "visual." + k not in fresh and k in mim_sd:
                torch.testing.assert_close(v, mim_sd[k], msg=k)
    # create_model's own argument takes it too
    clip = create_model("EVA02-CLIP-tiny", image_init=str(tmp_path / "run"), attn_backend="sdpa")
    torch.testing.assert_close(clip.visual.blocks[1].mlp.w3.weight, student.blocks[1].mlp.w3.weight)


def test_clip_head_after_image_init_from_mim_is_eva_clips():
    """EVA-CLIP's head on a MIM-initialised tower: trunc_normal(std=.02) (timm's, cut at +-2: no cut at this std) then
    x init_scale 0.001, bias zero (EVA-CLIP/rei/eva_clip/eva_vit_model.py:433-436, init_scale=0.001 at :373; model.py
    :110 does not pass another). A CLIP head of width 1024 x embed 256 gives the std to 1 %."""
    torch.manual_seed(0)
    student = _student(**{"vision.width": 1024, "vision.heads": 16, "vision.depth": 1})
    clip = create_model("EVA02-CLIP-tiny", attn_backend="sdpa",
                        **{"vision.width": 1024, "vision.heads": 16, "vision.depth": 1, "embed_dim": 256})
    with torch.no_grad():
        clip.visual.head.bias.fill_(1.0)
    report = load_pretrained(clip, image_init=student.state_dict())
    assert report.formats["image_init"] == "eva_mim"
    assert clip.visual.head.weight.std().item() == pytest.approx(0.02 * 0.001, rel=0.05)
    assert float(clip.visual.head.bias.detach().abs().max()) == 0.0
    assert "0.001" in report.reinit["visual.head.weight"]


def test_load_student_and_cli_export_from_a_run(tmp_path):
    from evaclip.export import export

    student = _randomize_(_student()).eval()
    _fake_checkpoint(student, tmp_path / "run")
    back = load_student(tmp_path / "run")  # architecture from the checkpoint's config.yaml
    x, mask = _images(), _mask()
    torch.testing.assert_close(back(x, mask), student(x, mask))
    files = export(str(tmp_path / "run"), str(tmp_path / "out"), "eva_mim")
    assert sorted(f.name for f in files) == ["README.md", "config.json", "eva_mim.pt", "eva_mim.safetensors"]
    torch.testing.assert_close(load_student(files[0], "EVA02-CLIP-tiny")(x, mask), student(x, mask))
    with pytest.raises(ValueError, match="alone"):
        export(str(tmp_path / "run"), str(tmp_path / "out2"), ["eva_mim", "onnx"])


@pytest.mark.parametrize("overrides", [{}, {"vision.subln": False}], ids=["eva02-subln", "eva02-ti-s"])
def test_eva_mim_export_config_and_readme_lines_load_it_in_timm(tmp_path, overrides):
    """The eva_mim export's README.md lines, run as written, build timm's Eva from config.json and load the export:
    the same tokens as the student's (final norm); config.json's arguments are those the timm test above builds;
    the .safetensors is readable by group and others."""
    import re
    import stat

    from evaclip.export import export

    student = _randomize_(_student(**overrides), std=0.1).eval()
    _fake_checkpoint(student, tmp_path / "run", overrides="{vision: {subln: false}}" if overrides else "{}")
    export(str(tmp_path / "run"), str(tmp_path / "out"), "eva_mim")
    out = tmp_path / "out"
    cfg = json.loads((out / "config.json").read_text())
    reference = _timm_eva(student)
    built = __import__("timm.models.eva", fromlist=["Eva"]).Eva(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in cfg["timm_eva"].items()})
    assert [(k, v.shape) for k, v in built.state_dict().items()] == [
        (k, v.shape) for k, v in reference.state_dict().items()]
    ns = {}
    exec(re.search(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S).group(1), ns)
    with torch.no_grad():
        torch.testing.assert_close(ns["tokens"], student.forward_features(ns["images"]), rtol=1e-4, atol=1e-4)
    assert oct(stat.S_IMODE((out / "eva_mim.safetensors").stat().st_mode)) == "0o644"


def test_exporting_or_evaluating_a_mim_run_as_a_clip_names_the_eva_mim_format(tmp_path, capsys):
    from PIL import Image

    from evaclip.evals import main as eval_main
    from evaclip.export import main as export_main

    _fake_checkpoint(_student(), tmp_path / "run")
    for c in ("a", "b"):  # a tiny ImageNet-style zero-shot set
        (tmp_path / "zs" / c).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "zs" / c / "0.png")
    assert export_main([str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 2
    assert eval_main([str(tmp_path / "run"), "--zeroshot", str(tmp_path / "zs"), "--quiet"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 2 and all("MIM student" in e and "--format eva_mim" in e for e in errors), errors
