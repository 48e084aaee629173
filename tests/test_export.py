"""Encoder export: safetensors round trip, open_clip loading (and clip_benchmark on it), ONNX vs PyTorch; evaluation of
a real tiny model on the demo held-out set.

Shapes: B batch, C channels, H/W image height/width, L context length, E embedding dim.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

import evaclip
from evaclip.export import ExportError, export, register_open_clip

MODEL = "EVA02-CLIP-tiny"


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A tiny model with non-trivial weights saved as a plain state-dict file."""
    torch.manual_seed(0)
    model = evaclip.create_model(MODEL, attn_backend="eager").eval()
    with torch.no_grad():  # perturb every weight so a key mix-up cannot go unnoticed (inits leave many zeros / ones)
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(model.state_dict(), path)
    return path, model


@pytest.fixture(scope="module")
def exported(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    export(str(tiny_ckpt[0]), str(out), ["safetensors", "open_clip"], model_name=MODEL)
    return out


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from data_tools.make_demo import make_demo

    root = tmp_path_factory.mktemp("demo")
    return make_demo(str(root), seed=0, copies=1, zeroshot_frac=0.05, retrieval_frac=0.03, show_progress=False)


def test_safetensors_round_trip_exact(tiny_ckpt, exported):
    _, model = tiny_ckpt
    img = evaclip.load_encoder(exported, "image")
    txt = evaclip.load_encoder(exported / "text", "text")
    for enc, tower in ((img, model.visual), (txt, model.text)):
        ref = tower.state_dict()
        got = enc.tower.state_dict()
        assert ref.keys() == got.keys()
        assert all(torch.equal(ref[k], got[k]) for k in ref)
    cfg = img.config
    assert cfg["architecture"] == MODEL and cfg["tower"] == "image"
    for key in ("embed_dim", "image_size", "mean", "std"):
        assert key in cfg
    assert {"context_length", "tokenizer", "embed_dim"} <= set(txt.config)
    images_BCHW = torch.randn(2, 3, cfg["image_size"], cfg["image_size"], generator=torch.Generator().manual_seed(1))
    tokens_BL = txt.tokenizer(["a photo of a seven", "the digit 3"])
    with torch.no_grad():
        torch.testing.assert_close(img(images_BCHW), model.encode_image(images_BCHW), rtol=0, atol=1e-5)
        torch.testing.assert_close(txt(tokens_BL, normalize=True), model.encode_text(tokens_BL, normalize=True),
                                   rtol=0, atol=1e-5)


def test_exports_are_readable_by_group_and_others_and_the_readme_lines_load_the_encoders(tiny_ckpt, exported):
    """safetensors 0.8 creates its files 0600: every exported .safetensors is 0644 (a shared export is readable).
    The export's README.md has the lines that load the encoders and points at the patch features."""
    import re
    import stat

    files = sorted(exported.rglob("*.safetensors"))
    assert len(files) == 3
    assert {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {f.name: "0o644" for f in files}
    readme = (exported / "README.md").read_text()
    assert "Patch features" in readme
    ns = {}
    exec(re.search(r"```python\n(.*?)```", readme, re.S).group(1), ns)
    images_BCHW = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ns["image_encoder"](images_BCHW), tiny_ckpt[1].encode_image(images_BCHW),
                                   rtol=0, atol=1e-5)
        torch.testing.assert_close(ns["patches"], tiny_ckpt[1].encode_patches(ns["images"], layer=-2),
                                   rtol=0, atol=1e-5)


def test_load_encoder_errors(exported, tmp_path):
    with pytest.raises(ValueError, match="holds the text encoder"):
        evaclip.load_encoder(exported / "text", "image")
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        evaclip.load_encoder(tmp_path, "image")
    with pytest.raises(ValueError, match="tower must be one of"):
        evaclip.load_encoder(exported, "audio")


def test_open_clip_export_same_embeddings(tiny_ckpt, exported):
    import open_clip

    _, model = tiny_ckpt
    d = exported / "open_clip"
    name = register_open_clip(d)  # timm Eva + open_clip config of this non-standard size
    weights = str(d / "open_clip_model.safetensors")
    oc_model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=weights)
    oc_model.eval()
    s = json.loads((d / f"{name}.json").read_text())["vision_cfg"]["image_size"]
    images_BCHW = torch.randn(3, 3, s, s, generator=torch.Generator().manual_seed(2))
    tokens_BL = open_clip.get_tokenizer(name)(["a cat", "handwritten digit 7", "the number seven, written by hand"])
    with torch.no_grad():
        torch.testing.assert_close(oc_model.encode_image(images_BCHW), model.encode_image(images_BCHW),
                                   rtol=0, atol=1e-5)
        torch.testing.assert_close(oc_model.encode_text(tokens_BL), model.encode_text(tokens_BL), rtol=0, atol=1e-5)
    # the local-dir form needs no name at all
    oc2 = open_clip.create_model(f"local-dir:{d}").eval()
    with torch.no_grad():
        torch.testing.assert_close(oc2.encode_image(images_BCHW), model.encode_image(images_BCHW), rtol=0, atol=1e-5)


