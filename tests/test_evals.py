"""Zero-shot and retrieval metrics, checked exactly with a stub model whose embeddings fix the answers in advance.

Shapes: N images, M captions, C classes, D embedding dim.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import ToTensor

from evaclip.evals import classification_metrics, retrieval, retrieval_metrics, zero_shot
from evaclip.evals.data import ShardEvalDataset, resolve_retrieval, resolve_zeroshot
from evaclip.evals.zeroshot import build_classifier, target_rank


# ----------------------------------------------------------------------------------------------------------------------
# a stub CLIP: image i (its pixel value) -> image_table[i]; text t -> text_table[t]
# ----------------------------------------------------------------------------------------------------------------------
class StubCLIP(torch.nn.Module):
    def __init__(self, image_table_ND, text_table: dict):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # so next(model.parameters()) gives the device
        self.image_table_ND = image_table_ND.float()
        self.texts = list(text_table)
        self.text_table_MD = torch.stack([torch.as_tensor(v, dtype=torch.float) for v in text_table.values()])

    def tokenize(self, texts):
        return torch.tensor([[self.texts.index(t)] for t in texts])

    def encode_image(self, images_BCHW, normalize=False):
        ids = (images_BCHW[:, 0, 0, 0] * 255).round().long()
        return self.image_table_ND[ids]

    def encode_text(self, tokens_BL, normalize=False):
        return self.text_table_MD[tokens_BL[:, 0]]


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((2, 2, 3), i, np.uint8)).save(buf, format="png")
    return buf.getvalue()


def _write_tar(path, samples):
    with tarfile.open(path, "w") as tf:
        for key, files in samples:
            for ext, data in files.items():
                data = data if isinstance(data, bytes) else data.encode()
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))


def _benchmark_dir(root, samples, per_shard, classnames=None, templates=None, dataset_type=None):
    """clip_benchmark webdataset layout: root/test/{0..n-1}.tar + nshards.txt (+ metadata files)."""
    os.makedirs(root / "test")
    shards = [samples[i:i + per_shard] for i in range(0, len(samples), per_shard)]
    for s, chunk in enumerate(shards):
        _write_tar(root / "test" / f"{s}.tar", chunk)
    (root / "test" / "nshards.txt").write_text(f"{len(shards)}\n")
    if classnames:
        (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
    if templates:
        (root / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    if dataset_type:
        (root / "dataset_type.txt").write_text(dataset_type + "\n")
    return root


# The zero-shot case: 6 classes with one-hot class embeddings, 8 images with hand-placed features.
#   sample: feature                         target -> rank of the target (other classes scoring >= it)
ZS_CASES = [
    ([1, 0, 0, 0, 0, 0], 0),  # 0: exact                       -> 0
    ([0, .9, .1, 0, 0, 0], 1),  # close                        -> 0
    ([0, 0, 1, 1, 0, 0], 2),  # tie with class 3 (ties lose)   -> 1: top-5 only
    ([.6, .5, .4, .3, .2, .1], 5),  # target scored last       -> 5: miss
    ([.6, .5, .4, .3, .2, .1], 0),  # target scored first      -> 0
    ([.6, .5, .4, .3, .2, .1], 4),  # 5th                      -> 4: top-5 only
    ([1, 1, 1, 1, 1, 1], 3),  # every class tied               -> 5: miss
    ([0, 0, 0, 1, 0, 0], 3),  # exact                          -> 0
]
ZS_RANKS = [0, 0, 1, 5, 0, 4, 5, 0]
# per class top-1 recall: c0 2/2, c1 1/1, c2 0/1, c3 1/2, c4 0/1, c5 0/1
ZS_EXPECTED = {"top1": 4 / 8, "top5": 6 / 8, "mean_per_class_recall": (1 + 1 + 0 + .5 + 0 + 0) / 6, "num_samples": 8}
CLASSNAMES = [f"class{c}" for c in range(6)]
TEMPLATES = ["a {c}.", "the {c}"]


def _zs_model():
    image_ND = torch.tensor([f for f, _ in ZS_CASES], dtype=torch.float)
    # two templates per class, different norms and a small off-axis part that cancels in the mean
    texts = {}
    for c, name in enumerate(CLASSNAMES):
        e = torch.eye(6)[c]
        off = torch.eye(6)[(c + 1) % 6] * 0.3
        texts[f"a {name}."] = 2 * (e + off)
        texts[f"the {name}"] = 5 * (e - off)
    return StubCLIP(image_ND, texts)


def test_target_rank_and_metrics_known_answers():
    logits_NC = torch.tensor([f for f, _ in ZS_CASES], dtype=torch.float)
    targets_N = torch.tensor([t for _, t in ZS_CASES])
    rank_N = target_rank(logits_NC, targets_N)
    assert rank_N.tolist() == ZS_RANKS
    assert classification_metrics(rank_N, targets_N, 6) == pytest.approx(ZS_EXPECTED)


def test_metrics_match_sklearn_and_topk_without_ties():
    from sklearn.metrics import balanced_accuracy_score

    g = torch.Generator().manual_seed(0)
    logits_NC = torch.randn(300, 17, generator=g)
    targets_N = torch.randint(0, 17, (300,), generator=g)
    logits_NC[torch.arange(0, 300, 3), targets_N[::3]] += 2.0  # some signal so top-1 is not ~1/17
    res = classification_metrics(target_rank(logits_NC, targets_N), targets_N, 17)
    top5_N = logits_NC.topk(5, dim=1).indices
    assert res["top1"] == pytest.approx(float((logits_NC.argmax(1) == targets_N).float().mean()))
    assert res["top5"] == pytest.approx(float((top5_N == targets_N[:, None]).any(1).float().mean()))
    assert res["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(targets_N, logits_NC.argmax(1)))


def test_metrics_reject_bad_input():
    with pytest.raises(FloatingPointError, match="non-finite"):
        target_rank(torch.tensor([[float("nan"), 1.0]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="no samples"):
        classification_metrics(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 3)
    # top-5 is not reported for fewer than 5 classes (it would be trivially 100 %)
    assert "top5" not in classification_metrics(torch.tensor([0, 1]), torch.tensor([0, 1]), 3)


def test_build_classifier_averages_normalised_prompts():
    model = _zs_model()
    W_DC = build_classifier(model, model.tokenize, CLASSNAMES, TEMPLATES, "cpu", batch_size=3)
    for c, name in enumerate(CLASSNAMES):
        f1 = F.normalize(model.text_table_MD[model.texts.index(f"a {name}.")], dim=0)
        f2 = F.normalize(model.text_table_MD[model.texts.index(f"the {name}")], dim=0)
        torch.testing.assert_close(W_DC[:, c], F.normalize(f1 + f2, dim=0))
    assert W_DC.shape == (6, 6)


@pytest.mark.parametrize("workers", [0, 2])
def test_zero_shot_end_to_end_on_benchmark_layout(tmp_path, workers):
    samples = [(f"s{i:03d}", {"png": _png(i), "cls": str(t)}) for i, (_, t) in enumerate(ZS_CASES)]
    root = _benchmark_dir(tmp_path / "zs", samples, per_shard=3, classnames=CLASSNAMES, templates=TEMPLATES)
    model = _zs_model()
    res = zero_shot(model, model.tokenize, str(root), ToTensor(), batch_size=3, workers=workers, show_progress=False)
    assert res == pytest.approx(ZS_EXPECTED)


def test_zero_shot_image_folder(tmp_path):
    # ImageNet layout: one folder per class; folder names become class names
    for i, (_, t) in enumerate(ZS_CASES):
        d = tmp_path / "folder" / f"class{t}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"img{i}.png").write_bytes(_png(i))
    (tmp_path / "templates.txt").write_text("a {c}.\nthe {c}\n")
    model = _zs_model()
    res = zero_shot(model, model.tokenize, str(tmp_path / "folder"), ToTensor(),
                    templates=str(tmp_path / "templates.txt"), batch_size=4, workers=0, show_progress=False)
    assert res == pytest.approx(ZS_EXPECTED)


def test_imagenet_folder_defaults_to_open_clip_names_and_templates(tmp_path):
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    png = _png(0)
    for c in range(1000):  # wnid-named class folders, one image each
        d = tmp_path / "val" / f"n{c:08d}"
        d.mkdir(parents=True)
        (d / "x.png").write_bytes(png)
    evset = resolve_zeroshot(str(tmp_path / "val"))
    assert evset.classnames == list(IMAGENET_CLASSNAMES)
    assert evset.templates == list(OPENAI_IMAGENET_TEMPLATES) and evset.num_samples == 1000
    (tmp_path / "names.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match="lists 2 class names but .* has 1000 class folders"):
        resolve_zeroshot(str(tmp_path / "val"), classnames=str(tmp_path / "names.txt"))


def test_zero_shot_data_errors(tmp_path):
    root = _benchmark_dir(tmp_path / "zs", [("a", {"png": _png(0), "cls": "7"})], 1, classnames=CLASSNAMES,
                          templates=TEMPLATES)
    model = _zs_model()
    with pytest.raises(ValueError, match="class id 7, outside the 6 class names"):
        zero_shot(model, model.tokenize, str(root), ToTensor(), workers=0, show_progress=False)
    with pytest.raises(FileNotFoundError, match="class names file not found"):
        resolve_zeroshot(str(root), classnames=str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="--classnames"):
        resolve_zeroshot(str(root / "test" / "0.tar"))
    with pytest.raises(FileNotFoundError, match="shard not found"):
        resolve_retrieval(str(tmp_path / "nope-{0..1}.tar"))


def test_rank_split_covers_every_sample_once(tmp_path):
    samples = [(f"s{i:03d}", {"png": _png(i), "cls": "0"}) for i in range(11)]
    root = _benchmark_dir(tmp_path / "zs", samples, per_shard=4, classnames=["x"])
    evset = resolve_zeroshot(str(root))
    seen = [i for r in range(3) for i, _, _ in ShardEvalDataset(evset, ToTensor(), rank=r, world_size=3)]
    assert sorted(seen) == list(range(11))


# ----------------------------------------------------------------------------------------------------------------------
# retrieval
# ----------------------------------------------------------------------------------------------------------------------
# 4 one-hot images; 7 captions (owner image, feature). Hand-computed ranks below.
RT_IMAGES = torch.eye(4)
RT_CAPTIONS = [(0, [0, 1, 0, 0]), (0, [.5, 0, 0, 0]), (1, [1, 0, 0, 0]), (2, [0, 0, 1, 0]), (2, [0, 0, 0, 1]),
               (2, [0, 0, .5, 0]), (3, [0, 0, 0, 1])]
# i2t: I0 best own .5, wrong t2=1 above -> 1; I1 own 0, six wrong >= 0 -> 6; I2 own 1 -> 0; I3 own 1 tied by t4 -> 1
# t2i: t0 -> 3, t1 -> 0, t2 -> 3, t3 -> 0, t4 -> 3, t5 -> 0, t6 -> 0
RT_STRICT = {"strict_i2t_R@1": 1 / 4, "strict_i2t_R@5": 3 / 4, "strict_t2i_R@1": 4 / 7}
# class-aware: images of classes 0 1 1 0, a caption has its image's class; a hit is any candidate of the same class
# i2t: I0 best own-class .5 (t1), t2 (class 1) = 1 above -> 1; I1 best 0, t0 t1 t6 >= 0 -> 3; I2 -> 0; I3 t6 = 1 tied
#      by t4 (class 1) -> 1.   t2i: t0 -> 2 (I1, I2 >= 0), t1 -> 0, t2 -> 2, t3 -> 0, t4 -> 2, t5 -> 0, t6 -> 0
RT_CLASSES = [0, 1, 1, 0]
RT_CLASS_EXPECTED = {"class_i2t_R@1": 1 / 4, "class_i2t_R@5": 1.0, "class_t2i_R@1": 4 / 7}


def clip_benchmark_recalls(image_ND, text_MD, owner_M, ks=(1, 5, 10)) -> dict:
    """The reference: clip_benchmark's own recall functions on these features, under evaclip's key names (its
    text_retrieval is image -> text). Its evaluate() computes exactly this from the features it encodes."""
    from clip_benchmark.metrics.zeroshot_retrieval import batchify, recall_at_k

    scores = text_MD @ image_ND.t()
    positive = torch.zeros_like(scores, dtype=bool)
    positive[torch.arange(len(scores)), owner_M] = True
    out = {}
    for k in ks:
        if k <= len(text_MD):
            out[f"i2t_R@{k}"] = (batchify(recall_at_k, scores.T, positive.T, 3, "cpu", k=k) > 0).float().mean().item()
        if k <= len(image_ND):
            out[f"t2i_R@{k}"] = (batchify(recall_at_k, scores, positive, 3, "cpu", k=k) > 0).float().mean().item()
    return out


RT_TEXT = torch.tensor([f for _, f in RT_CAPTIONS])
RT_OWNER = torch.tensor([o for o, _ in RT_CAPTIONS])
# the default figures: clip_benchmark's, computed by its own functions; recall@k is only reported for k up to the
# number of candidates (4 images, 7 captions)
RT_EXPECTED = {**clip_benchmark_recalls(RT_IMAGES, RT_TEXT, RT_OWNER), **RT_STRICT, "num_images": 4, "num_texts": 7}
# retrieval() on data: the stub's features L2-normalised (t1 becomes t2's twin), plus how many captions are also
# another image's (none here)
RT_E2E_EXPECTED = {**RT_EXPECTED, **clip_benchmark_recalls(F.normalize(RT_IMAGES), F.normalize(RT_TEXT), RT_OWNER),
                   **RT_CLASS_EXPECTED, "captions_shared": 0}


def test_retrieval_metrics_known_answers():
    assert set(RT_EXPECTED) >= {"i2t_R@1", "i2t_R@5", "t2i_R@1"} and "t2i_R@5" not in RT_EXPECTED
    for chunk in (1, 3, 1024):  # chunking must not change anything
        res = retrieval_metrics(RT_IMAGES, RT_TEXT, RT_OWNER, chunk=chunk)
        assert res == RT_EXPECTED


def test_retrieval_equals_clip_benchmark_with_and_without_tied_captions():
    """Random features (no ties), and captions shared word for word by several images (exact ties, the demo's case):
    the default figures equal clip_benchmark's functions exactly; the strict ones count the ties as misses."""
    g = torch.Generator().manual_seed(3)
    image_ND = F.normalize(torch.randn(30, 8, generator=g), dim=-1)
    owner_M = torch.arange(30).repeat_interleave(2)
    text_MD = F.normalize(image_ND[owner_M] + torch.randn(60, 8, generator=g), dim=-1)
    shared_MD = F.normalize(torch.randn(3, 8, generator=g), dim=-1)[owner_M % 3]  # 3 caption texts for 30 images
    for txt in (text_MD, shared_MD):
        res = retrieval_metrics(image_ND, txt, owner_M, chunk=7)
        assert {k: res[k] for k in res if k[:3] in ("i2t", "t2i")} == clip_benchmark_recalls(image_ND, txt, owner_M)
    assert res["strict_i2t_R@1"] == 0.0 and res["i2t_R@1"] > 0.0


def test_retrieval_metrics_match_brute_force():
    g = torch.Generator().manual_seed(1)
    N, per = 40, 3
    image_ND = F.normalize(torch.randn(N, 8, generator=g), dim=-1)
    owner_M = torch.arange(N).repeat_interleave(per)
    text_MD = F.normalize(image_ND[owner_M] + 0.8 * torch.randn(N * per, 8, generator=g), dim=-1)
    res = retrieval_metrics(image_ND, text_MD, owner_M, chunk=7)
    s_NM = image_ND @ text_MD.t()
    for k in (1, 5, 10):
        top_i2t = s_NM.topk(k, dim=1).indices  # no ties with random features
        hit_N = (owner_M[top_i2t] == torch.arange(N)[:, None]).any(1)
        assert res[f"i2t_R@{k}"] == pytest.approx(float(hit_N.float().mean()))
        top_t2i = s_NM.t().topk(k, dim=1).indices
        assert res[f"t2i_R@{k}"] == pytest.approx(float((top_t2i == owner_M[:, None]).any(1).float().mean()))


def test_retrieval_class_aware_known_answers():
    text_MD = torch.tensor([f for _, f in RT_CAPTIONS])
    owner_M = torch.tensor([o for o, _ in RT_CAPTIONS])
    for chunk in (1, 3, 1024):
        res = retrieval_metrics(RT_IMAGES, text_MD, owner_M, chunk=chunk, image_class_Q=torch.tensor(RT_CLASSES))
        assert res == {**RT_EXPECTED, **RT_CLASS_EXPECTED}
    with pytest.raises(ValueError, match="one class id per image"):
        retrieval_metrics(RT_IMAGES, text_MD, owner_M, image_class_Q=torch.tensor([0, 1]))


def _rt_samples(with_class: bool = True):
    samples = []
    for i in range(4):
        caps = [f"caption {m}" for m, (o, _) in enumerate(RT_CAPTIONS) if o == i]
        files = {"png": _png(i), "txt": "\n".join(caps) + "\n"}
        if with_class:
            files["cls"] = str(RT_CLASSES[i])
        samples.append((f"im{i}", files))
    return samples


def test_retrieval_end_to_end_several_captions_per_image(tmp_path):
    texts = {f"caption {m}": f for m, (_, f) in enumerate(RT_CAPTIONS)}
    model = StubCLIP(RT_IMAGES, texts)
    root = _benchmark_dir(tmp_path / "rt", _rt_samples(), per_shard=3, dataset_type="retrieval")
    res = retrieval(model, model.tokenize, str(root), ToTensor(), batch_size=3, workers=0, show_progress=False)
    assert res == pytest.approx(RT_E2E_EXPECTED)
    # without class ids: the instance figures only
    root = _benchmark_dir(tmp_path / "rt2", _rt_samples(with_class=False), per_shard=3, dataset_type="retrieval")
    res = retrieval(model, model.tokenize, str(root), ToTensor(), batch_size=3, workers=0, show_progress=False)
    assert res == pytest.approx({k: v for k, v in RT_E2E_EXPECTED.items() if not k.startswith("class_")})


def test_retrieval_with_shared_captions_reports_class_aware_recall(tmp_path):
    """The demo's case: every caption names only the class, so each is word-for-word another image's caption too.
    Instance i2t R@1 is 0 even for a perfect model (the copies tie); the class-aware recall credits it, and the
    notes say which figure is which."""
    from evaclip.evals.retrieval import retrieval_notes

    classes = [0, 1, 2, 0, 1, 2]
    image_ND = torch.eye(3)[classes]  # a perfect model: an image's feature is its class
    texts = {f"the digit {c}": torch.eye(3)[c] for c in range(3)}
    model = StubCLIP(image_ND, texts)
    samples = [(f"im{i}", {"png": _png(i), "txt": f"the digit {c}", "cls": str(c)}) for i, c in enumerate(classes)]
    root = _benchmark_dir(tmp_path / "rt", samples, per_shard=6, dataset_type="retrieval")
    res = retrieval(model, model.tokenize, str(root), ToTensor(), batch_size=4, workers=0, show_progress=False)
    assert res["strict_i2t_R@1"] == 0.0 and res["captions_shared"] == 6
    assert res["class_i2t_R@1"] == 1.0 and res["class_t2i_R@1"] == 1.0
    notes = " ".join(retrieval_notes({f"retrieval/{k}": v for k, v in res.items()}))
    assert "class-aware recall" in notes and "6 of 6 captions" in notes and "instance recall" in notes


def test_retrieval_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="at least one caption"):
        retrieval_metrics(torch.eye(3), torch.eye(3)[:2], torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="owner_R"):
        retrieval_metrics(torch.eye(3), torch.eye(3), torch.tensor([0, 1, 5]))


