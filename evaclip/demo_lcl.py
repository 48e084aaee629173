"""LCL against CLIP from scratch on the digits, at the same steps and image-tower FLOPs (issue 19; docs/DEMO.md).

Per seed, three runs of the same image tower (EVA02-CLIP-demo, token drop 0.5 for the whole run), from scratch:

- ``lcl``: the ``demo_lcl_cpu`` recipe (pairs and the digit documents of ``data_tools.make_demo_docs``, half of each
  batch's rows each; generation weight 1.0, contrastive 0.1);
- ``lcl_c0``: the same with ``lcl.contrastive_weight=0`` (the generation-only ablation: the LM's state at ``<boi>`` is
  never tied to the image embedding, so zero-shot through it should stay at chance, 10 %);
- ``clip``: the ``demo_cpu`` recipe (CLIP, the same LAMB, lr, warmup, steps), with its unmasked tuning phase switched
  off (``model.token_drop_until=null``) and its batch set so that its image tower costs what LCL's does per step:
  LCL's mean images per step (a document row holds several) times the ratio of the two image sides' training FLOPs
  per image (``--flops``: the same trunk, but CLIP's last block computes the CLS token alone and LCL's every patch,
  plus its pooler, so an LCL image costs more).

Reported for each: zero-shot top-1 on the held-out digits through the run's own text side (CLIP's text tower; LCL's
LM with prompt + ``<boi>``) and k-NN top-1 (k 20, the held-out digits against the training digits as scanned) of the
image embedding (CLIP's image feature; LCL's pooled latent), at ``EVAL_EVERY`` steps. Not part of ``make demo``.

    python -m evaclip.demo_lcl --data demo_data --runs runs/lcl --seeds 0 1 2 --table docs/DEMO.md
    python -m evaclip.demo_lcl --flops          # image-tower training FLOPs per image of both models

Runs land in ``RUNS/seed<N>/{lcl, lcl_c0, clip}``; a second invocation finds finished runs (``resume=auto``).
``key=value`` arguments override every run (``max_steps=20`` for a quick check).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

from evaclip.demo import KNN, TEACHER, TOP1, build_data, curve, run_stage, write_table

RECIPE = "demo_lcl_cpu"
ARMS = ("lcl", "lcl_c0", "clip")
LABELS = {"lcl": "LCL (generation 1.0 + contrastive 0.1)", "lcl_c0": "LCL, contrastive weight 0 (ablation)",
          "clip": "CLIP from scratch"}
EVAL_EVERY = 100
KNN_K = 20
TABLE_BEGIN, TABLE_END = "<!-- lcl-seeds:begin -->", "<!-- lcl-seeds:end -->"


def build_docs(data_dir: Path, seed: int = 0) -> dict:
    """The digit documents (``docs.json``), built beside the digits first if they are not there yet."""
    path = data_dir / "docs.json"
    if path.is_file():
        return json.loads(path.read_text())
    from data_tools.make_demo_docs import make_demo_docs

    print(f"[demo_lcl] data: building the digit documents in {data_dir}")
    return make_demo_docs(str(data_dir), seed=seed)


def lcl_overrides(info: dict, docs: dict, runs: Path, name: str, extra: list[str]) -> list[str]:
    """Where the LCL recipe's data and monitors are, and its run folder."""
    return [f"output_dir={runs}", f"name={name}", "resume=auto", f"data.train={info['train']}",
            f"lcl_data.docs={docs['docs']}", f"eval.zeroshot={info['zeroshot']}", f"eval.every={EVAL_EVERY}",
            f"lcl.knn_train={info['knn_train']}", f"lcl.knn_val={info['knn_val']}", f"lcl.knn_k={KNN_K}", *extra]


def images_per_step(info: dict, docs: dict, runs: Path, extra: list[str]) -> dict:
    """The images an LCL run of ``demo_lcl_cpu`` feeds its image tower, counted over the run's steps by reading its
    loader (seed 0; cached in ``RUNS/lcl_images_per_step_<steps>.json``): ``{"steps", "images", "mean", "rows"}``."""
    import torch

    from evaclip.config import load_config
    from evaclip.distributed import DistEnv
    from evaclip.tasks.lcl import LCLTask

    cfg = load_config(RECIPE, lcl_overrides(info, docs, runs, "count", extra + ["seed=0"]))
    cache = runs / f"lcl_images_per_step_{cfg.max_steps}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    data = LCLTask(cfg, DistEnv(device=torch.device("cpu"))).build_data(cfg.max_steps)
    steps, images, epoch = 0, 0, 0
    while steps < cfg.max_steps:
        data.set_epoch(epoch)
        for batch in data.loader:
            images += batch.images_NCHW.shape[0]
            steps += 1
            if steps == cfg.max_steps:
                break
        epoch += 1
    out = {"steps": steps, "images": images, "mean": images / steps, "rows": cfg.data.batch_size}
    runs.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(out, indent=1))
    return out


