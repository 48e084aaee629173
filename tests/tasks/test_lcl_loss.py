"""LCL's loss (``evaclip.losses.LCLLoss``): the values LCL's published code computes on fixed inputs, a hand-written
reference, 2 gloo processes equal to 1 process on the concatenated batch with uneven pair counts per rank (one rank
with no pair: no NaN), and contrastive weight 0 under DDP and FSDP2 (every parameter still gets a gradient).

References: the values LCL's published ``src/open_clip/loss.py`` computes on fixed inputs (``LCL_PUBLISHED``), and
its maths written out: LCL's ``src/open_clip/loss.py`` (``LCLLoss.get_logits`` / ``forward``): per pair i of this rank,
(CE(i -> all texts) + CE(text i -> all images)) / 2, padded columns excluded; generation = CE over the kept targets;
loss = 1.0 x generation + 0.1 x contrastive. Shapes: n pairs, E dim, T targets, V vocabulary.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from gloo_ranks import run_gloo
from torch import nn

from evaclip.losses import LCLLoss

E, V, D_IN = 4, 7, 6


def _reference(img, txt, logits, labels, scale, gw=1.0, cw=0.1):
    """The loss with plain Python loops: log-sum-exp per row, over the pairs / targets of the whole batch."""
    n = img.shape[0]
    sim = [[float(img[i] @ txt[j]) * scale for j in range(n)] for i in range(n)]

    def ce(row, target):
        m = max(row)
        return -(row[target] - m - math.log(sum(math.exp(v - m) for v in row)))

    con = sum(0.5 * (ce(sim[i], i) + ce([sim[j][i] for j in range(n)], i)) for i in range(n)) / n
    gen = sum(ce([float(v) for v in logits[t]], int(labels[t])) for t in range(len(labels))) / len(labels)
    return gw * gen + cw * con, gen, con


def _fixed_inputs():
    img = F.normalize(torch.tensor([[1.0, 0.0, 0.5, 0.0], [0.2, 1.0, 0.0, 0.3], [0.0, -0.4, 1.0, 0.1]]), dim=-1)
    txt = F.normalize(torch.tensor([[0.9, 0.1, 0.4, 0.0], [0.0, 1.0, 0.2, 0.5], [0.3, 0.0, 0.8, -0.2]]), dim=-1)
    logits = torch.tensor([[0.5, -1.0, 2.0, 0.0, 0.1, 0.3, -0.2], [1.5, 0.2, -0.3, 0.7, 0.0, -1.0, 0.4]])
    labels = torch.tensor([2, 6])
    return img, txt, logits, labels, torch.tensor(10.0)


def test_matches_hand_written_reference():
    img, txt, logits, labels, scale = _fixed_inputs()
    out = LCLLoss()(img, txt, logits, labels, scale)
    ref, gen, con = _reference(img, txt, logits, labels, 10.0)
    assert out["loss"].item() == pytest.approx(ref, rel=1e-6)
    assert out["generation"].item() == pytest.approx(gen, rel=1e-6)
    assert out["contrastive"].item() == pytest.approx(con, rel=1e-6)
    # the weights are the configured ones
    w = LCLLoss(generation_weight=0.5, contrastive_weight=2.0)(img, txt, logits, labels, scale)
    assert w["loss"].item() == pytest.approx(_reference(img, txt, logits, labels, 10.0, 0.5, 2.0)[0], rel=1e-6)


# What LCL's published loss computes on ``_fixed_inputs``: OpenGVLab/LCL at b1b8e083fc48580438c6a60981590fdb08cc1a25,
# src/open_clip/loss.py loaded by path (it needs torch only), one process (no process group), run as
#   LCLLoss(generation_loss_weight=gw, contrastive_loss_weight=cw, pad_id=-100, local_loss=True)(
#       img, txt, logits, labels, torch.tensor(10.0))  ->  (weighted contrastive, weighted generation)
# (pad_id=-100: these targets are all kept, as evaclip's are; LCL's default 0 would drop the BPE token "!").
LCL_PUBLISHED = {(1.0, 0.1): (0.0060335793532431126, 1.3211153745651245),
                 (0.5, 2.0): (0.1206715852022171, 0.6605576872825623)}


@pytest.mark.parametrize("weights", sorted(LCL_PUBLISHED))
def test_matches_lcl_published_loss_on_fixed_inputs(weights):
    gw, cw = weights
    con, gen = LCL_PUBLISHED[weights]
    out = LCLLoss(generation_weight=gw, contrastive_weight=cw)(*_fixed_inputs())
    assert out["loss"].item() == pytest.approx(con + gen, rel=1e-6)
    assert gw * out["generation"].item() == pytest.approx(gen, rel=1e-6)
    assert cw * out["contrastive"].item() == pytest.approx(con, rel=1e-6)


def test_no_pair_gives_generation_only_and_no_nan():
    _, _, logits, labels, scale = _fixed_inputs()
    scale = scale.clone().requires_grad_()
    out = LCLLoss()(torch.zeros(0, E), torch.zeros(0, E), logits, labels, scale)
    assert torch.isfinite(out["loss"]) and out["contrastive"].item() == 0.0
    out["loss"].backward()
    assert scale.grad is not None and scale.grad.item() == 0.0  # the graph still reaches the temperature


def test_bad_shapes_are_one_line_errors():
    img, txt, logits, labels, scale = _fixed_inputs()
    with pytest.raises(ValueError, match="same shape"):
        LCLLoss()(img, txt[:2], logits, labels, scale)
    with pytest.raises(ValueError, match="logits T x V"):
        LCLLoss()(img, txt, logits, labels[:1], scale)


# ---------------------------------------------------------------------------------------------------------------
# 2 gloo processes == 1 process on the concatenated batch, uneven pair and target counts per rank
# ---------------------------------------------------------------------------------------------------------------
WORLD = 2
# (pairs, targets) per rank: uneven, and one case where rank 1 has no pair at all
SPLITS = {"uneven": ((3, 5), (1, 2)), "rank_without_pair": ((4, 3), (0, 4))}


class _Tiny(nn.Module):
    """Linear image / text features and a linear LM head: stands in for the towers, shared by every rank."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.img, self.txt, self.head = nn.Linear(D_IN, E), nn.Linear(D_IN, E), nn.Linear(D_IN, V)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x_img, x_txt, x_tok, labels, loss_fn):
        return loss_fn(F.normalize(self.img(x_img), dim=-1), F.normalize(self.txt(x_txt), dim=-1),
                       self.head(x_tok), labels, self.logit_scale.exp())


