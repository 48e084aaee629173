"""Zero-shot classification and image-text retrieval: the in-training hook ``evaluate`` and ``evaclip eval``.

    evaclip eval CKPT --zeroshot DATA [--classnames FILE --templates FILE] [--retrieval DATA] [--out results.json]
    torchrun --nproc_per_node 8 -m evaclip.evals CKPT --zeroshot /data/imagenet/val
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Optional

from evaclip.evals.common import load_model, rank_world
from evaclip.evals.retrieval import retrieval, retrieval_metrics
from evaclip.evals.zeroshot import build_classifier, classification_metrics, zero_shot
from evaclip.models.attention import AttentionBackendError

# errors that mean "the input is wrong" (not a bug): the CLIs print them as one line
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, AttentionBackendError)

__all__ = ["evaluate", "zero_shot", "retrieval", "build_classifier", "classification_metrics", "retrieval_metrics",
           "load_model", "main"]


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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaclip eval", description="Zero-shot classification and retrieval of a "
                                "checkpoint (a training checkpoint folder or a state-dict file).")
    p.add_argument("checkpoint", help="training checkpoint folder (RUN/ckpt/step_N) or a .safetensors / .pt file")
    p.add_argument("--model", default=None, help="architecture name (needed for a bare state-dict file)")
    p.add_argument("--zeroshot", default=None, help="clip_benchmark webdataset dir, ImageNet-style folder, or shards")
    p.add_argument("--classnames", default=None, help="class names, one per line in class-id order")
    p.add_argument("--templates", default=None, help="prompt templates, one per line, with {c} for the class name")
    p.add_argument("--retrieval", default=None, help="image-text shards (clip_benchmark dir, folder of .tar, pattern)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--no-amp", action="store_true", help="fp32 on GPU (default: bf16 autocast on GPU)")
    p.add_argument("--attn-backend", default="auto", choices=("auto", "flash_attn", "sdpa", "eager"))
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
    from evaclip.config import load_config
    from evaclip.distributed import cleanup, init_distributed

    env = init_distributed(load_config(overrides={"device": args.device}))
    try:
        return _run(args, env)
    except USER_ERRORS as e:  # bad paths, layouts, names: one clear line, no traceback
        print(f"evaclip eval: error: {e}", file=sys.stderr)
        return 2
    finally:
        cleanup()


def _run(args, env) -> int:
    """Load, evaluate, print (rank 0) and write JSON."""
    model, name = load_model(args.checkpoint, args.model, env.device, args.attn_backend)
    preprocess, tokenizer = eval_transforms_and_tokenizer(model.cfg)
    kw = dict(batch_size=args.batch_size, workers=args.workers, device=env.device, amp=not args.no_amp,
              show_progress=not args.quiet)
    results = {}
    if args.zeroshot:
        res = zero_shot(model, tokenizer, args.zeroshot, preprocess, classnames=args.classnames,
                        templates=args.templates, **kw)
        results.update({f"zeroshot/{k}": v for k, v in res.items()})
    if args.retrieval:
        res = retrieval(model, tokenizer, args.retrieval, preprocess, **kw)
        results.update({f"retrieval/{k}": v for k, v in res.items()})
    if rank_world()[0] == 0:
        print(format_table(results))
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump({"checkpoint": str(args.checkpoint), "model": name, "zeroshot": args.zeroshot,
                           "retrieval": args.retrieval, "results": results}, f, indent=2)
    return 0