def clip_knn(summary: dict, info: dict) -> Optional[float]:
    """k-NN top-1 of a finished CLIP run's image embedding, as the LCL task's monitor computes it for the pooled
    latent (same sets, k, temperature); cached in the run's ``demo_knn.json``."""
    run = Path(summary["run"])
    cache = run / "demo_knn.json"
    if cache.is_file():
        return json.loads(cache.read_text())["knn/top1"]
    from evaclip.evals import eval_transforms_and_tokenizer
    from evaclip.evals.knn import knn_top1
    from evaclip.runs import load_model

    model, _ = load_model(str(run), device="cpu", attn_backend="sdpa", amp=False)
    preprocess, _ = eval_transforms_and_tokenizer(model.cfg)
    res = knn_top1(model.encode_image, info["knn_train"], info["knn_val"], preprocess, k=KNN_K, temperature=0.07,
                   batch_size=128, workers=1, device="cpu", amp=False)
    cache.write_text(json.dumps(res, indent=1))
    return res["knn/top1"]


def seed_runs(info: dict, docs: dict, runs: Path, seed: int, clip_batch: int, extra: list[str],
              arms: tuple[str, ...] = ARMS) -> dict:
    """The runs of one seed (``arms``, all three by default); returns their zero-shot and k-NN curves and seconds."""
    d = runs / f"seed{seed}"
    row = {"seed": seed, "seconds": {}, "zeroshot": {}, "knn": {}}
    for name in arms:
        if name == "clip":
            # the caller's overrides first: the batch and the constant token drop are what make the FLOPs equal
            s = run_stage(TEACHER, [*extra, f"output_dir={d}", f"name={name}", "resume=auto",
                                    f"data.train={info['train']}", f"eval.zeroshot={info['zeroshot']}",
                                    f"eval.every={EVAL_EVERY}", "model.token_drop_until=null",
                                    f"data.batch_size={clip_batch}", "log.tensorboard=false", f"seed={seed}"])
            row["knn"][name] = {s["steps"]: clip_knn(s, info)}
        else:
            c0 = ["lcl.contrastive_weight=0"] if name == "lcl_c0" else []
            s = run_stage(RECIPE, lcl_overrides(info, docs, d, name, c0 + ["log.tensorboard=false", f"seed={seed}",
                                                                          *extra]))
            row["knn"][name] = curve(Path(s["run"]), KNN)
        row["zeroshot"][name], row["seconds"][name] = curve(Path(s["run"]), TOP1), s["seconds"]
        row.setdefault("steps", s["steps"])
    return row


def tower_flops_per_image(arm: str, batch: int = 8) -> dict[str, float]:
    """Training FLOPs per image (forward + backward at token drop 0.5, the runs' setting) of the image tower's trunk
    (the same module in both models: the patch tokens after the final norm) and of the whole image side (CLIP: with
    its head, the image embedding; LCL: with its pooler, the pooled latent and the per-patch latents)."""
    import torch

    from evaclip.bench.flops import count_flops
    from evaclip.models import create_model
    from evaclip.models.lcl import create_lcl

    if arm == "clip":
        model = create_model("EVA02-CLIP-demo", attn_backend="sdpa", token_drop=0.5).train()
        whole = lambda x: model.encode_image(x).sum()  # noqa: E731
    else:
        model = create_lcl("EVA02-CLIP-demo", 128, attn_backend="sdpa", token_drop=0.5).train()
        whole = lambda x: sum(t.sum() for t in model.image_latents(x))  # noqa: E731
    s = model.cfg.vision.image_size
    x = torch.randn(batch, 3, s, s)
    return {"trunk": count_flops(lambda: model.visual.forward_features(x).sum().backward()) / batch,
            "whole": count_flops(lambda: whole(x).backward()) / batch}


def clip_batch_size(per_step: dict, flops: dict) -> int:
    """CLIP's batch at the image-side training FLOPs of an LCL step."""
    return round(per_step["mean"] * flops["lcl"]["whole"] / flops["clip"]["whole"])


def _pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _final(c: dict) -> Optional[float]:
    return c[max(c)] if c else None