def _data(split):
    g = torch.Generator().manual_seed(1)
    n, t = sum(s[0] for s in split), sum(s[1] for s in split)
    return (torch.randn(n, D_IN, generator=g), torch.randn(n, D_IN, generator=g), torch.randn(t, D_IN, generator=g),
            torch.randint(0, V, (t,), generator=g))


def _rank_slice(split, rank):
    p0, t0 = sum(s[0] for s in split[:rank]), sum(s[1] for s in split[:rank])
    return slice(p0, p0 + split[rank][0]), slice(t0, t0 + split[rank][1])


def _loss_and_grads(x_img, x_txt, x_tok, labels):
    model = _Tiny()
    out = model(x_img, x_txt, x_tok, labels, LCLLoss())
    out["loss"].backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


def _worker(rank: int) -> dict:
    import torch.distributed as dist

    results = {}
    for name, split in SPLITS.items():
        x_img, x_txt, x_tok, labels = _data(split)
        ps, ts = _rank_slice(split, rank)
        out, grads = _loss_and_grads(x_img[ps], x_txt[ps], x_tok[ts], labels[ts])
        loss = out["loss"].detach().clone()
        dist.all_reduce(loss)
        for g in grads.values():  # DDP: gradients averaged over ranks
            dist.all_reduce(g)
            g /= WORLD
        results[name] = dict(loss=loss / WORLD, global_loss=out["global_loss"], pairs=out["pairs"], grads=grads)
    return results


def test_two_gloo_processes_match_one_process_with_uneven_pairs(tmp_path):
    ranks = run_gloo(_worker, tmp_path, WORLD)
    for name, split in SPLITS.items():
        ref, ref_grads = _loss_and_grads(*_data(split))
        for r, res in enumerate(ranks):
            got = res[name]
            assert torch.isfinite(got["loss"]), f"{name} rank {r}: non-finite loss"
            torch.testing.assert_close(got["loss"], ref["loss"].detach(), msg=f"{name} rank {r}: mean of rank losses")
            torch.testing.assert_close(got["global_loss"], ref["global_loss"], msg=f"{name} rank {r}: logged loss")
            assert got["pairs"].item() == sum(s[0] for s in split)
            for pname, g in ref_grads.items():
                torch.testing.assert_close(got["grads"][pname], g, rtol=1e-5, atol=1e-6,
                                           msg=f"{name} rank {r}: grad of {pname}")
