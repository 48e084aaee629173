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
- ImageNet-style folder: one sub-folder per class (sorted names = class ids). A folder counts as one only when it
  has at least two (non-hidden) sub-folders, every one of them holds at least one image (searched recursively), and no
  image lies loose beside them; anything else (a photo collection, a data root, an empty folder) is refused with a
  one-line description of what was found, so random sub-folders are never scored as classes.
- Plain shards (a directory of ``*.tar`` or a brace pattern): classification needs ``cls`` and a class-name file;
  retrieval needs ``txt``.

Before any worker starts, the first sample of a local shard set is read in the calling process: a set of the wrong
kind (classification samples given as retrieval, or the reverse) is refused there with one line that says which flag
to use, instead of failing inside a DataLoader worker.
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


def _is_image_file(name: str) -> bool:
    return name.lower().endswith(_FOLDER_IMAGE_EXTS) and not name.startswith(".")


def _folder_images(folder: str) -> list[str]:
    """Image files under ``folder`` (recursively, sorted walk order)."""
    out = []
    for dirpath, dirnames, fnames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [os.path.join(dirpath, f) for f in sorted(fnames) if _is_image_file(f)]
    return out


def _names(items: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def describe_folder(root: str) -> str:
    """What a folder holds, for error messages: ``'2 sub-folders (holiday, misc), 3 images, 1 other file (a.txt)'``."""
    entries = sorted(e for e in os.listdir(root) if not e.startswith("."))
    subs = [e for e in entries if os.path.isdir(os.path.join(root, e))]
    files = [e for e in entries if e not in subs]
    images = [f for f in files if _is_image_file(f)]
    tars = [f for f in files if f.endswith(".tar")]
    other = [f for f in files if f not in images and f not in tars]
    parts = [f"{len(subs)} sub-folder(s)" + (f" ({_names(subs)})" if subs else "")]
    if images:
        parts.append(f"{len(images)} loose image(s)")
    if tars:
        parts.append(f"{len(tars)} .tar file(s)")
    if other:
        parts.append(f"{len(other)} other file(s) ({_names(other)})")
    return ", ".join(parts)


def _benchmark_children(root: str) -> list[str]:
    """Sub-folders of ``root`` that are clip_benchmark sets themselves (for a hint when the parent was given)."""
    return [d for d in _class_folders(root) if os.path.isfile(os.path.join(root, d, "test", "nshards.txt"))]


_ZEROSHOT_LAYOUTS = ("a zero-shot set is a clip_benchmark folder (DIR/test/nshards.txt + DIR/classnames.txt), an "
                     "ImageNet-style folder (>= 2 class sub-folders, each holding images, no loose images) or .tar "
                     "shards with --classnames")


def imagenet_folder(root: str) -> tuple[list[str], list[tuple[str, int]]]:
    """``(class folder names, (image path, class id) pairs)`` of an ImageNet-style folder; raises ValueError naming
    what was found when ``root`` is not one (see the module docstring for the rule)."""
    classes = _class_folders(root)
    found = describe_folder(root)
    hint = ""
    nested = _benchmark_children(root)
    if nested:
        hint = f" ({os.path.join(root, nested[0])} is a clip_benchmark set: pass that folder)"
    if len(classes) < 2:
        raise ValueError(f"{root} is not a zero-shot set: found {found}; {_ZEROSHOT_LAYOUTS}{hint}")
    loose = [f for f in os.listdir(root) if _is_image_file(f)]
    if loose:
        raise ValueError(f"{root} is not an ImageNet-style folder: {len(loose)} image(s) lie beside its sub-folders "
                         f"({_names(sorted(loose))}); found {found}; {_ZEROSHOT_LAYOUTS}")
    files, empty = [], []
    for cid, d in enumerate(classes):
        imgs = _folder_images(os.path.join(root, d))
        if not imgs:
            empty.append(d)
        files += [(f, cid) for f in imgs]
    if empty:
        raise ValueError(f"{root} is not an ImageNet-style folder: sub-folder(s) {_names(empty)} hold no images "
                         f"({'/'.join(_FOLDER_IMAGE_EXTS)}); found {found}; {_ZEROSHOT_LAYOUTS}{hint}")
    return classes, files


def _looks_like_class_folder(root: str) -> bool:
    try:
        imagenet_folder(root)
    except ValueError:
        return False
    return True


def _has_tars(root: str) -> bool:
    return any(f.endswith(".tar") for f in os.listdir(root))


def peek_sample(urls: Sequence[str]) -> Optional[dict]:
    """The first sample of the first local shard (read in this process), or None for remote / empty shards."""
    from webdataset.tariterators import tarfile_samples

    local = [u for u in urls[:1] if is_local(u)]
    if not local:
        return None
    try:
        return next(iter(tarfile_samples([{"url": local[0]}])), None)
    except Exception as e:  # a tar that cannot be read at all: say so here, in one line
        raise ValueError(f"cannot read shard {local[0]}: {type(e).__name__}: {e}") from None


def check_sample_kind(urls: Sequence[str], task: str, path: str) -> None:
    """Refuse a set of the wrong kind from its first sample: retrieval needs ``txt`` captions, classification a
    ``cls`` class id; the message says which flag the data belongs to."""
    sample = peek_sample(urls)
    if sample is None:
        return
    keys = sorted(k for k in sample if not k.startswith("__"))
    where = f"{path} (first sample '{sample.get('__key__')}' has {', '.join(keys) or 'no files'})"
    if not any(e in sample for e in IMAGE_EXTS):
        raise ValueError(f"{where}: no image ({'/'.join(IMAGE_EXTS)}); evaluation needs image samples")
    if task == "retrieval" and "txt" not in sample:
        todo = "it is a classification set: pass it as --zeroshot" if "cls" in sample else \
            "retrieval needs one or more 'txt' captions per image"
        raise ValueError(f"{where}: no 'txt' captions; {todo}, not --retrieval")
    if task == "classification" and "cls" not in sample:
        todo = "it is an image-text set: pass it as --retrieval" if "txt" in sample else \
            "zero-shot needs a 'cls' class id per image"
        raise ValueError(f"{where}: no 'cls' class id; {todo}, not --zeroshot")


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
    """Find out which layout ``path`` is and load class names and templates (files given here take precedence).

    A local folder is a clip_benchmark set, a folder of ``.tar`` shards, or an ImageNet-style folder (rule in the
    module docstring); anything else is refused with what was found."""
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
            check_sample_kind(urls, "classification", path)
            if names is None:
                names = read_lines(os.path.join(path, "classnames.txt"), "class names")
            if temps is None and os.path.isfile(os.path.join(path, "zeroshot_classification_templates.txt")):
                temps = read_lines(os.path.join(path, "zeroshot_classification_templates.txt"), "templates")
            return EvalSet("shards", "classification", urls=urls, classnames=names,
                           templates=temps or default_templates())
        if not _has_tars(path):
            folders, files = imagenet_folder(path)
            if names is None:
                names = _default_classnames(folders)
            elif len(names) != len(folders):
                raise ValueError(f"{classnames} lists {len(names)} class names but {path} has {len(folders)} class "
                                 "folders; they must match one to one (folders sorted by name)")
            return EvalSet("folder", "classification", files=files, classnames=names,
                           templates=temps or default_templates(), num_samples=len(files))
    # plain shards: class names from the classnames.txt beside them (what make_shards --images-only writes)
    urls = [u for src in expand_spec(path) for u in src]
    check_shards_exist(urls, path)
    check_sample_kind(urls, "classification", path)
    folders = {os.path.dirname(u) for u in urls if is_local(u)}
    if names is None and len(folders) == 1 and os.path.isfile(os.path.join(*folders, "classnames.txt")):
        names = read_lines(os.path.join(*folders, "classnames.txt"), "class names")
    if names is None:
        raise ValueError(f"zero-shot data {path} is plain shards: pass --classnames FILE (one class name per line, in "
                         "class-id order), or use the clip_benchmark layout (DIR/test/nshards.txt, DIR/classnames.txt)")
    return EvalSet("shards", "classification", urls=urls, classnames=names, templates=temps or default_templates())


def resolve_retrieval(path: str, split: str = "test") -> EvalSet:
    """Retrieval shards: a clip_benchmark retrieval folder, a directory of ``*.tar``, or a brace pattern. A
    classification set (clip_benchmark metadata, an ImageNet-style folder, or ``cls``-only samples) is refused with
    the flag it belongs to."""
    urls = None
    if is_local(path) and os.path.isdir(path):
        urls = _clip_benchmark_shards(path, split)
        kind_file = os.path.join(path, "dataset_type.txt")
        kind = read_lines(kind_file, "dataset type")[0].lower() if os.path.isfile(kind_file) else None
        if urls is not None and (kind not in (None, "retrieval") or (
                kind is None and os.path.isfile(os.path.join(path, "classnames.txt")))):
            why = f"dataset_type.txt says '{kind}'" if kind else "it has classnames.txt"
            raise ValueError(f"{path} is a zero-shot classification set ({why}): pass it as --zeroshot, "
                             "not --retrieval")
        if urls is None and not _has_tars(path) and _looks_like_class_folder(path):
            raise ValueError(f"{path} is an ImageNet-style class folder (zero-shot): pass it as --zeroshot; "
                             "--retrieval needs image-text shards (.tar with 'txt' captions)")
    if urls is None:
        urls = [u for src in expand_spec(path) for u in src]
        check_shards_exist(urls, path)
    check_sample_kind(urls, "retrieval", path)
    return EvalSet("shards", "retrieval", urls=urls)


def describe_evalset(evset: EvalSet, path: str) -> str:
    """One line saying what an evaluation set was recognised as (printed by ``evaclip eval``: never silent)."""
    if evset.kind == "folder":
        return (f"ImageNet-style folder {path}: {len(evset.classnames)} classes ({_names(evset.classnames)}), "
                f"{evset.num_samples} images")
    what = "classification shards" if evset.task == "classification" else "image-text shards"
    classes = f", {len(evset.classnames)} classes" if evset.classnames else ""
    return f"{what} {path}: {len(evset.urls)} shard(s){classes}"


def _captions(raw: bytes) -> list[str]:
    caps = [c.strip() for c in raw.decode("utf-8").splitlines()]
    return [c for c in caps if c]


class ShardEvalDataset(IterableDataset):
    """Streams ``(index, image_CHW, target)`` for this rank's and worker's share of the samples, in global order.

    Samples outside the share are skipped before decoding (only their tar bytes are read). ``target`` is the class
    id (classification) or ``(captions, class id or None)`` (retrieval).
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
                caps = _captions(sample["txt"])
                if not caps:
                    raise ValueError(f"{where} has an empty caption")
                cls = int(sample["cls"].decode("utf-8").strip()) if "cls" in sample else None
                target = (caps, cls)  # cls: optional class id, for the class-aware recall
            else:
                if "cls" not in sample:
                    raise ValueError(f"{where} has no 'cls' class id; keys: {sorted(sample)}")
                target = int(sample["cls"].decode("utf-8").strip())
                n = len(self.evset.classnames)
                if not 0 <= target < n:
                    raise ValueError(f"{where} has class id {target}, outside the {n} class names")
            try:
                image = decode_image(sample[ext])
            except Exception as e:  # PIL raises many types on bad bytes: name the sample, in one line
                raise ValueError(f"{where}: unreadable {ext} image ({type(e).__name__}); fix or remove it") from None
            yield i, self.preprocess(image), target


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
        try:
            with Image.open(path) as img:
                image = img.convert("RGB")
        except Exception as e:  # PIL raises many types on bad files: name the file, in one line
            raise ValueError(f"unreadable image {path} ({type(e).__name__}); fix or remove it") from None
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