def test_evaluate_hook_prefixes_and_restores_mode(tmp_path):
    from evaclip.evals import evaluate
    from evaclip.tasks.clip import ClipEvalCfg as EvalCfg

    samples = [(f"s{i:03d}", {"png": _png(i), "cls": str(t)}) for i, (_, t) in enumerate(ZS_CASES)]
    root = _benchmark_dir(tmp_path / "zs", samples, per_shard=8, classnames=CLASSNAMES, templates=TEMPLATES)
    model = _zs_model().train()
    res = evaluate(model, EvalCfg(zeroshot=str(root), batch_size=4, workers=0), model.tokenize, ToTensor(), "cpu")
    assert res == pytest.approx({f"zeroshot/{k}": v for k, v in ZS_EXPECTED.items()})
    assert model.training
    json.dumps(res)  # loggable as is


# ----------------------------------------------------------------------------------------------------------------------
# two processes (gloo): data and classes split across ranks, results gathered, same metrics as one process
# ----------------------------------------------------------------------------------------------------------------------
def _two_rank_worker(rank, world, init_file, zs_root, rt_root, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = _zs_model()
        zs = zero_shot(model, model.tokenize, zs_root, ToTensor(), batch_size=2, workers=0, show_progress=False)
        rt_model = StubCLIP(RT_IMAGES, {f"caption {m}": f for m, (_, f) in enumerate(RT_CAPTIONS)})
        rt = retrieval(rt_model, rt_model.tokenize, rt_root, ToTensor(), batch_size=2, workers=0, show_progress=False)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"zs": zs, "rt": rt}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_gather_to_the_same_metrics(tmp_path):
    import torch.multiprocessing as mp

    zs_samples = [(f"s{i:03d}", {"png": _png(i), "cls": str(t)}) for i, (_, t) in enumerate(ZS_CASES)]
    zs_root = _benchmark_dir(tmp_path / "zs", zs_samples, per_shard=5, classnames=CLASSNAMES, templates=TEMPLATES)
    rt_samples = _rt_samples()  # with class ids: the class-aware recall must gather in the same order too
    rt_root = _benchmark_dir(tmp_path / "rt", rt_samples, per_shard=3, dataset_type="retrieval")
    # fork: the children inherit the imports (spawn would re-import torch and evaclip in each, ~10 s on 2 cores)
    mp.start_processes(_two_rank_worker, args=(2, str(tmp_path / "init"), str(zs_root), str(rt_root), str(tmp_path)),
                       nprocs=2, start_method="fork")
    for r in range(2):
        res = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert res["zs"] == pytest.approx(ZS_EXPECTED)
        assert res["rt"] == pytest.approx(RT_E2E_EXPECTED)


