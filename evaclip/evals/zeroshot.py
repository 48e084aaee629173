"""Zero-shot classification: class names x prompt templates -> text classifier; top-1 / top-5 / mean per-class recall.

Shapes: see the legend in docs/ARCHITECTURE.md (B batch, C classes, E embedding dim; Q the evaluated images, all
ranks' once gathered: each is a query scored against the C class embeddings).

Ties count against the model: the rank of the true class is the number of *other* classes scoring at least as high,
and a prediction is top-k correct when that rank is < k. A degenerate model that scores every class the same thus
gets 0, never 100 %, and the result does not depend on how ``topk`` happens to order equal scores.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from evaclip.evals.common import encode_images, encode_texts, gather_cat, progress, rank_world, unwrap
from evaclip.evals.data import EvalSet, build_eval_loader, resolve_zeroshot


def _prompt(template, classname: str) -> str:
    # open_clip's templates are callables; text files use "{c}" (replace, not format: names may contain braces)
    return template(classname) if callable(template) else template.replace("{c}", classname)


@torch.no_grad()
def build_classifier(model, tokenizer: Callable, classnames: Sequence[str], templates: Sequence, device,
                     batch_size: int = 256, amp: bool = True, show_progress: bool = False) -> torch.Tensor:
    """Zero-shot weights ``W_EC``: per class, the re-normalised mean of its L2-normalised prompt embeddings.

    Under a process group the classes are split across ranks and the result gathered, so every rank returns the
    full classifier.
    """
    if not classnames:
        raise ValueError("zero-shot classification needs at least one class name")
    if not templates:
        raise ValueError("zero-shot classification needs at least one prompt template")
    rank, world = rank_world()
    mine = list(range(rank, len(classnames), world))
    n_tpl = len(templates)
    # whole classes per text batch so each class's prompts are averaged together
    per_batch = max(1, batch_size // n_tpl)
    w_local = []
    for s in progress(range(0, len(mine), per_batch), "classifier", show_progress):
        cls = mine[s:s + per_batch]
        texts = [_prompt(t, classnames[c]) for c in cls for t in templates]
        f_BE = encode_texts(model, tokenizer, texts, device, batch_size=len(texts), amp=amp)
        f = f_BE.view(len(cls), n_tpl, -1)  # classes of this batch x templates x E
        w_local.append(F.normalize(f.mean(dim=1), dim=-1))
    w = torch.cat(w_local) if w_local else torch.zeros(0)  # this rank's classes x E
    if world > 1:
        ids = gather_cat(torch.tensor(mine, dtype=torch.long))
        w_all = gather_cat(w.float())
        w_CE = torch.empty_like(w_all)
        w_CE[ids] = w_all
        w = w_CE.to(device)
    return w.t().contiguous()


def target_rank(logits_QC: torch.Tensor, targets_Q: torch.Tensor) -> torch.Tensor:
    """Rank of the true class per sample: how many other classes score >= it (0 = correct top-1, ties lose)."""
    if not torch.isfinite(logits_QC).all():
        raise FloatingPointError("zero-shot logits contain NaN/Inf: the model produced non-finite features")
    true_Q1 = logits_QC.gather(1, targets_Q.view(-1, 1))
    return (logits_QC >= true_Q1).sum(dim=1) - 1


def classification_metrics(rank_Q: torch.Tensor, targets_Q: torch.Tensor, num_classes: int,
                           ks: Sequence[int] = (1, 5)) -> dict:
    """Top-k accuracies (for k <= num_classes) and mean per-class recall from true-class ranks.

    Mean per-class recall is the top-1 accuracy of each class present in ``targets_Q``, averaged over those classes
    (sklearn's ``balanced_accuracy_score``).
    """
    n = rank_Q.numel()
    if n == 0:
        raise ValueError("zero-shot evaluation saw no samples")
    out = {f"top{k}": float((rank_Q < k).double().mean()) for k in ks if k <= num_classes}
    correct_Q = (rank_Q == 0).double()
    hits_C = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, targets_Q, correct_Q)
    count_C = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, targets_Q, torch.ones(n, dtype=torch.float64))
    present = count_C > 0
    out["mean_per_class_recall"] = float((hits_C[present] / count_C[present]).mean())
    out["num_samples"] = n
    return out


@torch.no_grad()
def zero_shot(model, tokenizer: Callable, data: Union[str, EvalSet], preprocess: Callable, *,
              classnames: Optional[str] = None, templates: Optional[str] = None, batch_size: int = 64,
              workers: int = 2, device=None, amp: bool = True, show_progress: bool = True,
              classifier_EC: Optional[torch.Tensor] = None) -> dict:
    """Zero-shot classification of ``data`` (path or resolved EvalSet); returns ``{top1, top5, mean_per_class_recall,
    num_samples}``. Works on one process or under torchrun (each rank reads its share; results are gathered)."""
    model = unwrap(model)
    device = torch.device(device or next(model.parameters()).device)
    evset = data if isinstance(data, EvalSet) else resolve_zeroshot(data, classnames, templates)
    was_training = model.training
    model.eval()
    try:
        if classifier_EC is None:
            classifier_EC = build_classifier(model, tokenizer, evset.classnames, evset.templates, device,
                                             amp=amp, show_progress=show_progress)
        rank, world = rank_world()
        loader = build_eval_loader(evset, preprocess, batch_size, workers, rank, world)
        idx, ranks, targets = [], [], []
        for idx_B, images_BCHW, targets_B in progress(loader, "zero-shot", show_progress):
            f_BE = encode_images(model, images_BCHW, device, amp)
            logits_BC = f_BE @ classifier_EC.to(f_BE.dtype)
            ranks.append(target_rank(logits_BC, targets_B.to(device)).cpu())
            idx.append(idx_B)
            targets.append(targets_B)
    finally:
        model.train(was_training)
    cat = lambda xs: torch.cat(xs) if xs else torch.zeros(0, dtype=torch.long)
    idx_Q, rank_Q, targets_Q = gather_cat(cat(idx)), gather_cat(cat(ranks)), gather_cat(cat(targets))
    _check_complete(idx_Q, evset.num_samples)
    return classification_metrics(rank_Q, targets_Q, len(evset.classnames))


def _check_complete(idx: torch.Tensor, expected: Optional[int]) -> None:
    # idx: the global sample indices of a whole evaluated set (Q queries or R references), gathered over ranks.
    # Every sample exactly once: a duplicate or a gap would mean the rank/worker split is wrong
    if idx.numel() != idx.unique().numel():
        raise RuntimeError("evaluation saw some samples more than once across ranks/workers")
    if expected is not None and idx.numel() != expected:
        raise RuntimeError(f"evaluation saw {idx.numel()} samples, expected {expected}")
    if idx.numel() and int(idx.max()) != idx.numel() - 1:
        raise RuntimeError("evaluation missed some samples (global indices are not contiguous)")
