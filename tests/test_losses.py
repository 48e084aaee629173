"""Contrastive losses on one process: values against open_clip's losses, accuracies, bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss as OpenClipLoss
from open_clip.loss import SigLipLoss as OpenSigLipLoss

from evaclip.losses import ClipLoss, LossCfg, SigLipLoss, build_loss


def _features(B: int = 6, D: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(B, D, generator=g), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(B, D, generator=g), dim=-1).requires_grad_()
    return img, txt


@pytest.mark.parametrize("local_loss", [True, False])
def test_clip_loss_matches_open_clip(local_loss):
    img, txt = _features()
    scale = torch.tensor(14.3, requires_grad=True)
    out = ClipLoss(local_loss=local_loss)(img, txt, scale)
    ref = OpenClipLoss(local_loss=local_loss)(img, txt, scale)
    torch.testing.assert_close(out["loss"], ref)
    grads = torch.autograd.grad(out["loss"], (img, txt, scale))
    ref_grads = torch.autograd.grad(ref, (img, txt, scale))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_siglip_loss_matches_open_clip():
    img, txt = _features()
    scale, bias = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
    out = SigLipLoss()(img, txt, scale, bias)
    ref = OpenSigLipLoss()(img, txt, scale, bias)
    torch.testing.assert_close(out["loss"], ref)
    grads = torch.autograd.grad(out["loss"], (img, txt, scale, bias))
    ref_grads = torch.autograd.grad(ref, (img, txt, scale, bias))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_accuracies():
    img, _ = _features(B=4)
    txt = img.detach().clone()
    txt[[0, 1]] = txt[[1, 0]]  # pairs 0 and 1 swapped: 2 of 4 rows match in both directions
    for loss in (ClipLoss(), SigLipLoss()):
        out = loss(img, txt, torch.tensor(10.0), torch.tensor(0.0))
        assert out["i2t_acc"].item() == pytest.approx(0.5)
        assert out["t2i_acc"].item() == pytest.approx(0.5)
    perfect = ClipLoss()(img, img.detach(), torch.tensor(10.0))
    assert perfect["i2t_acc"].item() == 1.0 and perfect["t2i_acc"].item() == 1.0
    assert ClipLoss()(img, img.detach(), torch.tensor(10.0), output_dict=False).ndim == 0


def test_bad_input_is_a_clear_error():
    img, txt = _features()
    with pytest.raises(ValueError, match="same shape"):
        ClipLoss()(img, txt[:3], torch.tensor(1.0))
    with pytest.raises(ValueError, match="logit_scale must be a scalar"):
        ClipLoss()(img, txt, torch.ones(2))
    with pytest.raises(ValueError, match="logit_bias"):
        SigLipLoss()(img, txt, torch.tensor(1.0))
    with pytest.raises(ValueError, match="gather_with_grad"):
        ClipLoss(local_loss=True, gather_with_grad=False)
    from evaclip.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="loss.name"):  # choices are checked once, by the config
        load_config(None, {"loss.name": "triplet"})
    with pytest.raises(ConfigError, match="loss.gather_with_grad"):
        load_config(None, {"loss.gather_with_grad": "false"})


def test_build_loss():
    assert isinstance(build_loss(LossCfg(name="clip")), ClipLoss)
    assert isinstance(build_loss(LossCfg(name="siglip")), SigLipLoss)
    nonlocal_loss = build_loss(LossCfg(local_loss=False, gather_with_grad=False))
    assert not nonlocal_loss.local_loss and not nonlocal_loss.gather_with_grad
