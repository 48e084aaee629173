"""The EVA bootstrap's recipes fit together: each ``eva02_clip_*_from_mim`` recipe is the published EVA02-CLIP recipe
with the matching ``eva02_mim_*`` run folder as ``model.image_init``, and that MIM recipe's student loads into the CLIP
recipe's image tower with exactly the documented dropped, resized and fresh keys (the towers cut to one block, so the
test is fast; every other architecture setting is the recipes' own)."""
from __future__ import annotations

import pytest
import torch

from evaclip.config import flat_diff, load_config
from evaclip.engine.run_dir import run_dir_of

PAIRS = {  # MIM recipe -> (the CLIP recipe initialised from its run, the published recipe it follows)
    "eva02_mim_b14": ("eva02_clip_b16_from_mim", "eva02_clip_b16"),
    "eva02_mim_l14": ("eva02_clip_l14_from_mim", "eva02_clip_l14"),
}
ONE_BLOCK = {"vision.depth": 1, "text.layers": 1}


@pytest.mark.parametrize("mim_recipe", sorted(PAIRS))
def test_from_mim_recipe_is_the_published_one_with_the_mim_run_as_image_init(mim_recipe):
    clip_recipe, published = PAIRS[mim_recipe]
    mim, clip = load_config(mim_recipe), load_config(clip_recipe)
    assert mim.task == "mim" and clip.task == "clip"
    assert clip.model.image_init == str(run_dir_of(mim))  # runs/eva02_mim_*: where the MIM recipe writes
    assert flat_diff(clip, load_config(published)) == {
        "model.image_init": (clip.model.image_init, load_config(published).model.image_init),
        "name": (clip_recipe, published)}


@pytest.mark.parametrize("mim_recipe", sorted(PAIRS))
def test_mim_recipe_student_loads_into_the_clip_recipe_image_tower(mim_recipe):
    from evaclip.models import create_model
    from evaclip.models.convert import load_pretrained
    from evaclip.models.mim import build_student

    mim, clip = load_config(mim_recipe), load_config(PAIRS[mim_recipe][0])
    student_overrides = {f"vision.{k}": v for k, v in (mim.model.overrides or {}).get("vision", {}).items()}
    student = build_student(mim.model.name, 64, attn_backend="sdpa", init=mim.mim.init,
                            attn_subln=mim.mim.attn_subln, **student_overrides, **ONE_BLOCK)
    model = create_model(clip.model.name, attn_backend="sdpa", **ONE_BLOCK)
    sd = {k: v.clone() for k, v in student.state_dict().items()}  # what a MIM run's model.pt holds
    report = load_pretrained(model, image_init=sd)
    assert report.formats["image_init"] == "eva_mim"
    assert sorted(report.ignored) == ["lm_head.bias", "lm_head.weight", "mask_token"]
    fresh = [f"visual.{m}.{p}" for m in ("blocks.0.attn.inner_attn_ln", "head") for p in ("bias", "weight")]
    assert sorted(report.fresh) == fresh  # the CLIP head and the attention sub-LN (EVA-02 B / L MIM have none)
    resized = student.cfg.patch_size != model.visual.cfg.patch_size  # B: MIM at patch 14, CLIP at 16 (psz14to16)
    assert sorted(report.adapted) == (["visual.patch_embed.proj.weight", "visual.pos_embed"] if resized else [])
    if not resized:
        for name in ("blocks.0.attn.qkv.weight", "blocks.0.mlp.w12.weight", "norm.weight", "cls_token"):
            assert torch.equal(model.visual.state_dict()[name], sd[name]), name
