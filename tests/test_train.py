"""The training loop in one process: gradient accumulation equivalence, NaN/Inf skipping, run folder, precisions,
the token-drop phase switch. Tiny model (EVA02-CLIP-tiny), synthetic data, a few steps each."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from evaclip import checkpoint as ckpt
from evaclip.config import load_config
from evaclip.data.synthetic import SyntheticDataInfo
from evaclip.engine import TrainingStopped
from evaclip.engine.step import step_context
from evaclip.losses import ClipLoss
from evaclip.models import create_model, get_model_config
from evaclip.tasks.clip import ClipTask, contrastive_forward_backward
from evaclip.train import main

MODEL = "EVA02-CLIP-tiny"


def _cfg(tmp_path, *overrides):
    base = [f"model.name={MODEL}", "data.synthetic=true", "data.batch_size=4", "max_steps=6", "device=cpu",
            f"output_dir={tmp_path}", "name=run", "log.every=1", "log.tensorboard=false", "optim.warmup_steps=1",
            "optim.lr=1e-3", "model.token_drop=0.0", "eval.zeroshot=null"]
    return load_config("demo_cpu", base + list(overrides))


def forward_backward(model, loss_fn, micro, autocast):
    return contrastive_forward_backward(model, loss_fn, micro, step_context(autocast, None, torch.device("cpu")))


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _batch(n, seed=0):
    mc = get_model_config(MODEL)
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, mc.vision.image_size, mc.vision.image_size, generator=g)
    tokens = torch.randint(1, mc.text.vocab_size - 1, (n, mc.text.context_length), generator=g)
    tokens[:, -1] = mc.text.vocab_size - 1  # EOT last: every row pools at the end
    return images, tokens


@pytest.mark.parametrize("k", [3])
def test_grad_accumulation_k_by_b_equals_one_batch_of_kb(k):
    """Cached-feature accumulation of k micro-batches of B == one batch of k*B, every gradient (logit scale too)."""
    torch.manual_seed(0)
    model = create_model(MODEL, attn_backend="eager")
    big = copy.deepcopy(model)
    images, tokens = _batch(4 * k)
    loss_fn = ClipLoss()
    autocast = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    micro = [(images[i * 4:(i + 1) * 4], tokens[i * 4:(i + 1) * 4]) for i in range(k)]
    out_acc = forward_backward(model, loss_fn, micro, autocast)
    out_big = forward_backward(big, loss_fn, [(images, tokens)], autocast)
    torch.testing.assert_close(out_acc["loss"], out_big["loss"], rtol=1e-5, atol=1e-6)
    n = 0
    for (name, p), q in zip(model.named_parameters(), big.parameters()):
        if q.grad is None:
            assert p.grad is None, name
            continue
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
        n += 1
    assert n > 10 and model.logit_scale.grad is not None


def test_grad_accumulation_replays_the_token_drop_mask():
    """With token dropping the recomputed micro-batch uses the same mask as its cached pass: the k*B loss is the one
    the cached features give, and two identical runs give identical gradients."""
    torch.manual_seed(0)
    model = create_model(MODEL, attn_backend="eager", token_drop=0.5)
    twin = copy.deepcopy(model)
    again = copy.deepcopy(model)
    images, tokens = _batch(8)
    micro = [(images[:4], tokens[:4]), (images[4:], tokens[4:])]
    autocast = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    torch.manual_seed(1)
    state = torch.get_rng_state()
    out = forward_backward(model, ClipLoss(), micro, autocast)
    torch.set_rng_state(state)
    with torch.no_grad():  # the cached pass alone, same RNG: the loss must match the live one
        feats = [twin(im, tk) for im, tk in micro]
        ref = ClipLoss()(torch.cat([f.image_features for f in feats]), torch.cat([f.text_features for f in feats]),
                         feats[0].logit_scale)["loss"]
    torch.testing.assert_close(out["loss"], ref, rtol=1e-5, atol=1e-6)
    torch.set_rng_state(state)
    out_again = forward_backward(again, ClipLoss(), micro, autocast)
    assert torch.equal(out_again["loss"], out["loss"])
    grads = [(n, p.grad, q.grad) for (n, p), q in zip(model.named_parameters(), again.parameters())]
    assert sum(g is not None for _, g, _ in grads) > 10
    for name, g, h in grads:
        assert (g is None) == (h is None), name
        assert g is None or torch.equal(g, h), name


class _Poisoned:
    """Synthetic DataInfo whose batches at the given global batch indices hold NaN pixels (a corrupt input)."""

    def __init__(self, inner: SyntheticDataInfo, bad: set[int], per_epoch: int):
        self.inner, self.bad, self.per_epoch = inner, bad, per_epoch
        self.num_batches, self.num_samples = inner.num_batches, inner.num_samples
        self.epoch = self.start = 0

    def set_epoch(self, epoch, start_step=0):
        self.epoch, self.start = epoch, start_step
        self.inner.set_epoch(epoch, start_step)

    @property
    def loader(self):
        def gen():
            for i, (images, tokens) in enumerate(self.inner.loader, start=self.start):
                if self.epoch * self.per_epoch + i in self.bad:
                    images = images.clone()
                    images[0, 0, 0, 0] = float("nan")
                yield images, tokens
        return gen()

    def skipped(self):
        return 0


def _poison(monkeypatch, bad):
    real = ClipTask.build_data

    def build(self, steps_hint):
        inner = real(self, steps_hint)
        return _Poisoned(inner, bad, inner.num_batches)

    monkeypatch.setattr(ClipTask, "build_data", build)


def test_nan_steps_are_skipped_counted_and_the_run_goes_on(tmp_path, monkeypatch):
    _poison(monkeypatch, {2, 3})
    result = main(_cfg(tmp_path, "max_steps=6", "max_bad_steps=3", "ckpt.every=2"))
    assert result.status == "finished" and result.step == 6 and result.bad_steps == 2
    recs = _records(result.run_dir)
    assert [r["step"] for r in recs if r.get("event") == "bad_step"] == [2, 3]
    last = [r for r in recs if "train/loss" in r][-1]
    assert last["train/bad_steps"] == 2 and last["step"] == 6
    # the optimizer stepped only on the 4 good steps; the logged losses of good steps are finite
    state = torch.load(result.checkpoint / "optimizer.pt", weights_only=True)["state"]
    assert {int(s["step"]) for s in state.values()} == {4}
    assert all(r["train/loss"] == r["train/loss"] for r in recs if "train/loss" in r and r["step"] not in (3, 4))


def test_too_many_bad_steps_stop_with_a_clear_message_and_keep_the_last_good_checkpoint(tmp_path, monkeypatch):
    _poison(monkeypatch, set(range(4, 100)))
    with pytest.raises(TrainingStopped, match=r"3 consecutive steps with a non-finite loss.*step_00000004"):
        main(_cfg(tmp_path, "max_steps=12", "max_bad_steps=3", "ckpt.every=2"))
    root = tmp_path / "run" / "ckpt"
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_00000004", "step_00000002"]
    ckpt.verify_checkpoint(root / "step_00000004")


def test_run_folder_has_config_git_metrics_checkpoints_and_token_drop_phase(tmp_path):
    result = main(_cfg(tmp_path, "max_steps=4", "ckpt.every=2", "ckpt.keep_last=5", "log.every=2",
                       "log.tensorboard=true", "accum_freq=2", "model.token_drop=0.5", "model.token_drop_until=3"))
    run = tmp_path / "run"
    assert load_config(run / "config.yaml").accum_freq == 2  # the resolved config reloads as is
    info = json.loads((run / "run_info.json").read_text())
    assert "commit" in info["git"] and info["world_size"] == 1
    assert [p.name for p in ckpt.list_checkpoints(run / "ckpt")] == ["step_00000004", "step_00000002"]
    recs = [r for r in _records(run) if "train/loss" in r]
    assert [r["step"] for r in recs] == [2, 4]
    for key in ("train/loss", "train/samples_per_s", "train/eta_s", "train/logit_scale", "train/lr/visual",
                "train/lr/text", "train/skipped_samples"):
        assert key in recs[-1], key
    assert recs[-1]["train/samples_seen"] == 4 * 2 * 4
    assert any((run / "tensorboard").iterdir())
    assert result.checkpoint == run / "ckpt" / "step_00000004"
    # the unmasked tuning phase starts at model.token_drop_until
    events = [r for r in _records(run) if r.get("event") == "token_drop"]
    assert events == [{"event": "token_drop", "step": 3, "ratio": 0.0}]
    assert result.status == "finished"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_train(tmp_path, precision):
    result = main(_cfg(tmp_path, f"precision={precision}", "max_steps=2", "model.grad_checkpointing=true"))
    recs = [r for r in _records(result.run_dir) if "train/loss" in r]
    assert result.step == 2 and all(r["train/loss"] == r["train/loss"] for r in recs)
    if precision == "fp16":
        assert "train/loss_scale" in recs[-1]


def test_locked_image_tower_does_not_move(tmp_path):
    result = main(_cfg(tmp_path, "optim.lock_image=true", "max_steps=2", "ckpt.every=1", "ckpt.keep_last=3"))
    first = torch.load(result.run_dir / "ckpt" / "step_00000001" / "model.pt", weights_only=True)
    last = torch.load(result.checkpoint / "model.pt", weights_only=True)
    visual = [k for k in first if k.startswith("visual.")]
    text = [k for k in first if k.startswith("text.") and first[k].is_floating_point()]
    assert visual and all(torch.equal(first[k], last[k]) for k in visual)
    assert any(not torch.equal(first[k], last[k]) for k in text)
