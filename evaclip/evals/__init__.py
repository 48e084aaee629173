"""Zero-shot classification and image-text retrieval: the in-training hook ``evaluate`` and ``evaclip eval``.

    evaclip eval RUN_OR_CKPT --zeroshot DATA [--classnames FILE --templates FILE] [--retrieval DATA] [--out F]
    torchrun --nproc_per_node 8 -m evaclip.evals CKPT --zeroshot /data/imagenet/val

A run folder (``runs/NAME``) stands for its newest complete checkpoint; the one used is printed and recorded in the
results JSON (``checkpoint_used``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Optional

from evaclip.checkpoint import resolve_checkpoint
from evaclip.evals.common import rank_world
from evaclip.evals.retrieval import retrieval, retrieval_metrics, retrieval_notes
from evaclip.evals.zeroshot import build_classifier, classification_metrics, zero_shot
from evaclip.models.attention import AttentionBackendError
from evaclip.runs import load_model

# errors that mean "the input is wrong" (not a bug): the CLIs print them as one line
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, AttentionBackendError)

__all__ = ["evaluate", "zero_shot", "retrieval", "build_classifier", "classification_metrics", "retrieval_metrics",
           "main"]


def evaluate(model, cfg_eval, tokenizer: Callable, preprocess: Callable, device, *, amp: bool = True,
             show_progress: bool = False) -> dict:
    """Run the evaluations ``cfg_eval`` (an ``EvalCfg``) declares; returns ``{"zeroshot/top1": ..., "retrieval/i2t_R@1":
    ...}`` for logging beside the training metrics. Every rank must call it (work is split, results gathered).

    The zero-shot classifier is built once per call, from the model's current weights. The model is put in eval mode
    and restored to its previous mode afterwards.
    """
    out = {}
    workers = getattr(cfg_eval, "workers", 2)
    if cfg_eval.zeroshot:
        res = zero_shot(model, tokenizer, cfg_eval.zeroshot, preprocess,
                        classnames=getattr(cfg_eval, "classnames", None),
                        templates=getattr(cfg_eval, "templates", None),
                        batch_size=cfg_eval.batch_size, workers=workers, device=device, amp=amp,
                        show_progress=show_progress)
        out.update({f"zeroshot/{k}": v for k, v in res.items()})
    if cfg_eval.retrieval:
        res = retrieval(model, tokenizer, cfg_eval.retrieval, preprocess, batch_size=cfg_eval.batch_size,
                        workers=workers, device=device, amp=amp, show_progress=show_progress)
        out.update({f"retrieval/{k}": v for k, v in res.items()})
    return out


def eval_transforms_and_tokenizer(model):
    """The eval image transform and the tokenizer (open_clip's, via evaclip.data) for an architecture name or its
    ``CLIPCfg`` (``model.cfg``: includes create_model overrides such as the image size)."""
    from evaclip.data.transforms import get_tokenizer, get_transforms

    return get_transforms(model, train=False), get_tokenizer(model)


def format_table(results: dict) -> str:
    """A two-column text table of metric -> value (fractions shown as percentages)."""
    rows = [(k, f"{100 * v:.2f}" if isinstance(v, float) else str(v)) for k, v in results.items()]
    w = max((len(k) for k, _ in rows), default=6)
    lines = [f"{'metric':<{w}}  value", f"{'-' * w}  ------"] + [f"{k:<{w}}  {v}" for k, v in rows]
    return "\n".join(lines)


def one_line(e: BaseException) -> str:
    """An exception as one line. Errors raised in a DataLoader worker come back wrapped in the worker's traceback
    ("Caught ValueError in DataLoader worker process 0. Original Traceback ..."): keep only the original message."""
    text = str(e).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1].strip()
        name, sep, msg = last.partition(": ")
        text = msg if sep and name.replace(".", "").replace("_", "").isalnum() else last
    return " ".join(text.split())


CHECKPOINT_HELP = ("a run folder (RUN, e.g. runs/demo_cpu: its newest complete checkpoint is used and printed), a "
                   "training checkpoint folder (RUN/ckpt/step_N), or a .safetensors / .pt state-dict file "
                   "(with --model)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="evaclip eval", description="Zero-shot classification and image-text retrieval of a run or checkpoint. "
        "Prints a table (and the checkpoint used); --out also writes it as JSON.",
        epilog="zero-shot data: a clip_benchmark webdataset folder (DIR/test/nshards.txt + DIR/classnames.txt), an "
        "ImageNet-style folder (>= 2 class sub-folders, every one holding images, no loose images), or .tar shards "
        "with 'cls' ids plus --classnames. Retrieval data: .tar shards with 'txt' captions (a clip_benchmark "
        "retrieval folder, a folder of .tar, or a brace pattern like 'dir/{0..9}.tar'; no globs); samples that also "
        "carry 'cls' add class-aware recall. Example: evaclip eval runs/demo_cpu --zeroshot demo_data/zeroshot "
        "--retrieval demo_data/retrieval --out results.json")
    p.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT", help=CHECKPOINT_HELP)
    p.add_argument("--model", default=None, help="architecture name (needed for a bare state-dict file)")
    p.add_argument("--zeroshot", default=None, metavar="DATA",
                   help="clip_benchmark webdataset folder, ImageNet-style folder, or .tar shards with --classnames")
    p.add_argument("--classnames", default=None, help="class names, one per line in class-id order")
    p.add_argument("--templates", default=None, help="prompt templates, one per line, with {c} for the class name")
    p.add_argument("--retrieval", default=None, metavar="DATA",
                   help="image-text shards: clip_benchmark retrieval folder, folder of .tar, or brace pattern; "
                   "recall@k by clip_benchmark's protocol (i2t_R@k, t2i_R@k), ties as misses (strict_*), and "
                   "class-aware (class_*) when samples carry cls")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: 64)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (default: 2; 0 = in-process)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: auto (CUDA if there)")
    p.add_argument("--no-amp", action="store_true", help="fp32 on GPU (default: bf16 autocast on GPU)")
    p.add_argument("--attn-backend", default="auto", choices=("auto", "flash_attn", "sdpa", "eager"),
                   help="attention implementation (default: auto)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: Optional[list] = None) -> int:
    """``evaclip eval``: prints a table and optionally writes JSON; under torchrun every rank takes a share."""
    args = _parser().parse_args(argv)
    if not args.zeroshot and not args.retrieval:
        _parser().error("nothing to evaluate: give --zeroshot DATA and/or --retrieval DATA")
    if (args.classnames or args.templates) and not args.zeroshot:
        _parser().error("--classnames / --templates apply to --zeroshot")
    if args.batch_size < 1:
        _parser().error("--batch-size must be >= 1")
    if args.workers < 0:
        _parser().error("--workers must be >= 0")
    from evaclip.distributed import cleanup, init_distributed

    env = init_distributed(args.device)
    try:
        return _run(args, env)
    except USER_ERRORS as e:  # bad paths, layouts, names: one clear line, no traceback
        print(f"evaclip eval: error: {one_line(e)}", file=sys.stderr)
        return 2
    finally:
        cleanup()


def _run(args, env) -> int:
    """Resolve the data (bad data fails before the model loads), load, evaluate, print (rank 0) and write JSON."""
    from evaclip.evals.data import describe_evalset, resolve_retrieval, resolve_zeroshot

    rank0 = rank_world()[0] == 0
    zs_set = resolve_zeroshot(args.zeroshot, args.classnames, args.templates) if args.zeroshot else None
    rt_set = resolve_retrieval(args.retrieval) if args.retrieval else None
    used = resolve_checkpoint(args.checkpoint)
    if rank0:
        picked = f" (newest complete checkpoint of run folder {args.checkpoint})" if \
            str(used) != str(args.checkpoint) else ""
        print(f"checkpoint: {used}{picked}")
        for what, evset, path in (("zero-shot", zs_set, args.zeroshot), ("retrieval", rt_set, args.retrieval)):
            if evset is not None:
                print(f"{what}: {describe_evalset(evset, path)}")
    model, name = load_model(str(used), args.model, env.device, args.attn_backend, amp=not args.no_amp)
    preprocess, tokenizer = eval_transforms_and_tokenizer(model.cfg)
    kw = dict(batch_size=args.batch_size, workers=args.workers, device=env.device, amp=not args.no_amp,
              show_progress=not args.quiet)
    results = {}
    if zs_set is not None:
        res = zero_shot(model, tokenizer, zs_set, preprocess, **kw)
        results.update({f"zeroshot/{k}": v for k, v in res.items()})
    if rt_set is not None:
        res = retrieval(model, tokenizer, rt_set, preprocess, **kw)
        results.update({f"retrieval/{k}": v for k, v in res.items()})
    notes = retrieval_notes(results)
    if rank0:
        print(format_table(results))
        for n in notes:
            print(f"note: {n}")
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump({"checkpoint": str(args.checkpoint), "checkpoint_used": str(used), "model": name,
                           "zeroshot": args.zeroshot, "retrieval": args.retrieval, "results": results,
                           "notes": notes}, f, indent=2)
    return 0
