"""k-NN classification of an image encoder's pooled features: the representation monitor of MIM pre-training.

Shapes: see the legend in docs/ARCHITECTURE.md (B batch, Q val (query) samples, R train (memory bank = reference)
samples, C classes, D feature dim: the encoder's pooled features, a tower's width for a MIM student; lowercase k
is the argument ``k``, the neighbours per query).

Protocol (DINO's, Caron et al. 2021, as EVA / BEiT-style MIM papers report it): features are L2-normalised, a query's
neighbours are the ``k`` memory-bank samples of highest cosine similarity, and the neighbours vote:

- ``vote="weighted"`` (default, DINO): neighbour ``j`` adds ``exp(s_j / temperature)`` to its class (``temperature``
  0.07), so close neighbours count far more than the k-th one;
- ``vote="majority"``: each neighbour adds 1 to its class; a tie between classes goes to the one whose tied
  neighbours have the larger summed similarity.

The predicted class is the highest vote; like zero-shot, a true class tied with another for the top counts as wrong
(``evaclip.evals.zeroshot.target_rank``). ``k`` larger than the memory bank uses the whole bank.

Both sets are labelled sets read by ``evaclip.evals.data`` (anything ``evaclip eval --zeroshot`` reads: clip_benchmark
folders, ImageNet-style folders, ``cls`` shards with a class-name file; a folder of shards with ``classnames.txt``
beside them, as ``make_shards --images-only`` and the demo's ``knn_train`` write, needs no extra argument). Their class
ids must mean the same classes. Under torchrun every rank encodes its share of both sets; the queries are gathered,
each rank finds their top-k in its own share of the memory bank, and the per-rank top-k lists are merged, so the bank
is never copied between ranks.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from evaclip.evals.common import autocast, gather_cat, progress, rank_world
from evaclip.evals.data import EvalSet, build_eval_loader, resolve_zeroshot
from evaclip.evals.zeroshot import _check_complete, classification_metrics, target_rank

log = logging.getLogger(__name__)

VOTES = ("weighted", "majority")


def resolve_labelled(path: str, classnames: Optional[str] = None) -> EvalSet:
    """A labelled image set: whatever ``resolve_zeroshot`` reads (shards with a ``classnames.txt`` beside them use
    that file when ``classnames`` is not given)."""
    return resolve_zeroshot(path, classnames=classnames)


@torch.no_grad()
def encode_labelled(encode_fn: Callable, evset: EvalSet, preprocess: Callable, *, batch_size: int = 64,
                    workers: int = 2, device="cpu", amp: bool = True, show_progress: bool = False, desc: str = "k-NN"
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's share of ``evset``, one row per sample: (features, rows x D, L2-normalised float32 on device;
    labels, on device; idx, the global sample indices)."""
    rank, world = rank_world()
    loader = build_eval_loader(evset, preprocess, batch_size, workers, rank, world)
    feats, labels, idx = [], [], []
    for idx_B, images_BCHW, y_B in progress(loader, desc, show_progress):
        with autocast(device, amp):
            f_BD = encode_fn(images_BCHW.to(device, non_blocking=True))
        if f_BD.dim() != 2 or f_BD.shape[0] != images_BCHW.shape[0]:
            raise ValueError(f"encode_fn must return pooled features (B, D), got shape {tuple(f_BD.shape)}")
        feats.append(F.normalize(f_BD.float(), dim=-1))
        labels.append(y_B.to(device))
        idx.append(idx_B)
    if not feats:  # more ranks than samples: an empty share (1-D, so torch.cat skips it when gathering)
        return (torch.zeros(0, device=device), torch.zeros(0, dtype=torch.long, device=device),
                torch.zeros(0, dtype=torch.long))
    return torch.cat(feats), torch.cat(labels), torch.cat(idx)