def lcl_table(rows: list[dict], per_step: dict, flops: Optional[dict] = None) -> str:
    """Markdown: per seed and run, zero-shot top-1 at each evaluated step, final k-NN top-1, seconds; then means."""
    steps = sorted({s for r in rows for a in ARMS for s in r["zeroshot"][a]})
    head = " | ".join(f"zero-shot {s}" for s in steps)
    out = [f"| seed | run | {head} | k-NN top-1 | seconds |", "|---:|---|" + "---:|" * (len(steps) + 2)]
    for r in rows:
        for a in ARMS:
            z = r["zeroshot"][a]
            out.append(f"| {r['seed']} | {LABELS[a]} | " + " | ".join(_pct(z.get(s)) for s in steps)
                       + f" | {_pct(_final(r['knn'][a]))} | {r['seconds'][a]:.0f} |")
    out.append("")
    for a in ARMS:
        zs = [_final(r["zeroshot"][a]) for r in rows if r["zeroshot"][a]]
        ks = [_final(r["knn"][a]) for r in rows if r["knn"][a]]
        if zs or ks:
            mean = lambda v: sum(v) / len(v) if v else None  # noqa: E731
            out.append(f"- {LABELS[a]}, {steps[-1] if steps else '?'} steps: zero-shot mean {_pct(mean(zs))} % "
                       f"(worst {_pct(min(zs) if zs else None)}), k-NN mean {_pct(mean(ks))} % ({len(rows)} seeds).")
    clip_batch = clip_batch_size(per_step, flops)
    out.append(f"- Images through the image tower per step: LCL {per_step['mean']:.1f} on average ({per_step['rows']} "
               f"rows: pairs and documents; counted over {per_step['steps']} steps of its loader), CLIP {clip_batch} "
               "(its batch).")
    if flops:
        lcl_g, clip_g = per_step["mean"] * flops["lcl"]["whole"] / 1e9, clip_batch * flops["clip"]["whole"] / 1e9
        out.append(f"- Image-side training FLOPs per step: LCL {lcl_g:.1f} G, CLIP {clip_g:.1f} G.")
        out.append("- Image-side training FLOPs per image at token drop 0.5 (`python -m evaclip.demo_lcl --flops`): "
                   f"the image tower's trunk {flops['clip']['trunk'] / 1e6:.1f} M in both; with the readout, CLIP "
                   f"(head) {flops['clip']['whole'] / 1e6:.1f} M, LCL (attentive pooler: pooled and per-patch "
                   f"latents) {flops['lcl']['whole'] / 1e6:.1f} M.")
    return "\n".join(out)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m evaclip.demo_lcl", description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=Path("demo_data"), help="the digits data (built if missing)")
    p.add_argument("--runs", type=Path, default=Path("runs/lcl"), help="run folders: RUNS/seed<N>/...")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the runs")
    p.add_argument("--table", type=Path, default=None, help="write the table between the lcl-seeds markers")
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS),
                   help="only these runs of each seed (to spread a table's runs over processes; no table then: run "
                        "again without --arms, which finds them finished)")
    p.add_argument("--flops", action="store_true", help="only print the image-tower FLOPs per image of both models")
    p.add_argument("overrides", nargs="*", help="key=value for every run (e.g. max_steps=20)")
    args = p.parse_args(argv)
    flops = {"clip": tower_flops_per_image("clip"), "lcl": tower_flops_per_image("lcl")}
    if args.flops:
        for a, f in flops.items():
            print(f"{a}: image tower trunk {f['trunk'] / 1e6:.1f} MFLOPs, with its readout {f['whole'] / 1e6:.1f} "
                  "MFLOPs per image (forward + backward, token drop 0.5)")
        return 0
    info, docs = build_data(args.data), build_docs(args.data)
    per_step = images_per_step(info, docs, args.runs, args.overrides)
    clip_batch = clip_batch_size(per_step, flops)
    print(f"[demo_lcl] LCL feeds {per_step['mean']:.1f} images per step: CLIP batch {clip_batch} (the same image-side "
          "FLOPs per step)")
    arms = tuple(a for a in ARMS if a in args.arms)
    rows = [seed_runs(info, docs, args.runs, s, clip_batch, args.overrides, arms) for s in args.seeds]
    if arms != ARMS:
        print(f"[demo_lcl] ran {', '.join(arms)} of seeds {args.seeds}; the table needs all three runs of each seed")
        return 0
    table = lcl_table(rows, per_step, flops)
    print(table)
    if args.table is not None:
        write_table(args.table, table, TABLE_BEGIN, TABLE_END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
