"""Zero-shot and retrieval metrics, checked exactly with a stub model whose embeddings fix the answers in advance.

Shapes: N images, M captions, C classes, D embedding dim.
"""
from __future__ import annotations

import io
import json
import os
import tarfile

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
RT_EXPECTED = {"i2t_R@1": 1 / 4, "i2t_R@5": 3 / 4, "t2i_R@1": 4 / 7, "num_images": 4, "num_texts": 7}


def test_retrieval_metrics_known_answers():
    text_MD = torch.tensor([f for _, f in RT_CAPTIONS])
    owner_M = torch.tensor([o for o, _ in RT_CAPTIONS])
    for chunk in (1, 3, 1024):  # chunking must not change anything
        res = retrieval_metrics(RT_IMAGES, text_MD, owner_M, chunk=chunk)
        # recall@k is only reported for k up to the number of candidates (4 images, 7 captions)
        assert res == pytest.approx(RT_EXPECTED)


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


def test_retrieval_end_to_end_several_captions_per_image(tmp_path):
    texts = {f"caption {m}": f for m, (_, f) in enumerate(RT_CAPTIONS)}
    model = StubCLIP(RT_IMAGES, texts)
    samples = []
    for i in range(4):
        caps = [f"caption {m}" for m, (o, _) in enumerate(RT_CAPTIONS) if o == i]
        samples.append((f"im{i}", {"png": _png(i), "txt": "\n".join(caps) + "\n"}))
    root = _benchmark_dir(tmp_path / "rt", samples, per_shard=3, dataset_type="retrieval")
    res = retrieval(model, model.tokenize, str(root), ToTensor(), batch_size=3, workers=0, show_progress=False)
    assert res == pytest.approx(RT_EXPECTED)


def test_retrieval_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="at least one caption"):
        retrieval_metrics(torch.eye(3), torch.eye(3)[:2], torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="owner_M"):
        retrieval_metrics(torch.eye(3), torch.eye(3), torch.tensor([0, 1, 5]))


def test_evaluate_hook_prefixes_and_restores_mode(tmp_path):
    from evaclip.config import EvalCfg
    from evaclip.evals import evaluate

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
    rt_samples = []
    for i in range(4):
        caps = [f"caption {m}" for m, (o, _) in enumerate(RT_CAPTIONS) if o == i]
        rt_samples.append((f"im{i}", {"png": _png(i), "txt": "\n".join(caps)}))
    rt_root = _benchmark_dir(tmp_path / "rt", rt_samples, per_shard=4, dataset_type="retrieval")
    # fork: the children inherit the imports (spawn would re-import torch and evaclip in each, ~10 s on 2 cores)
    mp.start_processes(_two_rank_worker, args=(2, str(tmp_path / "init"), str(zs_root), str(rt_root), str(tmp_path)),
                       nprocs=2, start_method="fork")
    for r in range(2):
        res = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert res["zs"] == pytest.approx(ZS_EXPECTED)
        assert res["rt"] == pytest.approx(RT_EXPECTED)
