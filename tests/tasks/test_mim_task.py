"""The ``mim`` task: its config section, checks, model / teacher building, the step (exact accumulation and data
parallelism with uneven mask counts, the teacher on the unmasked image), the monitors, and a run through the engine.
Tiny towers, CPU, fp32."""
from __future__ import annotations

import contextlib
import json

import pytest
import torch

from evaclip.distributed import DistEnv
from evaclip.errors import ConfigError
from evaclip.models import create_model
from evaclip.models.mim import MIMStudent, build_student
from evaclip.tasks.mim import MIMCfg, MIMTask

MODEL = "EVA02-CLIP-tiny"


def _cfg(tmp_path, teacher, *overrides, **mim):
    """A validated TrainCfg (task=mim) for the tiny student; ``mim`` sets fields of the ``mim`` section."""
    from evaclip.config import load_config

    base = ["task=mim", f"mim.teacher={teacher}", f"mim.teacher_model={MODEL}", "data.batch_size=4", "max_steps=4",
            "device=cpu", f"output_dir={tmp_path}", "name=mim", "log.every=1", "log.tensorboard=false",
            "optim.name=adamw", "optim.lr=1e-3", "optim.warmup_steps=1", "model.token_drop=0.0",
            "eval.batch_size=4", "eval.workers=0", f"model.name={MODEL}", "model.attn_backend=sdpa",
            "data.synthetic=true", "precision=fp32"]
    cfg = load_config(None, base + list(overrides))
    for k, v in mim.items():
        setattr(cfg.mim, k, v)
    return cfg


def _task(cfg, rank=0, world=1) -> MIMTask:
    return MIMTask(cfg, DistEnv(rank=rank, local_rank=rank, world_size=world, device=torch.device("cpu")))


def _ctx():
    from evaclip.engine.step import step_context

    return step_context(contextlib.nullcontext, None, torch.device("cpu"))


def _batch(n, seed, ratios=(0.2, 0.6)):
    """n images and masks whose per-image masked counts differ (ratios cycle)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=g)
    masks = torch.zeros(n, 16, dtype=torch.bool)
    for i in range(n):
        k = max(1, round(16 * ratios[i % len(ratios)]))
        masks[i, torch.randperm(16, generator=g)[:k]] = True
    return images, masks


# ----------------------------------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------------------------------
def test_mim_cfg_is_an_omegaconf_structured_config():
    from omegaconf import OmegaConf
    from omegaconf.errors import ValidationError

    conf = OmegaConf.merge(OmegaConf.structured(MIMCfg), {"mask_ratio": 0.5, "block_aspect": [0.5, 2],
                                                          "teacher": "t.pt", "target_resize": "area"})
    obj = OmegaConf.to_object(conf)
    assert isinstance(obj, MIMCfg) and obj.block_aspect == [0.5, 2.0] and obj.teacher == "t.pt"
    assert MIMCfg().mask_ratio == 0.4 and MIMCfg().min_block_patches == 16 and MIMCfg().mask_tries == 10
    assert MIMCfg().block_aspect == pytest.approx([0.3, 1 / 0.3]) and MIMCfg().crop_scale == [0.2, 1.0]
    with pytest.raises(ValidationError):
        OmegaConf.merge(OmegaConf.structured(MIMCfg), {"target_resize": "nearest"})
    with pytest.raises(ValidationError):
        OmegaConf.merge(OmegaConf.structured(MIMCfg), {"mask_ratio": "lots"})


@pytest.mark.parametrize("override,key", [
    ("mim.mask_ratio=1.0", "mim.mask_ratio"), ("mim.block_aspect=[2.0,0.5]", "mim.block_aspect"),
    ("mim.crop_scale=[0.2,1.5]", "mim.crop_scale"), ("mim.mask_tries=0", "mim.mask_tries"),
    ("mim.patch_embed_grad_scale=2.0", "mim.patch_embed_grad_scale"), ("mim.knn_train=x", "mim.knn_train"),
    ("model.token_drop=0.5", "model.token_drop"), ("model.image_init=x", "model.image_init"),
    ("eval.zeroshot=x", "eval.zeroshot"), ("loss.name=siglip", "loss"), ("mim.init_std=0", "mim.init_std"),
])
def test_the_schema_names_the_key_before_any_run(tmp_path, teacher_file, override, key):
    """Ranges and what MIM refuses are the schema's rules: load_config (so `evaclip config`) reports them."""
    with pytest.raises(ConfigError, match=f"^config keys? '{key}'".replace(".", r"\.")):
        _cfg(tmp_path, teacher_file, override)


