"""EVA-01's MIM teacher: an OpenAI-layout ViT CLIP (OpenAI's release layout = open_clip's non-timm ViT,
``visual.conv1``) loads as a MIM teacher whose targets are EVA-01's (drop CLS -> ln_post -> @ proj), a MIM run on the
digits trains from one, and the EVA-01 g/14 MIM recipe loads and validates. The reference: open_clip's own tower, run
through EVA-01's forward (baaivision/EVA, EVA-01/eva/clip/model.py:254-273)."""
from __future__ import annotations

import pytest
import torch

from evaclip.config import load_config
from evaclip.models.convert import CheckpointError
from evaclip.models.mim import MIMTeacher
from evaclip.runs import load_teacher


def _open_clip_vit(quick_gelu: bool = True, width: int = 128, layers: int = 2, patch: int = 8, image: int = 32):
    """A tiny open_clip CLIP with its non-timm VisionTransformer (OpenAI's parameter names), randomised."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    model = CLIP(48, CLIPVisionCfg(layers=layers, width=width, patch_size=patch, image_size=image, head_width=64),
                 CLIPTextCfg(context_length=16, vocab_size=100, width=64, heads=2, layers=1), quick_gelu=quick_gelu)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _eva01_targets(visual, x):
    """EVA-01's teacher forward (EVA-01/eva/clip/model.py:254-273) on open_clip's modules (batch first in open_clip 3,
    where OpenAI's permutes to LND and back)."""
    x = visual.conv1(x)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    x = torch.cat([visual.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype), x],
                  dim=1)
    x = x + visual.positional_embedding.to(x.dtype)
    x = visual.ln_pre(x)
    x = visual.transformer(x)
    x = x[:, 1:, :]  # w/o cls token
    x = visual.ln_post(x)
    return x @ visual.proj


@pytest.mark.parametrize("quick_gelu,suffix", [(True, ".pt"), (False, ".safetensors")], ids=["openai", "open_clip"])
def test_openai_layout_teacher_targets_are_eva01s(tmp_path, quick_gelu, suffix):
    model = _open_clip_vit(quick_gelu)
    path = tmp_path / f"clip{suffix}"
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert "visual.conv1.weight" in sd and "visual.transformer.resblocks.0.attn.in_proj_weight" in sd
    if suffix == ".pt":
        torch.save(sd, path)
    else:
        from safetensors.torch import save_file

        save_file(sd, str(path))
    teacher = load_teacher(path, openai_act="quick_gelu" if quick_gelu else "gelu")
    assert isinstance(teacher, MIMTeacher) and teacher.feature_dim == 48
    assert (teacher.image_size, teacher.grid) == (32, 4)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = _eva01_targets(model.visual, x)
    torch.testing.assert_close(teacher(x), want, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in teacher.parameters())
    # the other activation gives other targets: the option is not a no-op
    other = load_teacher(path, openai_act="gelu" if quick_gelu else "quick_gelu")
    assert not torch.allclose(other(x), want, atol=1e-4)


def test_openai_layout_teacher_errors_are_one_line(tmp_path):
    model = _open_clip_vit()
    sd = model.state_dict()
    torch.save(sd, tmp_path / "clip.pt")
    with pytest.raises(CheckpointError, match="architecture is read off"):
        load_teacher(tmp_path / "clip.pt", "EVA02-CLIP-tiny")
    sd = dict(sd, **{"visual.attn_pool.weight": torch.zeros(3)})  # an open_clip option this tower does not implement
    torch.save(sd, tmp_path / "pool.pt")
    with pytest.raises(CheckpointError, match="attn_pool"):
        load_teacher(tmp_path / "pool.pt")
    from evaclip.models import create_model

    with pytest.raises(CheckpointError, match="OpenAI-layout ViT.*MIM teacher"):
        create_model("EVA02-CLIP-tiny", image_init=str(tmp_path / "clip.pt"), attn_backend="sdpa")


def test_mim_run_on_the_digits_from_an_openai_layout_teacher(tmp_path, digits):
    """task=mim with an OpenAI-layout teacher file: the run trains (loss falls) and its student initialises a CLIP."""
    from evaclip.train import main as train

    model = _open_clip_vit()
    torch.save(model.state_dict(), tmp_path / "openai.pt")
    cfg = load_config("demo_mim_cpu", [
        f"mim.teacher={tmp_path / 'openai.pt'}", "model.name=EVA02-CLIP-tiny", f"data.train={digits['train']}",
        "data.batch_size=8", "data.workers=1", "data.shuffle_buffer=64", f"output_dir={tmp_path}", "name=mim",
        "max_steps=12", "optim.warmup_steps=2", "log.every=1", "log.tensorboard=false", f"mim.val={digits['zeroshot']}",
        "mim.val_mask=alternating", "eval.every=12", "eval.batch_size=64", "ckpt.every=12"])
    result = train(cfg)
    assert result.status == "finished" and result.step == 12
    import json

    recs = [json.loads(line) for line in (tmp_path / "mim" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in recs if "train/loss" in r]
    assert len(losses) == 12 and losses[-1] < losses[0]
    assert any("eval/val_loss" in r for r in recs)
    from evaclip.models import create_model

    clip = create_model("EVA02-CLIP-tiny", image_init=str(tmp_path / "mim"), attn_backend="sdpa")
    assert clip.visual.head.weight.abs().max() < 1e-3  # EVA-CLIP's head init on a MIM tower


def test_eva01_g14_mim_recipe_loads_and_validates(tmp_path):
    from evaclip.tasks.mim import MIMTask

    torch.save(_open_clip_vit().state_dict(), tmp_path / "ViT-L-14.pt")
    cfg = load_config("eva01_mim_g14", [f"mim.teacher={tmp_path / 'ViT-L-14.pt'}", f"data.train={tmp_path}"])
    MIMTask.check(cfg)
    m = cfg.mim
    assert (cfg.task, cfg.model.name, m.init, m.init_std, m.num_masked, m.teacher_model) == (
        "mim", "EVA01-CLIP-g-14", "eva01", 0.015, 105, None)
    assert (cfg.optim.lr, cfg.optim.betas, cfg.optim.eps, cfg.optim.weight_decay, cfg.optim.grad_clip_norm) == (
        1e-3, [0.9, 0.98], 1e-6, 0.05, 3.0)
    assert (cfg.global_batch, cfg.epochs, cfg.model.overrides["vision"]["drop_path"]) == (4096, 150, 0.1)
    assert cfg.optim.lr * cfg.optim.min_lr_ratio == pytest.approx(1e-5)  # run_eva_pretraining.py --min_lr
