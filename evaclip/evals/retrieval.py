"""Image <-> text retrieval: recall@1/5/10 in both directions, several captions per image.

Shapes: N images, M captions (M >= N), D embedding dim, B batch, K chunk of queries.

image->text (``i2t``): an image is a hit at k when any of its captions ranks in the top k texts. text->image
(``t2i``): a caption is a hit at k when its image ranks in the top k images. As in zero-shot, ties count against the
model: the rank of the answer is the number of *wrong* candidates scoring at least as high as the best right one.
"""
from __future__ import annotations

from typing import Callable, Sequence, Union

import torch

from evaclip.evals.common import encode_images, encode_texts, gather_cat, gather_list, progress, rank_world, unwrap
from evaclip.evals.data import EvalSet, build_eval_loader, resolve_retrieval


def retrieval_metrics(image_ND: torch.Tensor, text_MD: torch.Tensor, owner_M: torch.Tensor,
                      ks: Sequence[int] = (1, 5, 10), chunk: int = 1024) -> dict:
    """Recall@k both ways from normalised features; ``owner_M[m]`` is the row of ``image_ND`` caption m describes.

    Scores are computed ``chunk`` queries at a time so 5k x 25k sets fit in memory. Recall@k is reported for k up to
    the number of candidates.
    """
    N, M = image_ND.shape[0], text_MD.shape[0]
    if N == 0 or M == 0:
        raise ValueError(f"retrieval needs images and captions, got {N} images and {M} captions")
    if owner_M.shape != (M,) or int(owner_M.min()) < 0 or int(owner_M.max()) >= N:
        raise ValueError("owner_M must give, for every caption, the index of its image in image_ND")
    if not (torch.isfinite(image_ND).all() and torch.isfinite(text_MD).all()):
        raise FloatingPointError("retrieval features contain NaN/Inf: the model produced non-finite features")
    owner_M = owner_M.to(image_ND.device)
    t2i = []
    for s in range(0, M, chunk):
        s_KN = text_MD[s:s + chunk] @ image_ND.t()
        true_K1 = s_KN.gather(1, owner_M[s:s + chunk].view(-1, 1))
        t2i.append((s_KN >= true_K1).sum(1) - 1)
    i2t = []
    for s in range(0, N, chunk):
        s_KM = image_ND[s:s + chunk] @ text_MD.t()
        pos_KM = owner_M.view(1, -1) == torch.arange(s, min(s + chunk, N), device=owner_M.device).view(-1, 1)
        if not pos_KM.any(1).all():
            raise ValueError("every image needs at least one caption")
        best_K1 = s_KM.masked_fill(~pos_KM, float("-inf")).amax(1, keepdim=True)
        i2t.append(((s_KM >= best_K1) & ~pos_KM).sum(1))
    rank_i2t_N, rank_t2i_M = torch.cat(i2t), torch.cat(t2i)
    out = {}
    for k in ks:
        if k <= M:
            out[f"i2t_R@{k}"] = float((rank_i2t_N < k).double().mean())
        if k <= N:
            out[f"t2i_R@{k}"] = float((rank_t2i_M < k).double().mean())
    out["num_images"], out["num_texts"] = N, M
    return out


@torch.no_grad()
def retrieval(model, tokenizer: Callable, data: Union[str, EvalSet], preprocess: Callable, *, batch_size: int = 64,
              workers: int = 2, device=None, amp: bool = True, show_progress: bool = True,
              ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Retrieval recall@k on image-text shards (``txt`` holds one caption per line). Works under torchrun: each rank
    encodes its share, features are gathered and every rank returns the same metrics."""
    model = unwrap(model)
    device = torch.device(device or next(model.parameters()).device)
    evset = data if isinstance(data, EvalSet) else resolve_retrieval(data)
    rank, world = rank_world()
    was_training = model.training
    model.eval()
    img_idx, img_f, captions, owners = [], [], [], []
    try:
        for idx_B, images_BCHW, caps_B in progress(build_eval_loader(evset, preprocess, batch_size, workers, rank,
                                                                     world), "retrieval", show_progress):
            img_f.append(encode_images(model, images_BCHW, device, amp).cpu())
            img_idx.append(idx_B)
            for i, caps in zip(idx_B.tolist(), caps_B):
                captions += caps
                owners += [i] * len(caps)
        txt_f = encode_texts(model, tokenizer, captions, device, batch_size=max(batch_size, 256), amp=amp).cpu()
    finally:
        model.train(was_training)
    idx_N = gather_cat(torch.cat(img_idx) if img_idx else torch.zeros(0, dtype=torch.long))
    image_ND = gather_cat(torch.cat(img_f) if img_f else torch.zeros(0))
    text_MD = gather_cat(txt_f if captions else torch.zeros(0))
    owner_global_M = torch.tensor(gather_list(owners), dtype=torch.long)
    if idx_N.numel() != idx_N.unique().numel():
        raise RuntimeError("retrieval saw some images more than once across ranks/workers")
    # global sample index -> row in image_ND
    row = torch.full((int(idx_N.max()) + 1 if idx_N.numel() else 0,), -1, dtype=torch.long)
    row[idx_N] = torch.arange(idx_N.numel())
    owner_M = row[owner_global_M] if owner_global_M.numel() else owner_global_M
    return retrieval_metrics(image_ND.to(device), text_MD.to(device), owner_M, ks)
