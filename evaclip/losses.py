"""Contrastive losses over the global batch: ClipLoss (softmax InfoNCE), SigLipLoss (pairwise sigmoid) and LCLLoss
(generation + InfoNCE over a variable number of pairs per rank).

Shapes: see the legend in docs/ARCHITECTURE.md (B this rank's batch, G global batch = world_size * B, E embedding
dim; MIM: P patch tokens, S grid side, T teacher feature dim, M masked patches; LCL: n pairs, T generation targets,
V vocabulary).

Both losses work with or without a process group. Across processes, features are all-gathered with gradient
(``torch.distributed.nn``), whose backward sums the gradients of every rank's loss; with DDP's gradient averaging the
parameter gradients then equal those of one process on the concatenated batch (tests/test_losses_dist.py checks it).
Every rank must hold the same batch size B (the data loader drops the last partial batch); checked on the first call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from evaclip.distributed import rank_world


@dataclass
class LossCfg:
    """The contrastive loss section (``loss`` of the CLIP task's config)."""

    name: Literal["clip", "siglip"] = "clip"
    local_loss: bool = True  # each rank's logits against all texts (not the full G x G matrix on every rank)
    gather_with_grad: bool = True  # gradients flow through the all-gather (exact; open_clip's default for big runs)


def _all_gather_with_grad(x_BE: torch.Tensor, group=None) -> torch.Tensor:
    """x_GE with a backward that sums every rank's gradient into each slice (reduce-scatter)."""
    group = dist.group.WORLD if group is None else group
    import torch.distributed._functional_collectives as fc  # lazy: only distributed runs need it

    if hasattr(fc, "all_gather_single"):  # torch >= 2.10: the autograd-aware functional collective
        return fc.all_gather_single(x_BE.contiguous(), 0, group)
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(x_BE, group=group), dim=0)


def gather_features(x_BE: torch.Tensor, rank: int, world_size: int, with_grad: bool, group=None) -> torch.Tensor:
    """All ranks' ``x_BE`` concatenated in rank order -> x_GE.

    ``with_grad``: gradients flow back to every rank's features (summed over the ranks' losses). Without it, only
    this rank's slice keeps its autograd history (the others are constants): cheaper, and with the full (non-local)
    loss on every rank, the DDP-averaged gradient is the 1-process gradient divided by world_size.
    """
    if world_size == 1:
        return x_BE
    if with_grad:
        return _all_gather_with_grad(x_BE, group)
    parts = [torch.empty_like(x_BE) for _ in range(world_size)]
    dist.all_gather(parts, x_BE.detach().contiguous(), group=group)
    parts[rank] = x_BE
    return torch.cat(parts, dim=0)


def _check_inputs(image_BE: torch.Tensor, text_BE: torch.Tensor, logit_scale: torch.Tensor) -> None:
    if image_BE.ndim != 2 or text_BE.ndim != 2 or image_BE.shape != text_BE.shape:
        raise ValueError(f"expected image and text features of the same shape (B, E), got {tuple(image_BE.shape)} "
                         f"and {tuple(text_BE.shape)}")
    if torch.as_tensor(logit_scale).numel() != 1:
        raise ValueError(f"logit_scale must be a scalar, got shape {tuple(torch.as_tensor(logit_scale).shape)}")