@pytest.mark.parametrize("override,key", [
    ("mim.teacher=null", "mim.teacher"), ("mim.teacher=/nonexistent.pt", "mim.teacher"),
    ("mim.teacher_model=nope", "mim.teacher_model"), ("mim.val=/nonexistent", "mim.val"),
    ("mim.num_masked=16", "mim.num_masked"),  # the 4 x 4 grid's all
])
def test_check_names_the_key(tmp_path, teacher_file, override, key):
    cfg = _cfg(tmp_path, teacher_file, override)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        MIMTask.check(cfg)


# ----------------------------------------------------------------------------------------------------------------------
# building and the step
# ----------------------------------------------------------------------------------------------------------------------
def test_build_model_teacher_and_optimizer(tmp_path, teacher_file):
    from evaclip.optim import build_optimizer

    cfg = _cfg(tmp_path, teacher_file, "model.overrides.vision.drop_path=0.1", init="beit")
    MIMTask.check(cfg)
    task = _task(cfg)
    torch.manual_seed(3)
    student = task.build_model()
    assert isinstance(student, MIMStudent) and student.target_dim == 32 and student.cfg.drop_path == 0.1
    torch.manual_seed(3)  # loading the teacher did not move the RNG: the same init as a student built alone
    alone = build_student(MODEL, 32, attn_backend="sdpa", init="beit", **{"vision.drop_path": 0.1})
    for (n, a), b in zip(student.state_dict().items(), alone.state_dict().values()):
        assert torch.equal(a, b), n
    task.setup(student)
    assert not task.teacher.training and not any(p.requires_grad for p in task.teacher.parameters())
    opt = build_optimizer(student, cfg.optim)
    assert {p for g in opt.param_groups for p in g["params"]} == set(student.parameters())


def test_accumulation_is_exact_and_the_teacher_sees_the_unmasked_image(tmp_path, teacher_file):
    """Two micro-batches with different mask counts == one batch of both: the mean over every masked patch."""
    cfg = _cfg(tmp_path, teacher_file)
    task = _task(cfg)
    torch.manual_seed(0)
    student = task.build_model().eval()  # no drop path: compare gradients exactly
    task.setup(student)
    seen = []
    forward_features = task.teacher.tower.forward_features
    task.teacher.tower.forward_features = lambda x, *a: seen.append(x) or forward_features(x, *a)
    images, masks = _batch(4, 0, ratios=(0.1, 0.1, 0.7, 0.7))
    micro = [task.to_device((images[:2], masks[:2])), task.to_device((images[2:], masks[2:]))]
    out = task.forward_backward(student, micro, _ctx())
    assert all(torch.equal(s, x) for s, (x, _) in zip(seen, micro))  # the full, unmasked view
    grads = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    one = task.forward_backward(student, [(images, masks)], _ctx())
    torch.testing.assert_close(out["loss"], one["loss"])
    for n, p in student.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, msg=n)
    assert float(one["masked_frac"]) == pytest.approx(float(masks.float().mean()))
    # and the loss is the plain mean negative cosine over the masked patches
    from evaclip.losses import mim_cosine_loss

    with torch.no_grad():
        ref = mim_cosine_loss(student(images, masks), task.teacher(images), masks)
    torch.testing.assert_close(one["loss"], ref)


def _two_rank_worker(rank, world, init_file, teacher, out_dir, strategy, teacher_shard):
    import gc

    import torch.distributed as dist

    from evaclip.parallel import wrap_model

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        cfg = _cfg(out_dir, teacher, f"dist.strategy={strategy}", teacher_shard=teacher_shard)
        task = _task(cfg, rank, world)
        torch.manual_seed(0)
        student = task.build_model().eval()
        task.setup(student)
        model = wrap_model(student, cfg.dist, torch.device("cpu"), precision=cfg.precision)  # DDP, or FSDP2 in place
        assert hasattr(student.lm_head.weight, "full_tensor") == (strategy == "fsdp")  # sharded: DTensor parameters
        images, masks = _batch(4, 0, ratios=(0.1, 0.1, 0.7, 0.7))  # rank 0 gets few masked patches, rank 1 many
        out = task.forward_backward(model, [(images[2 * rank:2 * rank + 2], masks[2 * rank:2 * rank + 2])], _ctx())
        loss = out["loss"].clone()
        dist.all_reduce(loss)
        # FSDP2 gradients are DTensor shards: every rank takes part in gathering them
        grads = {n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                 for n, p in student.named_parameters()}
        if rank == 0:
            torch.save({"loss": loss / world, "grads": grads}, f"{out_dir}/ranks.pt")
        del model, student, task
        gc.collect()  # free FSDP2 / DTensor cycles while the group lives
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("strategy,teacher_shard", [("ddp", False), ("ddp", True), ("fsdp", False), ("fsdp", True)],
                         ids=["teacher-replica", "teacher-fsdp", "student-fsdp", "student-fsdp-teacher-fsdp"])