def _readme_block(readme: str, lang: str) -> str:
    start = readme.index(f"```{lang}\n") + len(lang) + 4
    return readme[start:readme.index("```", start)]


# appended to the README's open_clip lines in a fresh interpreter: prints the embeddings of a fixed image and text
_PROBE = """
import json, torch
model.eval()
s = model.visual.image_size[0] if isinstance(model.visual.image_size, (tuple, list)) else model.visual.image_size
tokens = tokenizer(["a handwritten digit 7", "a cat"])
with torch.no_grad():
    img = model.encode_image(torch.linspace(-1, 1, 2 * 3 * s * s).view(2, 3, s, s))
    txt = model.encode_text(tokens)
print(json.dumps({"s": s, "tokens": tokens.tolist(), "img": img.tolist(), "txt": txt.tolist()}))
"""


def _fresh_python(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``code`` in a new interpreter: nothing registered by this test process (timm / open_clip) is there."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)


def _assert_same_embeddings(probe_stdout: str, model, atol: float) -> None:
    got = json.loads(probe_stdout.strip().splitlines()[-1])
    s = got["s"]
    with torch.no_grad():
        img = model.float().eval().encode_image(torch.linspace(-1, 1, 2 * 3 * s * s).view(2, 3, s, s))
        txt = model.encode_text(torch.tensor(got["tokens"]))
    torch.testing.assert_close(torch.tensor(got["img"]), img, rtol=0, atol=atol)
    torch.testing.assert_close(torch.tensor(got["txt"]), txt, rtol=0, atol=atol)


def test_open_clip_custom_shape_needs_register_and_the_export_says_so(tiny_ckpt, exported, tmp_path, capsys):
    """A non-released shape: a fresh open_clip cannot load it ("Unknown model"), the export's README.md says to call
    register_open_clip first, and its lines, run as written in a fresh interpreter, load the same model."""
    from evaclip.export import main

    _, model = tiny_ckpt
    d = (exported / "open_clip").resolve()
    bare = _fresh_python(f"import open_clip; open_clip.create_model_and_transforms('local-dir:{d}')")
    assert bare.returncode != 0 and "Unknown model" in bare.stderr
    readme = (d / "README.md").read_text()
    code = _readme_block(readme, "python")
    assert f'evaclip.export.register_open_clip("{d}")' in code and f"local-dir:{d}" in code
    run = _fresh_python(code + _PROBE)
    assert run.returncode == 0, run.stderr
    _assert_same_embeddings(run.stdout, model, atol=1e-5)
    # the command's own output says it too
    assert main([str(tiny_ckpt[0]), "--model", MODEL, "--out", str(tmp_path), "--format", "open_clip",
                 "--no-check"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "not a shape open_clip ships" in last and "register_open_clip(" in last and "README.md" in last


@pytest.mark.slow
def test_open_clip_custom_shape_readme_clip_benchmark_line_runs(exported, demo, tmp_path):
    """The README's clip_benchmark command, as written (placeholders filled), on the demo retrieval split."""
    readme = ((exported / "open_clip") / "README.md").read_text()
    cmd = _readme_block(readme, "bash").replace("DATASET", "wds/demo").replace("DATA_DIR", demo["retrieval"])
    cmd = cmd.replace("TASK", "zeroshot_retrieval").replace("results.json", str(tmp_path / "cb.json"))
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    r = subprocess.run(["bash", "-c", cmd.strip() + " --num_workers 1"], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = json.loads((tmp_path / "cb.json").read_text())["metrics"]
    assert 0 <= metrics["image_retrieval_recall@5"] <= 1


@pytest.mark.slow
def test_open_clip_released_shape_loads_with_no_extra_step(tmp_path):
    """EVA02-CLIP-B-16 has open_clip's own config (EVA02-B-16): the export loads with open_clip alone."""
    from evaclip.export import export_open_clip, model_config_of

    arch = "EVA02-CLIP-B-16"
    model = evaclip.create_model(arch, attn_backend="sdpa").eval()
    export_open_clip(model, model_config_of(model, arch), arch, tmp_path, check=False)
    d = (tmp_path / "open_clip").resolve()
    assert not (d / "timm_model.json").exists()
    readme = (d / "README.md").read_text()
    assert "register_open_clip" not in readme and "no extra step" in readme
    assert "clip_benchmark eval --model_type open_clip --model EVA02-B-16" in _readme_block(readme, "bash")
    run = _fresh_python(_readme_block(readme, "python") + _PROBE)
    assert run.returncode == 0, run.stderr
    _assert_same_embeddings(run.stdout, model, atol=1e-4)


@pytest.fixture(scope="module")
def onnx_dir(tiny_ckpt, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    out = tmp_path_factory.mktemp("onnx")
    export(str(tiny_ckpt[0]), str(out), "onnx", model_name=MODEL)  # export() itself checks within 1e-4
    return out


def test_onnx_matches_pytorch(tiny_ckpt, onnx_dir):
    import onnxruntime as ort

    tmp_path = onnx_dir
    _, model = tiny_ckpt
    cfg = json.loads((tmp_path / "image" / "config.json").read_text())
    s = cfg["image_size"]
    images_BCHW = torch.randn(5, 3, s, s, generator=torch.Generator().manual_seed(3))  # a batch size not exported
    sess = ort.InferenceSession(str(tmp_path / "image" / "model.onnx"), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {"images": images_BCHW.numpy()})[0])
    with torch.no_grad():
        torch.testing.assert_close(got, model.encode_image(images_BCHW), rtol=1e-4, atol=1e-4)
    assert not (tmp_path / "text" / "model.safetensors").exists()  # onnx only
    import open_clip

    tokens_BL = open_clip.get_tokenizer("", context_length=json.loads((tmp_path / "text" / "config.json").read_text())[
        "context_length"])(["one", "a handwritten digit nine", "x y z"])
    sess = ort.InferenceSession(str(tmp_path / "text" / "model.onnx"), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {"tokens": tokens_BL.numpy()})[0])
    with torch.no_grad():
        torch.testing.assert_close(got, model.encode_text(tokens_BL), rtol=1e-4, atol=1e-4)


def test_export_training_checkpoint_folder_trained_with_flash_attn(tiny_ckpt, tmp_path):
    """A training checkpoint folder (model.pt + the run's config.yaml) whose run used flash_attn exports on a CPU:
    export builds the portable SDPA path and the model name comes from the saved config."""
    import yaml

    from evaclip.config import TrainCfg, to_dict

    path, model = tiny_ckpt
    step = tmp_path / "ckpt" / "step_00000010"
    step.mkdir(parents=True)
    (step / "model.pt").write_bytes(path.read_bytes())
    cfg = TrainCfg()
    cfg.model.name, cfg.model.attn_backend = MODEL, "flash_attn"
    (step / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    export(str(step), str(tmp_path / "out"), "safetensors")
    enc = evaclip.load_encoder(tmp_path / "out", "image")
    images_BCHW = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(enc(images_BCHW), model.encode_image(images_BCHW), rtol=0, atol=1e-5)


def test_check_onnx_catches_a_mismatch(onnx_dir):
    """The export check is not vacuous: an ONNX file compared against a different model fails loudly."""
    from evaclip.export import check_onnx

    enc = evaclip.create_model(MODEL, attn_backend="eager").visual.eval()  # fresh weights, not the exported ones
    with pytest.raises(ExportError, match="differs from PyTorch"):
        check_onnx(enc, onnx_dir / "image" / "model.onnx", torch.randn(2, 3, 32, 32))


def test_export_rejects_bad_requests(tiny_ckpt, tmp_path):
    path, _ = tiny_ckpt
    with pytest.raises(ValueError, match="unknown export format"):
        export(str(path), str(tmp_path), "tflite", model_name=MODEL)
    with pytest.raises(ValueError, match="--model"):
        export(str(path), str(tmp_path), "safetensors")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        export(str(tmp_path / "nope.pt"), str(tmp_path), "safetensors", model_name=MODEL)


def test_eval_cli_on_demo_heldout(tiny_ckpt, demo, tmp_path, capsys):
    from evaclip.evals import main

    path, _ = tiny_ckpt
    out = tmp_path / "res.json"
    assert main([str(path), "--model", MODEL, "--zeroshot", demo["zeroshot"], "--retrieval", demo["retrieval"],
                 "--out", str(out), "--workers", "0", "--quiet", "--batch-size", "32"]) == 0
    res = json.loads(out.read_text())["results"]
    printed = capsys.readouterr().out
    assert "zeroshot/top1" in printed and "retrieval/i2t_R@1" in printed
    assert res["zeroshot/num_samples"] == demo["zeroshot_num_samples"]
    assert res["retrieval/num_images"] == demo["retrieval_num_samples"]
    for k in ("zeroshot/top1", "zeroshot/top5", "zeroshot/mean_per_class_recall", "retrieval/t2i_R@10",
              "retrieval/class_i2t_R@1", "retrieval/class_t2i_R@1"):
        assert 0.0 <= res[k] <= 1.0
    # the demo's retrieval captions repeat across images: the output says so and points at the class-aware figures
    assert 0 < res["retrieval/captions_shared"] <= res["retrieval/num_texts"]
    assert "class-aware recall" in printed and "read the class-aware figures" in printed
    assert res["zeroshot/top1"] <= res["zeroshot/top5"]
    # user errors: one line on stderr and exit code 2, no traceback
    rt_root = demo["retrieval"]  # the clip_benchmark-layout folder
    assert main([str(path), "--zeroshot", demo["zeroshot"]]) == 2
    assert "pass --model NAME" in capsys.readouterr().err
    assert main([str(path), "--model", MODEL, "--zeroshot", rt_root]) == 2
    assert "pass it as --retrieval" in capsys.readouterr().err


@pytest.mark.slow
def test_clip_benchmark_agrees_with_evaclip_eval(tiny_ckpt, exported, demo, tmp_path, monkeypatch):
    """clip_benchmark (open_clip model type) on our open_clip export == evaclip eval on the checkpoint."""
    from clip_benchmark import cli
    from clip_benchmark.metrics import zeroshot_classification as cb_zs

    from evaclip.evals import main

    def accuracy(output, target, topk=(1,)):
        # clip_benchmark 1.6.2's accuracy() calls float() on a 1-element array, which NumPy 2 rejects; same
        # computation (topk over the logits), returning Python floats
        pred = output.topk(max(topk), 1, True, True)[1].t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        return [float(correct[:k].reshape(-1).float().sum()) / len(target) for k in topk]

    monkeypatch.setattr(cb_zs, "accuracy", accuracy)

    path, _ = tiny_ckpt
    d = exported / "open_clip"
    name = register_open_clip(d)
    cb_out = tmp_path / "cb.json"
    monkeypatch.setattr(sys, "argv", [
        "clip_benchmark", "eval", "--dataset", "wds/demo", "--dataset_root", demo["zeroshot"], "--model_type",
        "open_clip", "--model", name, "--pretrained", str(d / "open_clip_model.safetensors"), "--no_amp",
        "--num_workers", "0", "--batch_size", "32", "--output", str(cb_out), "--quiet"])
    cli.main()
    cb = json.loads(cb_out.read_text())["metrics"]
    ev_out = tmp_path / "ev.json"
    main([str(path), "--model", MODEL, "--zeroshot", demo["zeroshot"], "--out", str(ev_out), "--workers", "0",
          "--quiet", "--no-amp"])
    ev = json.loads(ev_out.read_text())["results"]
    assert ev["zeroshot/top1"] == pytest.approx(cb["acc1"], abs=1e-9)
    assert ev["zeroshot/top5"] == pytest.approx(cb["acc5"], abs=1e-9)
    assert ev["zeroshot/mean_per_class_recall"] == pytest.approx(cb["mean_per_class_recall"], abs=1e-9)


@pytest.mark.gpu
def test_cuda_bf16_eval_matches_fp32(tiny_ckpt, demo):
    """On a GPU, bf16 autocast evaluation gives the fp32 metrics up to a few near-tied samples."""
    from evaclip.evals import eval_transforms_and_tokenizer, zero_shot

    model = copy.deepcopy(tiny_ckpt[1]).cuda()  # the fixture's model stays on the CPU for the other tests
    preprocess, tokenizer = eval_transforms_and_tokenizer(model.cfg)
    kw = dict(batch_size=64, workers=0, device="cuda", show_progress=False)
    fp32 = zero_shot(model, tokenizer, demo["zeroshot"], preprocess, amp=False, **kw)
    bf16 = zero_shot(model, tokenizer, demo["zeroshot"], preprocess, amp=True, **kw)
    assert abs(fp32["top1"] - bf16["top1"]) <= 3 / fp32["num_samples"]
