"""Evaluation data: zero-shot classification sets and image-text retrieval sets, split across ranks.

Shapes: B batch, C channels, H/W image height/width.

Every loader yields ``(idx_B, images_BCHW, targets)`` where ``idx_B`` are global sample indices (position in the
dataset's fixed order), so results computed on several ranks can be gathered and checked for completeness. Sample ``i``
belongs to rank ``i % world_size`` (and, within a rank, to DataLoader worker ``(i // world_size) % num_workers``):
no sample is read twice or padded, and the split does not depend on the number of shards.

Supported layouts:
- clip_benchmark webdataset: ``DIR/{split}/nshards.txt`` + ``DIR/{split}/{0..n-1}.tar``, ``DIR/classnames.txt``,
  ``DIR/zeroshot_classification_templates.txt``, optional ``DIR/dataset_type.txt`` (``retrieval``).
  Classification samples carry ``cls``; retrieval samples carry ``txt`` (one caption per line).
- ImageNet-style folder: one sub-folder per class (sorted names = class ids).
- Plain shards (a directory of ``*.tar`` or a brace pattern): classification needs ``cls`` and a class-name file;
  retrieval needs ``txt``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset

from evaclip.data.shards import check_shards_exist, decode_image, expand_spec, is_local

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_FOLDER_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass
class EvalSet:
    """A resolved evaluation set: where the samples are and what they mean."""

    kind: str  # "shards" | "folder"
    task: str  # "classification" | "retrieval"
    urls: list = field(default_factory=list)  # shards (kind == "shards")
    files: list = field(default_factory=list)  # (path, class id) pairs (kind == "folder")
    classnames: Optional[list] = None
    templates: Optional[list] = None  # format strings with "{c}", or callables classname -> prompt
    num_samples: Optional[int] = None  # known up front for folders; None for shards


def read_lines(path: str, what: str) -> list[str]:
    """Non-empty stripped lines of a text file; a missing or empty file is an error naming ``what``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file not found: {path}")
    with open(path, encoding="utf-8") as f:
        lines = [ln.strip() for ln in f.read().splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines:
        raise ValueError(f"{what} file is empty: {path}")
    return lines


def _clip_benchmark_shards(root: str, split: str) -> Optional[list[str]]:
    nshards = os.path.join(root, split, "nshards.txt")
    if not os.path.isfile(nshards):
        return None
    with open(nshards) as f:
        n = int(f.read().strip())
    urls = [os.path.join(root, split, f"{i}.tar") for i in range(n)]
    check_shards_exist(urls, nshards)
    return urls


def _class_folders(root: str) -> list[str]:
    return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))


def _default_classnames(folder_names: Sequence[str]) -> list[str]:
    """ImageNet class folders (1000 wnids) -> open_clip's curated names; otherwise folder names made readable."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    wnids = all(n.startswith("n") and n[1:].isdigit() for n in folder_names)
    if len(folder_names) == len(IMAGENET_CLASSNAMES) and wnids:
        return list(IMAGENET_CLASSNAMES)
    return [n.replace("_", " ") for n in folder_names]


def default_templates() -> list:
    """OpenAI's 80 ImageNet prompt templates (from open_clip): generic enough for any object-class set."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return list(OPENAI_IMAGENET_TEMPLATES)


def resolve_zeroshot(path: str, classnames: Optional[str] = None, templates: Optional[str] = None,
                     split: str = "test") -> EvalSet:
    """Find out which layout ``path`` is and load class names and templates (files given here take precedence)."""
    urls = None
    names = read_lines(classnames, "class names") if classnames else None
    temps = read_lines(templates, "templates") if templates else None
    if is_local(path) and os.path.isdir(path):
        urls = _clip_benchmark_shards(path, split)
        if urls is not None:  # clip_benchmark layout: metadata next to the split folder
            kind_file = os.path.join(path, "dataset_type.txt")
            if os.path.isfile(kind_file) and read_lines(kind_file, "dataset type")[0].lower() == "retrieval":
                raise ValueError(f"{path} is a retrieval set (dataset_type.txt): pass it as --retrieval, "
                                 "not --zeroshot")
            if names is None:
                names = read_lines(os.path.join(path, "classnames.txt"), "class names")
            if temps is None and os.path.isfile(os.path.join(path, "zeroshot_classification_templates.txt")):
                temps = read_lines(os.path.join(path, "zeroshot_classification_templates.txt"), "templates")
            return EvalSet("shards", "classification", urls=urls, classnames=names,
                           templates=temps or default_templates())
        folders = _class_folders(path)
        if folders:
            files = []
            for cid, d in enumerate(folders):
                for dirpath, _, fnames in sorted(os.walk(os.path.join(path, d))):
                    files += [(os.path.join(dirpath, f), cid) for f in sorted(fnames)
                              if f.lower().endswith(_FOLDER_IMAGE_EXTS)]
            if not files:
                raise FileNotFoundError(f"no images found under the class folders of {path}")
            if names is None:
                names = _default_classnames(folders)
            elif len(names) != len(folders):
                raise ValueError(f"{classnames} lists {len(names)} class names but {path} has {len(folders)} class "
                                 "folders; they must match one to one (folders sorted by name)")
            return EvalSet("folder", "classification", files=files, classnames=names,
                           templates=temps or default_templates(), num_samples=len(files))
    # plain shards
    urls = [u for src in expand_spec(path) for u in src]
    check_shards_exist(urls, path)
    if names is None:
        raise ValueError(f"zero-shot data {path} is plain shards: pass --classnames FILE (one class name per line, in "
                         "class-id order), or use the clip_benchmark layout (DIR/test/nshards.txt, DIR/classnames.txt)")
    return EvalSet("shards", "classification", urls=urls, classnames=names, templates=temps or default_templates())