# ----------------------------------------------------------------------------------------------------------------------
# evaclip eval on bad input: one line naming what is wrong and what to do, exit code 2 (never a worker traceback)
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_state_dict(tmp_path_factory):
    import evaclip

    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(evaclip.create_model("EVA02-CLIP-tiny", attn_backend="sdpa").state_dict(), path)
    return str(path)


def _eval_cli(ckpt, capsys, *args):
    from evaclip.evals import main

    rc = main([ckpt, "--model", "EVA02-CLIP-tiny", "--quiet", "--batch-size", "2", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def _assert_one_line_error(rc, err, *expected):
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("evaclip eval: error: "), err
    assert "Traceback" not in err and "DataLoader worker" not in err
    for e in expected:
        assert e in lines[0], lines[0]


def _shard_dir(root, samples, per_shard=2):
    root.mkdir(parents=True)
    for s in range(0, len(samples), per_shard):
        _write_tar(root / f"{s // per_shard:05d}.tar", samples[s:s + per_shard])
    return str(root)


def test_eval_cli_data_of_the_wrong_kind(tiny_state_dict, tmp_path, capsys):
    cls_samples = [(f"s{i}", {"png": _png(i), "cls": str(i % 2)}) for i in range(6)]
    txt_samples = [(f"s{i}", {"png": _png(i), "txt": f"caption {i}"}) for i in range(6)]
    zs_typed = _benchmark_dir(tmp_path / "zs", cls_samples, 3, classnames=["a", "b"], dataset_type="classification")
    zs_untyped = _benchmark_dir(tmp_path / "zs2", cls_samples, 3, classnames=["a", "b"])
    cls_dir = _shard_dir(tmp_path / "cls_shards", cls_samples)
    txt_dir = _shard_dir(tmp_path / "txt_shards", txt_samples)
    for c in ("a", "b"):
        (tmp_path / "folder" / c).mkdir(parents=True)
        (tmp_path / "folder" / c / "x.png").write_bytes(_png(1))
    (tmp_path / "names.txt").write_text("a\nb\n")
    cases = [
        (["--retrieval", str(zs_typed)], "pass it as --zeroshot"),
        (["--retrieval", str(zs_untyped)], "pass it as --zeroshot"),
        (["--retrieval", cls_dir], "pass it as --zeroshot"),  # plain shards: found from the first sample
        (["--retrieval", str(tmp_path / "folder")], "pass it as --zeroshot"),
        (["--zeroshot", txt_dir, "--classnames", str(tmp_path / "names.txt")], "pass it as --retrieval"),
        (["--zeroshot", txt_dir], "pass it as --retrieval"),  # not "pass --classnames": it is the wrong kind
    ]
    for args, expected in cases:
        rc, _, err = _eval_cli(tiny_state_dict, capsys, "--workers", "2", *args)
        _assert_one_line_error(rc, err, expected)


def test_eval_cli_error_raised_in_a_loader_worker_is_one_line(tiny_state_dict, tmp_path, capsys):
    # the first sample is fine (the up-front check passes); a later one has no caption: found inside a worker
    samples = [(f"s{i}", {"png": _png(i), "txt": f"caption {i}"}) for i in range(5)]
    samples.append(("broken", {"png": _png(9)}))
    rc, _, err = _eval_cli(tiny_state_dict, capsys, "--workers", "2", "--retrieval",
                           _shard_dir(tmp_path / "rt", samples, per_shard=3))
    _assert_one_line_error(rc, err, "sample 'broken'", "has no 'txt' captions")


def test_eval_cli_unreadable_image_in_a_class_folder(tiny_state_dict, tmp_path, capsys):
    for c in ("cat", "dog"):
        (tmp_path / "val" / c).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "val" / c / f"{i}.png").write_bytes(_png(i))
    (tmp_path / "val" / "dog" / "9.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    rc, _, err = _eval_cli(tiny_state_dict, capsys, "--workers", "2", "--zeroshot", str(tmp_path / "val"))
    _assert_one_line_error(rc, err, "unreadable image", "9.jpg")


def test_zeroshot_folder_needs_a_recognizable_layout(tiny_state_dict, tmp_path, capsys):
    """Sub-folders are classes only in a real ImageNet-style folder: >= 2 sub-folders, each holding images, and no
    loose images beside them. Anything else is refused with what was found."""
    def folder(name, subs, loose=(), other=()):
        root = tmp_path / name
        root.mkdir()
        for sub, files in subs.items():
            (root / sub).mkdir()
            for f in files:
                (root / sub / f).write_bytes(_png(1) if f.endswith(".png") else b"text")
        for f in loose:
            (root / f).write_bytes(_png(2))
        for f in other:
            (root / f).write_text("x")
        return str(root)

    photos = folder("photos", {"holiday": ["a.png", "b.png"], "misc": ["notes.txt"]})
    with pytest.raises(ValueError, match=r"sub-folder\(s\) misc hold no images"):
        resolve_zeroshot(photos)
    loose = folder("album", {"holiday": ["a.png"], "misc": ["b.png"]}, loose=["cover.png"])
    with pytest.raises(ValueError, match=r"1 image\(s\) lie beside its sub-folders \(cover.png\)"):
        resolve_zeroshot(loose)
    one = folder("one", {"cats": ["a.png"]})
    with pytest.raises(ValueError, match=r"not a zero-shot set: found 1 sub-folder\(s\) \(cats\)"):
        resolve_zeroshot(one)
    empty = folder("empty", {}, other=["readme.md"])
    with pytest.raises(ValueError, match=r"found 0 sub-folder\(s\), 1 other file\(s\) \(readme.md\)"):
        resolve_zeroshot(empty)
    # a data root holding a clip_benchmark set: the message points at it
    data_root = tmp_path / "data"
    _benchmark_dir(data_root / "zeroshot", [("a", {"png": _png(0), "cls": "0"})], 1, classnames=["x"])
    (data_root / "train").mkdir()
    with pytest.raises(ValueError, match="zeroshot is a clip_benchmark set: pass that folder"):
        resolve_zeroshot(str(data_root))
    # a real one is accepted, and the CLI says what it found
    good = folder("good", {"cat": ["a.png", "b.png"], "dog": ["c.png"]})
    assert resolve_zeroshot(good).num_samples == 3
    rc, _, err = _eval_cli(tiny_state_dict, capsys, "--workers", "0", "--zeroshot", photos)
    _assert_one_line_error(rc, err, "misc hold no images", "ImageNet-style folder (>= 2 class sub-folders")
    rc, out, _ = _eval_cli(tiny_state_dict, capsys, "--workers", "0", "--zeroshot", good)
    assert rc == 0 and f"zero-shot: ImageNet-style folder {good}: 2 classes (cat, dog), 3 images" in out


def test_glob_in_a_shard_spec_says_use_braces_or_the_folder(tiny_state_dict, tmp_path, capsys):
    from evaclip.data.shards import expand_spec

    d = _shard_dir(tmp_path / "rt", [(f"s{i}", {"png": _png(i), "txt": "x"}) for i in range(4)])
    with pytest.raises(ValueError, match=r"uses a glob .* braces .* or give the folder"):
        expand_spec(f"{d}/*.tar")
    rc, _, err = _eval_cli(tiny_state_dict, capsys, "--retrieval", f"{d}/0000?.tar")
    _assert_one_line_error(rc, err, "glob", "braces")
    assert len(expand_spec(d)[0]) == 2  # the folder itself works


def test_eval_names_the_checkpoint_it_picked_from_a_run_folder(tiny_state_dict, tmp_path, capsys, monkeypatch):
    import shutil

    import yaml

    import evaclip.checkpoint as ckpt_mod

    run = tmp_path / "runs" / "demo"
    for step in (10, 20):
        d = run / "ckpt" / f"step_{step:08d}"
        d.mkdir(parents=True)
        shutil.copy(tiny_state_dict, d / "model.pt")
        (d / "config.yaml").write_text(yaml.safe_dump({"model": {"name": "EVA02-CLIP-tiny"}}))
    # which checkpoint counts as complete is checkpoint.py's business (meta.json, checksums): the newest here
    monkeypatch.setattr(ckpt_mod, "find_resume_checkpoint", lambda root, *a, **k: sorted(Path(root).iterdir())[-1])
    rt = _benchmark_dir(tmp_path / "rt", _rt_samples(), per_shard=4, dataset_type="retrieval")
    out_json = tmp_path / "res.json"
    rc, out, err = _eval_cli(str(run), capsys, "--workers", "0", "--retrieval", str(rt), "--out", str(out_json))
    picked = run / "ckpt" / "step_00000020"
    assert rc == 0, err
    assert f"checkpoint: {picked} (newest complete checkpoint of run folder {run})" in out.splitlines()[0]
    res = json.loads(out_json.read_text())
    assert res["checkpoint"] == str(run) and res["checkpoint_used"] == str(picked)
    assert any("class-aware" in n for n in res["notes"]) and "retrieval/class_i2t_R@1" in res["results"]


def _clip_benchmark_evaluate(model, tokenizer, evset, preprocess) -> dict:
    """clip_benchmark's evaluate() on ``evset`` read in dataset order, under evaclip's key names."""
    from clip_benchmark.metrics.zeroshot_retrieval import evaluate

    from evaclip.evals.data import build_eval_loader

    batches = [(images_BCHW, [caps for caps, _ in targets])
               for _, images_BCHW, targets in build_eval_loader(evset, preprocess, 16, workers=0)]
    got = evaluate(model, batches, tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10])
    return {f"{'i2t' if key.startswith('text') else 't2i'}_R@{key.rsplit('@', 1)[1]}": v for key, v in got.items()}


@pytest.mark.slow
def test_retrieval_of_a_tiny_clip_equals_clip_benchmark(tmp_path):
    """A tiny evaclip CLIP (random init) on captions that identify their image: `evaclip eval`'s retrieval equals
    clip_benchmark's evaluate() on the same shards. On the demo's retrieval set (every caption shared by many images:
    exact ties), it equals clip_benchmark's recall functions on the same features. (evaluate() itself cannot be
    matched there: a caption's feature moves in the last bit with its position in a batch, 1e-7, so clip_benchmark's
    order among the copies of a caption is that noise.)"""
    import evaclip
    from data_tools.make_demo import make_demo
    from evaclip.evals.common import encode_images, encode_texts
    from evaclip.evals.data import build_eval_loader, resolve_retrieval

    torch.manual_seed(0)
    name = "EVA02-CLIP-tiny"
    model, tokenizer = evaclip.create_model(name).eval(), evaclip.get_tokenizer(name)
    preprocess = evaclip.get_transforms(name, train=False)
    rng = np.random.default_rng(0)
    unique = []
    for i in range(24):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, format="png")
        unique.append((f"im{i}", {"png": buf.getvalue(), "txt": f"photo number {i}\nanother view of item {i}"}))
    path = str(_benchmark_dir(tmp_path / "u", unique, per_shard=10, dataset_type="retrieval"))
    ours = retrieval(model, tokenizer, path, preprocess, batch_size=16, workers=0, show_progress=False, amp=False)
    reference = _clip_benchmark_evaluate(model, tokenizer, resolve_retrieval(path), preprocess)
    assert {k: ours[k] for k in reference} == reference and ours["captions_shared"] == 0

    path = make_demo(str(tmp_path / "demo"), seed=0, copies=1, show_progress=False)["retrieval"]
    ours = retrieval(model, tokenizer, path, preprocess, batch_size=16, workers=0, show_progress=False, amp=False)
    images, captions, owners = [], [], []
    for idx_B, images_BCHW, targets in build_eval_loader(resolve_retrieval(path), preprocess, 16, workers=0):
        images.append(encode_images(model, images_BCHW, "cpu", amp=False))
        for i, (caps, _) in zip(idx_B.tolist(), targets):
            captions, owners = captions + caps, owners + [i] * len(caps)
    text_RE = encode_texts(model, tokenizer, captions, "cpu", amp=False)
    reference = clip_benchmark_recalls(torch.cat(images), text_RE, torch.tensor(owners))
    assert {k: ours[k] for k in reference} == reference
    assert ours["captions_shared"] == ours["num_texts"] and ours["strict_i2t_R@5"] < ours["i2t_R@5"]
