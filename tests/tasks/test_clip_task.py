"""The ``clip`` task: its cached-feature step (accumulating k micro-batches of B equals one batch of k*B, the token-drop
mask replayed) and a locked image tower. Tiny model (EVA02-CLIP-tiny), CPU, fp32."""
from __future__ import annotations

import copy

import pytest
import torch

from evaclip.engine.step import step_context
from evaclip.losses import ClipLoss
from evaclip.models import create_model, get_model_config
from evaclip.tasks.clip import contrastive_forward_backward
from evaclip.train import main

MODEL = "EVA02-CLIP-tiny"


def forward_backward(model, loss_fn, micro, autocast):
    return contrastive_forward_backward(model, loss_fn, micro, step_context(autocast, None, torch.device("cpu")))


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


def test_locked_image_tower_does_not_move(run_cfg):
    result = main(run_cfg("optim.lr=1e-3", "optim.lock_image=true", "max_steps=2", "ckpt.every=1", "ckpt.keep_last=3"))
    first = torch.load(result.run_dir / "ckpt" / "step_00000001" / "model.pt", weights_only=True)
    last = torch.load(result.checkpoint / "model.pt", weights_only=True)
    visual = [k for k in first if k.startswith("visual.")]
    text = [k for k in first if k.startswith("text.") and first[k].is_floating_point()]
    assert visual and all(torch.equal(first[k], last[k]) for k in visual)
    assert any(not torch.equal(first[k], last[k]) for k in text)
