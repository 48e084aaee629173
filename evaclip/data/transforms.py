"""Image transforms and tokenizer, reused from open_clip (same preprocessing as open_clip and EVA-CLIP)."""
from __future__ import annotations

from typing import Union

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


def get_tokenizer(model: Union[str, CLIPCfg]):
    """open_clip's CLIP BPE tokenizer (bundled vocabulary, no download) at the model's context length."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=_cfg(model).text.context_length)