def test_two_gloo_processes_match_one_process(tmp_path, teacher_file, strategy, teacher_shard):
    """The student DDP-wrapped or FSDP2-sharded (dist.strategy) on 2 gloo ranks (uneven mask counts) == 1 process on
    the concatenated batch, loss and every gradient; the teacher replicated or FSDP2-sharded."""
    import torch.multiprocessing as mp

    mp.start_processes(_two_rank_worker, args=(2, str(tmp_path / "init"), teacher_file, str(tmp_path), strategy,
                                               teacher_shard), nprocs=2, start_method="fork")
    got = torch.load(tmp_path / "ranks.pt", weights_only=True)
    task = _task(_cfg(tmp_path, teacher_file))
    torch.manual_seed(0)
    student = task.build_model().eval()
    task.setup(student)
    one = task.forward_backward(student, [_batch(4, 0, ratios=(0.1, 0.1, 0.7, 0.7))], _ctx())
    torch.testing.assert_close(got["loss"], one["loss"])
    assert set(got["grads"]) == {n for n, _ in student.named_parameters()}
    for n, p in student.named_parameters():
        torch.testing.assert_close(got["grads"][n], p.grad, msg=n)


def test_synthetic_data_resumes_and_masks_follow_the_settings(tmp_path, teacher_file):
    cfg = _cfg(tmp_path, teacher_file, mask_ratio=0.5)
    task = _task(cfg)
    data = task.build_data(steps_hint=3)
    assert data.num_batches == 3
    batches = list(data.loader)
    assert len(batches) == 3
    images, masks = batches[0]
    assert images.shape == (4, 3, 32, 32) and masks.shape == (4, 16) and masks.dtype == torch.bool
    assert int(masks.sum(1).max()) <= 8 and int(masks.sum(1).min()) >= 1
    data.set_epoch(0, 1)
    again = list(data.loader)
    assert len(again) == 2 and all(torch.equal(a, b) for x, y in zip(again, batches[1:]) for a, b in zip(x, y))
    data.set_epoch(1)
    assert not torch.equal(next(iter(data.loader))[0], images)


# ----------------------------------------------------------------------------------------------------------------------
# monitors and the engine
# ----------------------------------------------------------------------------------------------------------------------
def test_evaluate_fixed_mask_val_loss_and_knn(tmp_path, teacher_file, labelled_folder):
    from evaclip.evals.data import build_eval_loader
    from evaclip.evals.knn import resolve_labelled
    from evaclip.losses import mim_cosine_loss

    cfg = _cfg(tmp_path, teacher_file, val=labelled_folder, knn_train=labelled_folder, knn_val=labelled_folder,
               knn_k=3)
    MIMTask.check(cfg)
    task = _task(cfg)
    student = task.build_model()
    task.setup(student)
    first, second = task.evaluate(student, 0), task.evaluate(student, 0)
    assert first == second  # fixed masks: the same number every time
    assert set(first) >= {"val_loss", "knn/top1"} and 0.0 <= first["knn/top1"] <= 1.0
    assert first["knn/num_train"] == first["knn/num_val"] == 8
    # by hand: all 8 images in one batch, sample i's fixed mask
    loader = build_eval_loader(resolve_labelled(labelled_folder), task._eval_preprocess(), 8, 0)
    idx, images, _ = next(iter(loader))
    masks = task.mask_generator().fixed_masks(idx, cfg.mim.val_mask_seed)
    with torch.no_grad():
        ref = mim_cosine_loss(student.eval()(images, masks), task.teacher(images), masks)
    assert first["val_loss"] == pytest.approx(float(ref), rel=1e-5)


