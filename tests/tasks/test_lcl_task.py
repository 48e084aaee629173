"""The ``lcl`` task (``evaclip.tasks.lcl``): its config section and one-line errors, the image-token count it gives
the loader, a step through the task's ``forward_backward`` on a hand-built ``DocBatch``, the logit-scale clamp, and
(slow) a run through the engine on the digits' pairs and documents with every monitor, then ``evaclip eval`` and
``evaclip export`` of that run. Tiny towers, CPU, fp32."""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

from evaclip.distributed import DistEnv
from evaclip.errors import ConfigError
from evaclip.models.lcl_tokens import LCLTokens
from evaclip.tasks.lcl import LCLTask

TOK = LCLTokens()
MODEL = "EVA02-CLIP-tiny"


def _cfg(tmp_path, *overrides):
    from evaclip.config import load_config

    base = ["task=lcl", f"model.name={MODEL}", "model.attn_backend=sdpa", "data.train=pairs-{0..1}.tar",
            "lcl_data.context_length=48", "data.batch_size=2", "max_steps=2", "device=cpu", f"output_dir={tmp_path}",
            "optim.warmup_steps=0", "precision=fp32"]
    return load_config(None, base + list(overrides))


def _task(cfg) -> LCLTask:
    return LCLTask(cfg, DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu")))


@pytest.mark.parametrize("override, message", [
    ("lcl.contrastive_weight=-1", r"^config key 'lcl.contrastive_weight' must be >= 0"),
    ("model.image_init=x.pt", r"^config key 'model.image_init' does not apply to task=lcl"),
    ("model.token_drop_until=5", r"^config key 'model.token_drop_until' must be null for task=lcl"),
    ("accum_freq=2", r"^config key 'accum_freq' must be 1 for task=lcl"),
    ("loss.name=siglip", r"^config key 'loss': a section of task clip, not of task=lcl"),
    ("lcl.knn_train=a", r"^config keys 'lcl.knn_train' and 'lcl.knn_val' go together"),
    ("lcl.generation_wieght=1", r"^config key 'lcl.generation_wieght'.*did you mean 'generation_weight'"),
])
def test_config_errors_are_one_line_naming_the_key(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(tmp_path, override)


def test_check_names_missing_files_and_a_context_too_short(tmp_path):
    with pytest.raises(ConfigError, match=r"^config key 'lcl.text_init': not found"):
        LCLTask.check(_cfg(tmp_path, f"lcl.text_init={tmp_path}/none.pt"))
    with pytest.raises(ConfigError, match=r"^config key 'lcl_data.context_length' \(20\) leaves no room"):
        LCLTask.check(_cfg(tmp_path, "lcl_data.context_length=20"))  # 16 latents + boi/eoi + sot/eot + text
    with pytest.raises(ConfigError, match=r"^config key 'lcl_data.docs': LCL needs pairs"):
        LCLTask.check(_cfg(tmp_path, "data.train=null"))
    assert LCLTask.image_tokens(_cfg(tmp_path)) == 16
    assert LCLTask.image_tokens(_cfg(tmp_path, "model.token_drop=0.5")) == 8


def _doc_batch(K, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = [[TOK.sot, 320, TOK.boi] + [TOK.image] * K + [TOK.eoi, 321, TOK.boi] + [TOK.image] * K + [TOK.eoi, TOK.eot],
            [TOK.boi] + [TOK.image] * K + [TOK.eoi, 400, 0, TOK.eot]]
    tokens = torch.full((2, 48), TOK.pad)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = torch.tensor(r)
    return torch.randn(3, 3, 32, 32, generator=g), tokens


def test_step_trims_rows_logs_the_terms_and_clamps_the_scale(tmp_path):
    from evaclip.engine.step import step_context

    task = _task(_cfg(tmp_path))
    torch.manual_seed(0)
    model = task.build_model()
    images, tokens = task.to_device(_doc_batch(16))
    assert tokens.shape == (2, 40)  # 38 used positions, rounded up to 8
    out = task.forward_backward(model, [(images, tokens)], step_context(contextlib.nullcontext, None,
                                                                        torch.device("cpu")))
    # row 0 holds 2 pairs; the image-first row 1 none (its boi is at position 0: no text before it)
    assert out["pairs"].item() == 2
    assert out["loss"].item() == pytest.approx(out["generation"].item() + 0.1 * out["contrastive"].item(), rel=1e-6)
    assert all(p.grad is not None for p in model.parameters())
    with torch.no_grad():
        model.logit_scale.fill_(7.0)
    task.after_update(model)
    assert model.logit_scale.item() == pytest.approx(math.log(100))