def topk_neighbours(query_QD: torch.Tensor, bank_RD: torch.Tensor, bank_y_R: torch.Tensor, k: int,
                    chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most similar bank entries of every query: ``(similarities_Qk, labels_Qk)``, best first. With fewer than
    ``k`` bank entries the rest is padded with similarity ``-inf`` and label ``-1``. Queries go in chunks of
    ``chunk`` to bound the ``chunk x R`` similarity matrix."""
    Q, R = query_QD.shape[0], (bank_RD.shape[0] if bank_RD.dim() == 2 else 0)
    sims = torch.full((Q, k), float("-inf"), device=query_QD.device)
    labels = torch.full((Q, k), -1, dtype=torch.long, device=query_QD.device)
    kk = min(k, R)
    if kk == 0 or Q == 0:
        return sims, labels
    bank_RD = bank_RD.to(query_QD.device)
    bank_y_R = bank_y_R.to(query_QD.device)
    for s in range(0, Q, chunk):
        s_QR = query_QD[s:s + chunk] @ bank_RD.t()  # Q: this chunk's queries
        top_s, top_i = s_QR.topk(kk, dim=1)
        sims[s:s + chunk, :kk] = top_s
        labels[s:s + chunk, :kk] = bank_y_R[top_i]
    return sims, labels


def vote_scores(sims_Qk: torch.Tensor, labels_Qk: torch.Tensor, num_classes: int, vote: str = "weighted",
                temperature: float = 0.07) -> torch.Tensor:
    """Class scores ``(Q, C)`` from the neighbours (padding: label ``-1``, similarity ``-inf``, which casts no vote)."""
    if vote not in VOTES:
        raise ValueError(f"vote must be one of {VOTES}, got {vote!r}")
    valid = labels_Qk >= 0
    lab = labels_Qk.clamp(min=0)
    zero = torch.zeros((), device=sims_Qk.device)
    scores = torch.zeros(sims_Qk.shape[0], num_classes, dtype=torch.float64, device=sims_Qk.device)
    if vote == "weighted":
        w = torch.where(valid, (sims_Qk.double() / temperature).exp(), zero.double())
        return scores.scatter_add_(1, lab, w)
    counts = scores.scatter_add(1, lab, valid.double())
    # tie-break: summed similarity per class, mapped into [0, 2/3) so it never outweighs one vote
    k = max(1, sims_Qk.shape[1])
    sim_sum = scores.scatter_add(1, lab, torch.where(valid, sims_Qk.double(), zero.double()))
    return counts + (sim_sum / k + 1) / 3 * (counts > 0)


@torch.no_grad()
def knn_top1(encode_fn: Callable, train_data: Union[str, EvalSet], val_data: Union[str, EvalSet],
             preprocess: Callable, *, k: int = 20, batch_size: int = 64, device="cpu", vote: str = "weighted",
             temperature: float = 0.07, workers: int = 2, amp: bool = True, show_progress: bool = False,
             chunk: int = 1024) -> dict:
    """k-NN accuracy of ``encode_fn``'s features: the labelled ``train_data`` is the memory bank, ``val_data`` the
    queries (paths or resolved ``EvalSet``s). ``encode_fn(images_BCHW on device) -> features_BD`` runs under
    ``torch.no_grad`` (and bf16 autocast on CUDA when ``amp``); put the model in eval mode first. Every rank must
    call it under torchrun. Returns ``{"knn/top1", "knn/top5" (C >= 5), "knn/mean_per_class_recall",
    "knn/num_train", "knn/num_val"}``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if vote not in VOTES:
        raise ValueError(f"vote must be one of {VOTES}, got {vote!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    device = torch.device(device)
    train = train_data if isinstance(train_data, EvalSet) else resolve_labelled(train_data)
    val = val_data if isinstance(val_data, EvalSet) else resolve_labelled(val_data)
    C = len(train.classnames)
    if len(val.classnames) != C:
        raise ValueError(f"k-NN needs one class-id space: the memory bank has {C} classes, the val set "
                         f"{len(val.classnames)}")
    if list(train.classnames) != list(val.classnames):
        log.warning("k-NN: the memory bank's and the val set's class names differ; class ids are compared as is")
    kw = dict(batch_size=batch_size, workers=workers, device=device, amp=amp, show_progress=show_progress)
    bank_RD, bank_y_R, bank_idx = encode_labelled(encode_fn, train, preprocess, desc="k-NN bank", **kw)
    q_QD, q_y_Q, q_idx = encode_labelled(encode_fn, val, preprocess, desc="k-NN val", **kw)
    bank_idx_all = gather_cat(bank_idx)
    _check_complete(bank_idx_all, train.num_samples)
    if bank_idx_all.numel() == 0:
        raise ValueError("k-NN memory bank is empty")
    # every rank: all queries against its own share of the bank, then merge the per-rank top-k lists
    q_all = gather_cat(q_QD)
    q_y_all = gather_cat(q_y_Q)
    _check_complete(gather_cat(q_idx), val.num_samples)
    if q_all.numel() == 0:
        raise ValueError("k-NN val set is empty")
    sims_Qk, labels_Qk = topk_neighbours(q_all.to(device), bank_RD, bank_y_R, k, chunk)
    world = rank_world()[1]
    if world > 1:
        Q = q_all.shape[0]
        sims_all = gather_cat(sims_Qk).view(world, Q, k).permute(1, 0, 2).reshape(Q, world * k)
        labels_all = gather_cat(labels_Qk).view(world, Q, k).permute(1, 0, 2).reshape(Q, world * k)
        sims_Qk, pick = sims_all.topk(k, dim=1)
        labels_Qk = labels_all.gather(1, pick)
    scores_QC = vote_scores(sims_Qk.cpu(), labels_Qk.cpu(), C, vote, temperature)
    res = classification_metrics(target_rank(scores_QC, q_y_all.cpu()), q_y_all.cpu(), C)
    out = {f"knn/{m}": v for m, v in res.items() if m != "num_samples"}
    out.update({"knn/num_train": int(bank_idx_all.numel()), "knn/num_val": int(res["num_samples"])})
    return out
