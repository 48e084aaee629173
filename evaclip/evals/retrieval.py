"""Image <-> text retrieval: recall@1/5/10 in both directions, several captions per image.

Shapes: see the legend in docs/ARCHITECTURE.md (B batch, E embedding dim, Q the images and R the captions, R >= Q: the
queries and references of image->text; text->image swaps the roles, and ``_ranks`` names its own arguments so).

image->text (``i2t``): an image is a hit at k when any of its captions is among the top k texts. text->image
(``t2i``): a caption is a hit at k when its image is among the top k images.

``i2t_R@k`` / ``t2i_R@k`` follow clip_benchmark's protocol (``clip_benchmark.metrics.zeroshot_retrieval``, the
figures papers report): one score matrix ``texts @ images.T`` in dataset order, the top k of each row by
``torch.topk``, so equal scores are ordered as topk orders them. Its ``text_retrieval_recall@k`` is ``i2t_R@k``, its
``image_retrieval_recall@k`` is ``t2i_R@k``; tests/test_evals.py checks equality with its functions.

``strict_i2t_R@k`` / ``strict_t2i_R@k`` count ties against the model: the rank of the answer is the number of
*wrong* candidates scoring at least as high as the best right one. They differ from the default only where scores
tie: when the same caption text belongs to several images, the copies score alike and an image cannot rank its own
copy first (strict i2t R@1 about 0 by construction, while the default credits whichever copy topk puts first).
``captions_shared`` counts such captions, and ``retrieval_notes`` says so in the output.

Class-aware recall (``class_i2t_R@k``, ``class_t2i_R@k``, tie-aware), reported when every sample carries a ``cls``
class id: any candidate of the query's class is a right answer (a caption of another image of the same class, an
image of the caption's class). It measures whether the model retrieves the right *kind* of item, not the exact one.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, Optional, Sequence, Union

import torch

from evaclip.evals.common import encode_images, encode_texts, gather_cat, gather_list, progress, rank_world, unwrap
from evaclip.evals.data import EvalSet, build_eval_loader, resolve_retrieval


def _ranks(query_QE: torch.Tensor, cand_RE: torch.Tensor, query_key_Q: torch.Tensor, cand_key_R: torch.Tensor,
           chunk: int) -> torch.Tensor:
    """Per query: how many wrong candidates (key differs) score >= its best right candidate (key equal)."""
    out = []
    for s in range(0, query_QE.shape[0], chunk):  # Q below: this chunk's queries
        s_QR = query_QE[s:s + chunk] @ cand_RE.t()
        pos_QR = query_key_Q[s:s + chunk].view(-1, 1) == cand_key_R.view(1, -1)
        best_Q1 = s_QR.masked_fill(~pos_QR, float("-inf")).amax(1, keepdim=True)
        out.append(((s_QR >= best_Q1) & ~pos_QR).sum(1))
    return torch.cat(out)


def _recalls(rank_i2t_Q: torch.Tensor, rank_t2i_R: torch.Tensor, ks: Sequence[int], prefix: str = "") -> dict:
    Q, R = rank_i2t_Q.numel(), rank_t2i_R.numel()
    out = {}
    for k in ks:
        if k <= R:
            out[f"{prefix}i2t_R@{k}"] = float((rank_i2t_Q < k).double().mean())
        if k <= Q:
            out[f"{prefix}t2i_R@{k}"] = float((rank_t2i_R < k).double().mean())
    return out


def _topk_recalls(text_RE: torch.Tensor, image_QE: torch.Tensor, owner_R: torch.Tensor, ks: Sequence[int],
                  chunk: int) -> dict:
    """clip_benchmark's recall@k: ``torch.topk(k)`` of each row of ``scores_RQ = text_RE @ image_QE.T`` (t2i) and of
    its transpose (i2t), a hit when a right candidate is among them (topk called per k, as clip_benchmark does)."""
    Q, R = image_QE.shape[0], text_RE.shape[0]
    scores_RQ = text_RE @ image_QE.t()
    image_id_Q = torch.arange(Q, device=image_QE.device)
    out = {}
    for k in ks:
        if k <= R:
            hits = [(owner_R[scores_RQ.T[s:s + chunk].topk(k, dim=1).indices] == image_id_Q[s:s + chunk, None]).any(1)
                    for s in range(0, Q, chunk)]
            out[f"i2t_R@{k}"] = torch.cat(hits).float().mean().item()  # float32 mean, as clip_benchmark
        if k <= Q:
            hits = [(scores_RQ[s:s + chunk].topk(k, dim=1).indices == owner_R[s:s + chunk, None]).any(1)
                    for s in range(0, R, chunk)]
            out[f"t2i_R@{k}"] = torch.cat(hits).float().mean().item()
    return out


def retrieval_metrics(image_QE: torch.Tensor, text_RE: torch.Tensor, owner_R: torch.Tensor,
                      ks: Sequence[int] = (1, 5, 10), chunk: int = 1024,
                      image_class_Q: Optional[torch.Tensor] = None) -> dict:
    """Recall@k both ways from normalised features; ``owner_R[r]`` is the row of ``image_QE`` caption r describes.
    Rows are in dataset order (images by sample, captions by image then by line): the default figures resolve equal
    scores by that order, as clip_benchmark does.

    ``i2t_R@k`` / ``t2i_R@k``: clip_benchmark's protocol; ``strict_i2t_R@k`` / ``strict_t2i_R@k``: ties count as
    misses. The score matrix (R x Q) is held once; the strict ranks and topk go ``chunk`` rows at a time. Recall@k is
    reported for k up to the number of candidates. With ``image_class_Q`` (a class id per image) the class-aware
    recalls are added as ``class_i2t_R@k`` / ``class_t2i_R@k`` (a caption's class is its image's).
    """
    Q, R = image_QE.shape[0], text_RE.shape[0]
    if Q == 0 or R == 0:
        raise ValueError(f"retrieval needs images and captions, got {Q} images and {R} captions")
    if owner_R.shape != (R,) or int(owner_R.min()) < 0 or int(owner_R.max()) >= Q:
        raise ValueError("owner_R must give, for every caption, the index of its image in image_QE")
    if not (torch.isfinite(image_QE).all() and torch.isfinite(text_RE).all()):
        raise FloatingPointError("retrieval features contain NaN/Inf: the model produced non-finite features")
    owner_R = owner_R.to(image_QE.device)
    if owner_R.unique().numel() != Q:
        raise ValueError("every image needs at least one caption")
    image_id_Q = torch.arange(Q, device=image_QE.device)
    out = _topk_recalls(text_RE, image_QE, owner_R, ks, chunk)
    out.update(_recalls(_ranks(image_QE, text_RE, image_id_Q, owner_R, chunk),
                        _ranks(text_RE, image_QE, owner_R, image_id_Q, chunk), ks, prefix="strict_"))
    if image_class_Q is not None:
        if image_class_Q.shape != (Q,):
            raise ValueError(f"image_class_Q must hold one class id per image ({Q}), got shape "
                             f"{tuple(image_class_Q.shape)}")
        cls_Q = image_class_Q.to(image_QE.device)
        out.update(_recalls(_ranks(image_QE, text_RE, cls_Q, cls_Q[owner_R], chunk),
                            _ranks(text_RE, image_QE, cls_Q[owner_R], cls_Q, chunk), ks, prefix="class_"))
    out["num_images"], out["num_texts"] = Q, R
    return out


def shared_captions(captions: Sequence[str], owners: Sequence[int]) -> int:
    """How many captions have a text that also belongs to another image (exact, whitespace-stripped)."""
    images_of = defaultdict(set)
    for c, o in zip(captions, owners):
        images_of[c.strip()].add(o)
    return sum(1 for c in captions if len(images_of[c.strip()]) > 1)


def retrieval_notes(results: dict, prefix: str = "retrieval/") -> list[str]:
    """What the retrieval figures measure, for the console and the results JSON."""
    if f"{prefix}num_texts" not in results:
        return []
    notes = [f"{prefix}i2t_R@k / t2i_R@k: instance recall, clip_benchmark's protocol (a hit is the image's own "
             f"caption / the caption's own image among torch.topk's k; equal scores in dataset order); "
             f"{prefix}strict_*: the same with ties counted as misses"]
    if any(k.startswith(f"{prefix}class_") for k in results):
        notes.append(f"{prefix}class_*: class-aware recall (a hit is any candidate of the query's class, from the "
                     "samples' 'cls' ids)")
    shared, m = results.get(f"{prefix}captions_shared", 0), results[f"{prefix}num_texts"]
    if shared:
        notes.append(f"{shared} of {m} captions are word-for-word the caption of another image too: they tie, so "
                     "instance recall credits them by topk's order (strict i2t R@1 is about 0 when every caption is "
                     "shared)"
                     + ("; read the class-aware figures for this set" if any(
                         k.startswith(f"{prefix}class_") for k in results) else ""))
    return notes


@torch.no_grad()
def retrieval(model, tokenizer: Callable, data: Union[str, EvalSet], preprocess: Callable, *, batch_size: int = 64,
              workers: int = 2, device=None, amp: bool = True, show_progress: bool = True,
              ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Retrieval recall@k on image-text shards (``txt`` holds one caption per line; an optional ``cls`` class id per
    sample adds the class-aware recalls). Works under torchrun: each rank encodes its share, features are gathered
    and every rank returns the same metrics."""
    model = unwrap(model)
    device = torch.device(device or next(model.parameters()).device)
    evset = data if isinstance(data, EvalSet) else resolve_retrieval(data)
    rank, world = rank_world()
    was_training = model.training
    model.eval()
    img_idx, img_f, img_cls, captions, owners = [], [], [], [], []
    try:
        for idx_B, images_BCHW, targets_B in progress(build_eval_loader(evset, preprocess, batch_size, workers, rank,
                                                                        world), "retrieval", show_progress):
            img_f.append(encode_images(model, images_BCHW, device, amp).cpu())
            img_idx.append(idx_B)
            for i, (caps, cls) in zip(idx_B.tolist(), targets_B):
                captions += caps
                owners += [i] * len(caps)
                img_cls.append(cls)
        txt_f = encode_texts(model, tokenizer, captions, device, batch_size=max(batch_size, 256), amp=amp).cpu()
    finally:
        model.train(was_training)
    idx_Q = gather_cat(torch.cat(img_idx) if img_idx else torch.zeros(0, dtype=torch.long))
    image_QE = gather_cat(torch.cat(img_f) if img_f else torch.zeros(0))
    text_RE = gather_cat(txt_f if captions else torch.zeros(0))
    owner_global_R = torch.tensor(gather_list(owners), dtype=torch.long)
    cls_Q = gather_list(img_cls)  # in the same (rank) order as idx_Q
    all_captions = gather_list(captions)
    if idx_Q.numel() != idx_Q.unique().numel():
        raise RuntimeError("retrieval saw some images more than once across ranks/workers")
    # dataset order (images by sample index, captions by image, lines in order), whatever the ranks and workers read:
    # clip_benchmark's protocol resolves equal scores by it
    order_Q = idx_Q.argsort()
    row = torch.full((int(idx_Q.max()) + 1 if idx_Q.numel() else 0,), -1, dtype=torch.long)
    row[idx_Q[order_Q]] = torch.arange(idx_Q.numel())
    owner_R = row[owner_global_R] if owner_global_R.numel() else owner_global_R
    order_R = owner_R.argsort(stable=True)
    class_Q = torch.tensor(cls_Q, dtype=torch.long)[order_Q] if cls_Q and None not in cls_Q else None
    out = retrieval_metrics(image_QE[order_Q].to(device), text_RE[order_R].to(device), owner_R[order_R], ks,
                            image_class_Q=class_Q)
    out["captions_shared"] = shared_captions(all_captions, owner_global_R.tolist())
    return out