def test_alternating_val_mask_is_evas_protocol(tmp_path, teacher_file, labelled_folder):
    """mim.val_mask=alternating: EVA's evaluate_pt (EVA-02/asuka/engine_for_pretraining.py:240-248): mask[:, 0::2] = 1,
    mask[:, 1::2] = 0 over the flattened patches, loss = -CosineSimilarity(outputs.float(), labels.float()).mean()."""
    from evaclip.evals.data import build_eval_loader
    from evaclip.evals.knn import resolve_labelled

    cfg = _cfg(tmp_path, teacher_file, val=labelled_folder, val_mask="alternating")
    MIMTask.check(cfg)
    task = _task(cfg)
    student = task.build_model()
    task.setup(student)
    got = task.evaluate(student, 0)["val_loss"]
    _, images, _ = next(iter(build_eval_loader(resolve_labelled(labelled_folder), task._eval_preprocess(), 8, 0)))
    mask = torch.zeros(8, 16)  # EVA builds it from clip_features[:, :, 0]: one entry per patch
    mask[:, 0::2] = 1
    mask[:, 1::2] = 0
    mask = mask.to(torch.bool)
    with torch.no_grad():
        labels = task.teacher(images)[mask]
        outputs = student.eval()(images, mask)
    ref = -torch.nn.CosineSimilarity(dim=-1)(outputs.float(), labels.float()).mean()
    assert got == pytest.approx(float(ref), rel=1e-5)
    block = _task(_cfg(tmp_path, teacher_file, val=labelled_folder))
    block.teacher = task.teacher
    assert block.evaluate(student, 0)["val_loss"] != pytest.approx(got, rel=1e-3)  # the default is the block masks


def test_mask_target_is_logged(tmp_path, teacher_file, caplog):
    import logging

    task = _task(_cfg(tmp_path, teacher_file, num_masked=6))
    with caplog.at_level(logging.INFO, logger="evaclip"):
        task.build_data(2)
    assert "masks: 6 of 16 patches per image (37.5 %, from mim.num_masked)" in caplog.text


def test_a_student_at_another_resolution_than_its_teacher_is_logged(tmp_path, teacher_file, caplog):
    """The tiny teacher sees 32 px (4 x 4 patches); a 64 px student (8 x 8) trains on resized teacher targets."""
    import logging

    with caplog.at_level(logging.INFO, logger="evaclip"):
        _task(_cfg(tmp_path, teacher_file, "model.overrides.vision.image_size=64")).build_model()
    assert ("teacher 32 px (4x4 patches), student 64 px (8x8): each batch is resized to 32 px for the teacher and its "
            "targets to the student's 8x8 grid (mim.target_resize=bilinear)") in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="evaclip"):
        _task(_cfg(tmp_path, teacher_file)).build_model()
    assert "differ in resolution" not in caplog.text


def test_engine_runs_mim_and_its_checkpoint_initialises_a_clip(tmp_path, teacher_file, labelled_folder):
    from evaclip.engine import train
    from evaclip.models.convert import load_pretrained
    from evaclip.runs import load_student

    cfg = _cfg(tmp_path, teacher_file, "accum_freq=2", "eval.every=2", knn_train=labelled_folder,
               knn_val=labelled_folder, knn_k=3, val=labelled_folder)
    result = train(cfg, MIMTask)
    assert result.status == "finished" and result.step == 4
    recs = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in recs if "train/loss" in r]
    assert len(losses) == 4 and all(-1.0 <= v <= 1.0 for v in losses)
    assert any("eval/knn/top1" in r for r in recs) and any("eval/val_loss" in r for r in recs)
    student = load_student(result.run_dir)  # the architecture from the checkpoint's config.yaml
    assert student.target_dim == 32
    from evaclip.export import export

    exported = export(str(result.run_dir), str(tmp_path / "export"), "eva_mim")
    x, mask = _batch(2, 1)
    torch.testing.assert_close(load_student(exported[0], MODEL)(x, mask), student.eval()(x, mask))
    clip = create_model(MODEL, attn_backend="sdpa")
    report = load_pretrained(clip, image_init=str(result.run_dir))
    assert report.formats["image_init"] == "eva_mim"
    assert sorted(report.ignored) == ["lm_head.bias", "lm_head.weight", "mask_token"]