def resolve_retrieval(path: str, split: str = "test") -> EvalSet:
    """Retrieval shards: a clip_benchmark retrieval folder, a directory of ``*.tar``, or a brace pattern."""
    urls = _clip_benchmark_shards(path, split) if is_local(path) and os.path.isdir(path) else None
    if urls is None:
        urls = [u for src in expand_spec(path) for u in src]
        check_shards_exist(urls, path)
    return EvalSet("shards", "retrieval", urls=urls)


def _captions(raw: bytes) -> list[str]:
    caps = [c.strip() for c in raw.decode("utf-8").splitlines()]
    return [c for c in caps if c]


class ShardEvalDataset(IterableDataset):
    """Streams ``(index, image_CHW, target)`` for this rank's and worker's share of the samples, in global order.

    Samples outside the share are skipped before decoding (only their tar bytes are read). ``target`` is the class
    id (classification) or the list of captions (retrieval).
    """

    def __init__(self, evset: EvalSet, preprocess: Callable, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.evset, self.preprocess, self.rank, self.world_size = evset, preprocess, rank, world_size

    def _raw(self) -> Iterator[dict]:
        from webdataset.tariterators import tarfile_samples

        def handler(exn):  # a broken shard in an evaluation set must not silently shrink the set
            raise exn

        yield from tarfile_samples(({"url": u} for u in self.evset.urls), handler=handler)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        nw, wid = (info.num_workers, info.id) if info else (1, 0)
        retrieval = self.evset.task == "retrieval"
        for i, sample in enumerate(self._raw()):
            if i % self.world_size != self.rank or (i // self.world_size) % nw != wid:
                continue
            where = f"sample '{sample.get('__key__')}' in {sample.get('__url__')}"
            ext = next((e for e in IMAGE_EXTS if e in sample), None)
            if ext is None:
                raise ValueError(f"{where} has no image ({'/'.join(IMAGE_EXTS)}); keys: {sorted(sample)}")
            if retrieval:
                if "txt" not in sample:
                    raise ValueError(f"{where} has no 'txt' captions; keys: {sorted(sample)}")
                target = _captions(sample["txt"])
                if not target:
                    raise ValueError(f"{where} has an empty caption")
            else:
                if "cls" not in sample:
                    raise ValueError(f"{where} has no 'cls' class id; keys: {sorted(sample)}")
                target = int(sample["cls"].decode("utf-8").strip())
                n = len(self.evset.classnames)
                if not 0 <= target < n:
                    raise ValueError(f"{where} has class id {target}, outside the {n} class names")
            yield i, self.preprocess(decode_image(sample[ext])), target


class FolderEvalDataset(torch.utils.data.Dataset):
    """This rank's share of an ImageNet-style folder: ``(index, image_CHW, class id)``."""

    def __init__(self, evset: EvalSet, preprocess: Callable, rank: int = 0, world_size: int = 1):
        self.files = evset.files
        self.indices = list(range(rank, len(evset.files), world_size))
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int):
        from PIL import Image

        i = self.indices[j]
        path, cid = self.files[i]
        with Image.open(path) as img:
            image = img.convert("RGB")
        return i, self.preprocess(image), cid


def _collate(batch):
    idx, images, targets = zip(*batch)
    images_BCHW = torch.stack(images)
    if isinstance(targets[0], int):
        return torch.tensor(idx), images_BCHW, torch.tensor(targets)
    return torch.tensor(idx), images_BCHW, list(targets)


def build_eval_loader(evset: EvalSet, preprocess: Callable, batch_size: int, workers: int = 2, rank: int = 0,
                      world_size: int = 1) -> DataLoader:
    """A DataLoader over this rank's share of ``evset`` yielding ``(idx_B, images_BCHW, targets)``."""
    if evset.kind == "folder":
        ds = FolderEvalDataset(evset, preprocess, rank, world_size)
        workers = min(workers, max(1, len(ds) // batch_size))
    else:
        ds = ShardEvalDataset(evset, preprocess, rank, world_size)
    return DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=_collate,
                      persistent_workers=False, pin_memory=torch.cuda.is_available())
