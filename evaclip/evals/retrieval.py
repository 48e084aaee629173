"""Image <-> text retrieval: recall@1/5/10 in both directions, several captions per image.

Shapes: N images, M captions (M >= N), D embedding dim, B batch, K chunk of queries.

image->text (``i2t``): an image is a hit at k when any of its captions ranks in the top k texts. text->image
(``t2i``): a caption is a hit at k when its image ranks in the top k images. As in zero-shot, ties count against the
model: the rank of the answer is the number of *wrong* candidates scoring at least as high as the best right one.

Instance recall (``i2t_R@k``, ``t2i_R@k``) is the standard measure: the right answers are the image's own captions /
the caption's own image. It needs captions that identify their image: when the same caption text belongs to several
images, the copies score alike (up to float rounding) and, ties losing, an image cannot rank its own copy first, so
i2t R@1 is about 0 by construction. ``captions_shared`` counts such captions, and ``retrieval_notes`` says so in
the output.

Class-aware recall (``class_i2t_R@k``, ``class_t2i_R@k``), reported when every sample carries a ``cls`` class id:
any candidate of the query's class is a right answer (a caption of another image of the same class, an image of the
caption's class). It measures whether the model retrieves the right *kind* of item, not the exact one.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, Optional, Sequence, Union

import torch

from evaclip.evals.common import encode_images, encode_texts, gather_cat, gather_list, progress, rank_world, unwrap
from evaclip.evals.data import EvalSet, build_eval_loader, resolve_retrieval


def _ranks(query_QD: torch.Tensor, cand_CD: torch.Tensor, query_key_Q: torch.Tensor, cand_key_C: torch.Tensor,
           chunk: int) -> torch.Tensor:
    """Per query: how many wrong candidates (key differs) score >= its best right candidate (key equal)."""
    out = []
    for s in range(0, query_QD.shape[0], chunk):
        s_KC = query_QD[s:s + chunk] @ cand_CD.t()
        pos_KC = query_key_Q[s:s + chunk].view(-1, 1) == cand_key_C.view(1, -1)
        best_K1 = s_KC.masked_fill(~pos_KC, float("-inf")).amax(1, keepdim=True)
        out.append(((s_KC >= best_K1) & ~pos_KC).sum(1))
    return torch.cat(out)


def _recalls(rank_i2t_N: torch.Tensor, rank_t2i_M: torch.Tensor, ks: Sequence[int], prefix: str = "") -> dict:
    N, M = rank_i2t_N.numel(), rank_t2i_M.numel()
    out = {}
    for k in ks:
        if k <= M:
            out[f"{prefix}i2t_R@{k}"] = float((rank_i2t_N < k).double().mean())
        if k <= N:
            out[f"{prefix}t2i_R@{k}"] = float((rank_t2i_M < k).double().mean())
    return out


def retrieval_metrics(image_ND: torch.Tensor, text_MD: torch.Tensor, owner_M: torch.Tensor,
                      ks: Sequence[int] = (1, 5, 10), chunk: int = 1024,
                      image_class_N: Optional[torch.Tensor] = None) -> dict:
    """Recall@k both ways from normalised features; ``owner_M[m]`` is the row of ``image_ND`` caption m describes.

    Scores are computed ``chunk`` queries at a time so 5k x 25k sets fit in memory. Recall@k is reported for k up to
    the number of candidates. With ``image_class_N`` (a class id per image) the class-aware recalls are added as
    ``class_i2t_R@k`` / ``class_t2i_R@k`` (a caption's class is its image's).
    """
    N, M = image_ND.shape[0], text_MD.shape[0]
    if N == 0 or M == 0:
        raise ValueError(f"retrieval needs images and captions, got {N} images and {M} captions")
    if owner_M.shape != (M,) or int(owner_M.min()) < 0 or int(owner_M.max()) >= N:
        raise ValueError("owner_M must give, for every caption, the index of its image in image_ND")
    if not (torch.isfinite(image_ND).all() and torch.isfinite(text_MD).all()):
        raise FloatingPointError("retrieval features contain NaN/Inf: the model produced non-finite features")
    owner_M = owner_M.to(image_ND.device)
    if owner_M.unique().numel() != N:
        raise ValueError("every image needs at least one caption")
    image_id_N = torch.arange(N, device=image_ND.device)
    out = _recalls(_ranks(image_ND, text_MD, image_id_N, owner_M, chunk),
                   _ranks(text_MD, image_ND, owner_M, image_id_N, chunk), ks)
    if image_class_N is not None:
        if image_class_N.shape != (N,):
            raise ValueError(f"image_class_N must hold one class id per image ({N}), got shape "
                             f"{tuple(image_class_N.shape)}")
        cls_N = image_class_N.to(image_ND.device)
        out.update(_recalls(_ranks(image_ND, text_MD, cls_N, cls_N[owner_M], chunk),
                            _ranks(text_MD, image_ND, cls_N[owner_M], cls_N, chunk), ks, prefix="class_"))
    out["num_images"], out["num_texts"] = N, M
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
    notes = [f"{prefix}i2t_R@k / t2i_R@k: instance recall (a hit is the image's own caption / the caption's own "
             "image; ties count as misses)"]
    if any(k.startswith(f"{prefix}class_") for k in results):
        notes.append(f"{prefix}class_*: class-aware recall (a hit is any candidate of the query's class, from the "
                     "samples' 'cls' ids)")
    shared, m = results.get(f"{prefix}captions_shared", 0), results[f"{prefix}num_texts"]
    if shared:
        notes.append(f"{shared} of {m} captions are word-for-word the caption of another image too: they tie, so "
                     "instance recall cannot credit them (i2t R@1 is about 0 when every caption is shared)"
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
    idx_N = gather_cat(torch.cat(img_idx) if img_idx else torch.zeros(0, dtype=torch.long))
    image_ND = gather_cat(torch.cat(img_f) if img_f else torch.zeros(0))
    text_MD = gather_cat(txt_f if captions else torch.zeros(0))
    owner_global_M = torch.tensor(gather_list(owners), dtype=torch.long)
    cls_N = gather_list(img_cls)  # in the same (rank) order as idx_N
    all_captions = gather_list(captions)
    if idx_N.numel() != idx_N.unique().numel():
        raise RuntimeError("retrieval saw some images more than once across ranks/workers")
    # global sample index -> row in image_ND
    row = torch.full((int(idx_N.max()) + 1 if idx_N.numel() else 0,), -1, dtype=torch.long)
    row[idx_N] = torch.arange(idx_N.numel())
    owner_M = row[owner_global_M] if owner_global_M.numel() else owner_global_M
    class_N = torch.tensor(cls_N, dtype=torch.long) if cls_N and None not in cls_N else None
    out = retrieval_metrics(image_ND.to(device), text_MD.to(device), owner_M, ks, image_class_N=class_N)
    out["captions_shared"] = shared_captions(all_captions, owner_global_M.tolist())
    return out