class _GlobalBatchLoss(nn.Module):
    """Shared plumbing: process group lookup and a one-time check that all ranks hold the same batch size."""

    def __init__(self, group=None) -> None:
        super().__init__()
        self.group = group
        self._checked_world = 0

    def _setup(self, image_BE: torch.Tensor, text_BE: torch.Tensor, logit_scale) -> tuple[int, int]:
        _check_inputs(image_BE, text_BE, logit_scale)
        rank, world_size = rank_world(self.group)
        if world_size > 1 and self._checked_world != world_size:
            # One host sync, once: uneven batches would otherwise fail inside all_gather with an opaque message.
            sizes = [None] * world_size
            dist.all_gather_object(sizes, tuple(image_BE.shape), group=self.group)
            if len(set(sizes)) != 1:
                raise ValueError(f"all ranks must pass features of the same shape to the loss, got {sizes} "
                                 "(drop the last partial batch)")
            self._checked_world = world_size
        return rank, world_size


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy of ``logits`` (rows x candidates: B x G, G x G or B x B) against ``labels`` (one per row)."""
    return (logits.argmax(dim=1) == labels).float().mean().detach()


class ClipLoss(_GlobalBatchLoss):
    """Symmetric InfoNCE over the global batch (CLIP / EVA-CLIP).

    ``local_loss=True``: each rank scores only its own B rows against the G gathered columns (B x G logits instead of
    G x G); the mean of the ranks' losses is the global loss. ``gather_with_grad``: see ``gather_features``;
    EVA-CLIP trains with both on.
    """

    def __init__(self, local_loss: bool = True, gather_with_grad: bool = True, group=None) -> None:
        super().__init__(group)
        if local_loss and not gather_with_grad:
            # Each rank would drop the gradient its rows send to the other ranks' features: a silently wrong gradient.
            raise ValueError("loss.local_loss=true needs loss.gather_with_grad=true (without it the cross-rank "
                             "gradient terms are lost); set both, or local_loss=false")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: Optional[torch.Tensor] = None, output_dict: bool = True):
        """image/text features (B, E), L2-normalised; logit_scale already exponentiated; logit_bias is ignored.

        Returns {"loss", "i2t_acc", "t2i_acc"} (accuracies over this rank's rows), or the loss if not output_dict.
        """
        rank, world_size = self._setup(image_features, text_features, logit_scale)
        img_BE, txt_BE = image_features, text_features
        B = img_BE.shape[0]
        img_GE = gather_features(img_BE, rank, world_size, self.gather_with_grad, self.group)
        txt_GE = gather_features(txt_BE, rank, world_size, self.gather_with_grad, self.group)
        # rows: this rank's B rows (local loss: logits B x G, labels B) or all G rows (G x G, G); columns: the G
        # gathered candidates. No suffix: the row count depends on local_loss.
        if self.local_loss:
            logits_i2t = logit_scale * img_BE @ txt_GE.T
            logits_t2i = logit_scale * txt_BE @ img_GE.T
            labels = torch.arange(B, device=img_BE.device) + rank * B
        else:
            logits_i2t = logit_scale * img_GE @ txt_GE.T
            logits_t2i = logits_i2t.T
            labels = torch.arange(img_GE.shape[0], device=img_BE.device)
        loss = 0.5 * (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels))
        if not output_dict:
            return loss
        return {"loss": loss, "i2t_acc": _accuracy(logits_i2t, labels),
                "t2i_acc": _accuracy(logits_t2i, labels)}


class SigLipLoss(_GlobalBatchLoss):
    """Sigmoid pairwise loss (SigLIP, Zhai et al. 2023) over the global batch.

    Each rank scores its B images against all G texts (texts all-gathered with gradient): +1 labels on its own
    diagonal, -1 everywhere else; loss = -sum(logsigmoid(label * (scale * sim + bias))) / B, as in open_clip.
    The learnable bias lives on the model (``logit_bias``, from the model config's ``init_logit_bias``).
    """

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: Optional[torch.Tensor] = None, output_dict: bool = True):
        """image/text features (B, E), L2-normalised; logit_scale exponentiated; logit_bias a scalar (required)."""
        if logit_bias is None:
            raise ValueError("SigLipLoss needs logit_bias: build the model with init_logit_bias (e.g. -10) "
                             "so it has a learnable logit_bias")
        rank, world_size = self._setup(image_features, text_features, logit_scale)
        img_BE, txt_BE = image_features, text_features
        B = img_BE.shape[0]
        txt_GE = gather_features(txt_BE, rank, world_size, True, self.group)
        logits_BG = logit_scale * img_BE @ txt_GE.T + logit_bias
        labels_B = torch.arange(B, device=img_BE.device) + rank * B
        signs_BG = -torch.ones_like(logits_BG)
        signs_BG[torch.arange(B, device=img_BE.device), labels_B] = 1.0
        loss = -F.logsigmoid(signs_BG * logits_BG).sum() / B
        if not output_dict:
            return loss
        # t2i over the local block only: texts of other ranks have their images elsewhere.
        logits_local_BB = logits_BG[:, rank * B:(rank + 1) * B]
        local_labels = torch.arange(B, device=img_BE.device)
        return {"loss": loss, "i2t_acc": _accuracy(logits_BG, labels_B),
                "t2i_acc": _accuracy(logits_local_BB.T, local_labels)}


def mim_cosine_loss(pred: torch.Tensor, target_BPT: torch.Tensor, mask_BP: torch.Tensor,
                    denom: Optional[torch.Tensor] = None) -> torch.Tensor:
    """EVA's masked-image-modeling loss: minus the cosine similarity of the student's prediction and the teacher's
    feature at each masked patch, averaged over the masked patches (computed in fp32).

    ``pred``: B x P x T (every patch; the unmasked ones get no gradient) or M x T (the M masked patches in mask order,
    as ``MIMStudent`` returns them); ``target_BPT``: the teacher's features; ``mask_BP``: bool, True = masked (B x S x S
    is flattened). ``denom``: divide the summed loss by this count instead of M, e.g. the masked patches of a whole
    step over every micro-batch and rank, so that accumulation and data parallelism give the exact global mean.

    With B x P x T predictions (the training step's) the masked patches are selected by weights, not by boolean
    indexing: every shape is static, so the step reads nothing back to the host (``x[mask]`` needs the count of True,
    a sync) and ``torch.compile`` does not recompile as the count changes from batch to batch.
    """
    mask_BP = mask_BP.flatten(1)
    if denom is None:
        denom = mask_BP.sum().clamp(min=1)
    if pred.ndim == 3:
        if pred.shape[:2] != mask_BP.shape or pred.shape != target_BPT.shape:
            raise ValueError(f"predictions {tuple(pred.shape)}, targets {tuple(target_BPT.shape)} and mask "
                             f"{tuple(mask_BP.shape)} do not match")
        cos_BP = F.cosine_similarity(pred.float(), target_BPT.float(), dim=-1)
        return -(cos_BP * mask_BP).sum() / denom
    pred_MT = pred
    target_MT = target_BPT[mask_BP]
    if pred_MT.shape != target_MT.shape:
        raise ValueError(f"{pred_MT.shape[0]} predictions of dim {pred_MT.shape[-1]} for {target_MT.shape[0]} masked "
                         f"targets of dim {target_MT.shape[-1]}")
    neg_cos = -F.cosine_similarity(pred_MT.float(), target_MT.float(), dim=-1).sum()
    return neg_cos / denom


def build_loss(cfg) -> nn.Module:
    """The loss named by ``cfg.name`` ('clip' or 'siglip'; the config's ``loss`` section, choices checked there)."""
    if cfg.name == "clip":
        return ClipLoss(local_loss=cfg.local_loss, gather_with_grad=cfg.gather_with_grad)
    if cfg.name == "siglip":
        return SigLipLoss()
    raise AssertionError(cfg.name)  # unreachable: config validation rejects other names


class LCLLoss(nn.Module):
    """LCL's loss (Latent Compression Learning, OpenGVLab): ``generation_weight`` x next-token cross-entropy +
    ``contrastive_weight`` x symmetric InfoNCE between the LM's features at ``<boi>`` and the pooled latents of the
    images that follow, over the global batch (defaults 1.0 and 0.1, LCL's ``--lcl-generation-loss-weight`` /
    ``--lcl-contrastive-loss-weight``).

    Reference: LCL's ``src/open_clip/loss.py``, ``LCLLoss.get_logits`` / ``LCLLoss.forward``: each rank pads its
    variable number of pairs with zero rows to the largest count of any rank, all-gathers image and text features
    with gradient, scores its own rows against every gathered column (local loss), fills the padded columns with
    -inf, and averages the image->text and text->image cross-entropies; the generation term is the cross-entropy
    over the targets ``LCL.get_generation_logits_labels`` keeps (``src/open_clip/lcl_model.py``); the temperature
    is a learned ``logit_scale`` clamped at ln(100) after each step (``src/training/train.py``: the task's
    ``after_update``). LCL averages each term over the rank's own pairs / targets and DDP averages the ranks; here
    each term is averaged over the pairs / targets of the whole global batch (counts exchanged once per call), so 2
    processes give exactly the 1-process loss and gradients on the concatenated batch even with uneven counts (the
    same as LCL's when every rank holds as many), and a rank with no pair adds 0 instead of NaN (LCL: a mean over
    zero rows). Both terms are always computed, the contrastive one multiplied by its weight, so with weight 0
    every parameter still takes part in backward (DDP / FSDP2 see a full graph; LCL skipped the term and DDP
    failed on the unused parameters).

    ``forward`` returns ``loss`` (this rank's share: its backward, averaged over ranks as DDP does, is the global
    gradient) and detached global values for logging: ``global_loss``, ``generation``, ``contrastive`` (unweighted),
    ``pairs`` (the global pair count).
    """

    def __init__(self, generation_weight: float = 1.0, contrastive_weight: float = 0.1, group=None) -> None:
        super().__init__()
        if generation_weight < 0 or contrastive_weight < 0:
            raise ValueError(f"LCL loss weights must be >= 0, got {generation_weight}, {contrastive_weight}")
        self.generation_weight, self.contrastive_weight = float(generation_weight), float(contrastive_weight)
        self.group = group

    def _counts(self, pairs: int, targets: int, device, world_size: int) -> torch.Tensor:
        """world x 2 (pairs, targets) of every rank, one all-gather."""
        mine = torch.tensor([[pairs, targets]], dtype=torch.long, device=device)
        if world_size == 1:
            return mine
        parts = [torch.empty_like(mine) for _ in range(world_size)]
        dist.all_gather(parts, mine, group=self.group)
        return torch.cat(parts)

    def _contrastive_sum(self, img_NE, txt_NE, logit_scale, counts_W: torch.Tensor, rank: int, world_size: int):
        """Summed (i2t + t2i) / 2 cross-entropy of this rank's pairs against every rank's (padding masked)."""
        n, n_max = img_NE.shape[0], max(1, int(counts_W.max()))
        if world_size == 1:
            img_all, txt_all, offset = img_NE, txt_NE, 0
            valid_C = torch.ones(n, dtype=torch.bool, device=img_NE.device)
        else:
            pad = img_NE.new_zeros(n_max - n, img_NE.shape[1])
            img_all = gather_features(torch.cat([img_NE, pad]), rank, world_size, True, self.group)
            txt_all = gather_features(torch.cat([txt_NE, pad.to(txt_NE.dtype)]), rank, world_size, True, self.group)
            col = torch.arange(world_size * n_max, device=img_NE.device)
            valid_C = (col % n_max) < counts_W.to(img_NE.device)[col // n_max]
            offset = rank * n_max
        labels = torch.arange(n, device=img_NE.device) + offset
        logits_i2t = (logit_scale * img_NE @ txt_all.T).masked_fill(~valid_C, float("-inf"))
        logits_t2i = (logit_scale * txt_NE @ img_all.T).masked_fill(~valid_C, float("-inf"))
        return 0.5 * (F.cross_entropy(logits_i2t, labels, reduction="sum")
                      + F.cross_entropy(logits_t2i, labels, reduction="sum"))

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logits: torch.Tensor,
                labels: torch.Tensor, logit_scale: torch.Tensor) -> dict[str, torch.Tensor]:
        """``image_features`` / ``text_features``: this rank's pairs, n x E each, L2-normalised (n may be 0 and may
        differ between ranks); ``logits``: T x V at this rank's generation targets ``labels`` (T); ``logit_scale``
        exponentiated."""
        if image_features.ndim != 2 or image_features.shape != text_features.shape:
            raise ValueError(f"expected image and text features of the same shape (n, E), got "
                             f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")
        if logits.ndim != 2 or labels.shape != logits.shape[:1]:
            raise ValueError(f"expected logits T x V and labels T, got {tuple(logits.shape)} and {tuple(labels.shape)}")
        rank, world_size = rank_world(self.group)
        counts = self._counts(image_features.shape[0], labels.shape[0], image_features.device, world_size)
        totals = counts.sum(0).clamp(min=1).float()
        img, txt = image_features.float(), text_features.float()
        con_sum = self._contrastive_sum(img, txt, logit_scale.float(), counts[:, 0], rank, world_size)
        gen_sum = F.cross_entropy(logits.float(), labels, reduction="sum")
        generation = gen_sum * world_size / totals[1]
        contrastive = con_sum * world_size / totals[0]
        loss = self.generation_weight * generation + self.contrastive_weight * contrastive
        sums = torch.stack([gen_sum.detach() / totals[1], con_sum.detach() / totals[0]])
        if world_size > 1:
            dist.all_reduce(sums, group=self.group)
        return {"loss": loss, "generation": sums[0], "contrastive": sums[1],
                "global_loss": self.generation_weight * sums[0] + self.contrastive_weight * sums[1],
                "pairs": counts[:, 0].sum().float()}
