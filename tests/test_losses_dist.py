"""2 real gloo processes give the same loss and gradients as 1 process on the concatenated batch.

Each rank runs a tiny shared linear image / text encoder on its half of the batch, backpropagates its loss, then
averages gradients and losses over ranks exactly as DDP would. Shapes: B local batch, G global batch, D dim.
"""
from __future__ import annotations

import os

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from evaclip.losses import ClipLoss, SigLipLoss

WORLD, B, D_IN, D = 2, 4, 6, 5
CASES = {  # name: (loss factory, DDP-averaged grad relative to the 1-process grad)
    "clip_local": (lambda: ClipLoss(local_loss=True, gather_with_grad=True), 1.0),
    "clip_global": (lambda: ClipLoss(local_loss=False, gather_with_grad=True), 1.0),
    # without gradient through the gather only the own slice back-propagates: DDP's average of the tower grads is
    # grad / world (logit_scale enters each rank's full loss directly, so its grad is exact)
    "clip_global_nograd": (lambda: ClipLoss(local_loss=False, gather_with_grad=False), 1.0 / WORLD),
    "siglip": (lambda: SigLipLoss(), 1.0),
}


class TinyTowers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.img = nn.Linear(D_IN, D)
        self.txt = nn.Linear(D_IN, D)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))
        self.logit_bias = nn.Parameter(torch.tensor(-1.0))

    def forward(self, x_img_BI, x_txt_BI):
        return (F.normalize(self.img(x_img_BI), dim=-1), F.normalize(self.txt(x_txt_BI), dim=-1),
                self.logit_scale.exp(), self.logit_bias)


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(WORLD * B, D_IN, generator=g), torch.randn(WORLD * B, D_IN, generator=g)


def _loss_and_grads(loss_fn, x_img, x_txt):
    model = TinyTowers()
    out = loss_fn(*model(x_img, x_txt))
    out["loss"].backward()
    return out["loss"].detach(), {
        n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
    }


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two processes share the cores
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        x_img, x_txt = _batch()
        sl = slice(rank * B, (rank + 1) * B)
        results = {}
        for name, (factory, _) in CASES.items():
            loss, grads = _loss_and_grads(factory(), x_img[sl], x_txt[sl])
            rank_loss = loss.clone()
            dist.all_reduce(loss)
            for g in grads.values():  # DDP: average gradients over ranks
                dist.all_reduce(g)
                g /= WORLD
            results[name] = dict(loss=loss / WORLD, rank_loss=rank_loss, grads=grads)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_match_one_process(tmp_path, free_port):
    # fork: the children reuse this process's imports (spawn re-imports torch in each, seconds on a loaded box)
    mp.start_processes(_worker, args=(free_port, str(tmp_path)), nprocs=WORLD, join=True, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    x_img, x_txt = _batch()
    for name, (factory, grad_ratio) in CASES.items():
        ref_loss, ref_grads = _loss_and_grads(factory(), x_img, x_txt)
        for r, res in enumerate(ranks):
            got = res[name]
            torch.testing.assert_close(got["loss"], ref_loss, msg=f"{name} rank {r}: mean loss")
            if name.startswith("clip_global"):  # the full loss is computed on every rank
                torch.testing.assert_close(got["rank_loss"], ref_loss, msg=f"{name} rank {r}: rank loss")
            for pname, ref in ref_grads.items():
                if name.startswith("clip") and pname == "logit_bias":
                    continue  # ClipLoss has no bias
                ratio = 1.0 if pname.startswith("logit") else grad_ratio
                torch.testing.assert_close(got["grads"][pname], ref * ratio, rtol=1e-5, atol=1e-6,
                                           msg=f"{name} rank {r}: grad of {pname}")
