"""Image transforms and tokenizer, reused from open_clip (same preprocessing as open_clip and EVA-CLIP); text padding
trimming. Shapes: B batch, L context length."""
from __future__ import annotations

from typing import Sequence, Union

import torch

from ..models.registry import CLIPCfg, get_model_config

# EVA-CLIP normalises with the OpenAI CLIP statistics
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def _cfg(model: Union[str, CLIPCfg]) -> CLIPCfg:
    return model if isinstance(model, CLIPCfg) else get_model_config(model)


def get_transforms(model: Union[str, CLIPCfg], train: bool):
    """open_clip's train (random resized crop) or eval (resize + center crop) transform for the model's image size."""
    from open_clip.transform import image_transform

    return image_transform(_cfg(model).vision.image_size, is_train=train, mean=MEAN, std=STD)


def mim_train_transform(image_size: int, crop_scale: Sequence[float] = (0.2, 1.0), mean: Sequence[float] = MEAN,
                        std: Sequence[float] = STD):
    """Masked-image-modeling train transform (EVA / EVA-02): one RandomResizedCrop (area ``crop_scale``, aspect 3/4 to
    4/3, bicubic) and a horizontal flip, then the teacher's normalisation (default: the OpenAI CLIP statistics that
    EVA-CLIP teachers use). One view: student and teacher see the same tensor."""
    from torchvision import transforms as T

    lo, hi = (float(x) for x in crop_scale)
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"crop_scale must be (min, max) with 0 < min <= max <= 1, got {tuple(crop_scale)}")
    return T.Compose([
        T.RandomResizedCrop(image_size, scale=(lo, hi), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean=mean, std=std),
    ])


def get_tokenizer(model: Union[str, CLIPCfg]):
    """open_clip's CLIP BPE tokenizer (bundled vocabulary, no download) at the model's context length."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=_cfg(model).text.context_length)


def trim_padding(tokens_BL: torch.Tensor, multiple: int = 8) -> torch.Tensor:
    """Cut a token batch to its longest caption (EOT position + 1) rounded up to ``multiple``, never beyond L.

    Exact for evaclip's text tower: it is causal and pools at the EOT token (the argmax of each row), so positions
    after the last EOT of the batch never reach the output. Rounding to a multiple keeps kernel / torch.compile
    shapes few. Meant for host (CPU) tensors before the copy to the device; on a GPU tensor it would sync.
    Returns a view of ``tokens_BL`` (the input itself when nothing is cut).
    """
    if not isinstance(tokens_BL, torch.Tensor) or tokens_BL.dim() != 2:
        raise ValueError(f"trim_padding expects a B x L token tensor, got {getattr(tokens_BL, 'shape', tokens_BL)!r}")
    if tokens_BL.is_floating_point() or tokens_BL.is_complex() or tokens_BL.dtype == torch.bool:
        raise ValueError(f"trim_padding expects integer token ids, got {tokens_BL.dtype}")
    if not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"trim_padding: multiple must be a positive integer, got {multiple!r}")
    B, L = tokens_BL.shape
    if B == 0 or L == 0:
        return tokens_BL
    longest = int(tokens_BL.argmax(dim=-1).max()) + 1
    n = min(L, -(-longest // multiple) * multiple)
    return tokens_BL if n == L else tokens_BL[:, :n]
