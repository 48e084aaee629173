"""Inputs of the wrong kind end a run with one line naming the file, what it is and what is expected, never a
traceback: a zero-byte shard (CLIP and MIM), an ONNX file, a CSV, an export folder, a text tower, a MIM student or
another architecture where a teacher or a tower init is expected. Each case runs `evaclip train` as a user would
(in-process CLI), tiny model, before any step."""
from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

import evaclip
from data_tools.common import ShardSink
from evaclip.train import cli

MODEL = "EVA02-CLIP-tiny"


@pytest.fixture
def train_args(run_args):
    """``train_args(*extra)``: tests/conftest.py's tiny run, 2 steps (each case here ends before the first)."""
    return lambda *extra: run_args("max_steps=2", *extra)


def _mim(args: list, *extra) -> list:
    """The same run as a MIM run: the MIM demo recipe (its schema has no CLIP sections)."""
    return ["demo_mim_cpu", *args[1:], *extra]


def _one_line(capsys, code: int, *must: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err and "code execution" not in err, err
    for m in must:
        assert m in err, (m, err)
    assert code == 2
    return err


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny CLIP (state dict), its encoder export, a MIM student export, an ONNX file, a CSV."""
    import onnx
    from onnx import TensorProto, helper

    from evaclip.export import export_eva_mim, export_safetensors
    from evaclip.models.mim import build_student

    root = tmp_path_factory.mktemp("files")
    torch.manual_seed(0)
    clip = evaclip.create_model(MODEL)
    torch.save(clip.state_dict(), root / "clip.pt")
    export_safetensors(clip, clip.cfg, MODEL, root / "export")
    export_eva_mim(build_student(MODEL, 64), root / "mim.safetensors")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x],
                                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])),
              root / "model.onnx")
    (root / "pairs.csv").write_text("image,caption\na.jpg,a cat\n")
    return root


@pytest.mark.parametrize("task", ["clip", "mim"])
def test_a_zero_byte_shard_is_named_in_one_line(tmp_path, files, capsys, task, train_args):
    jpg = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(jpg, format="JPEG")
    with ShardSink(str(tmp_path / "shards"), 4) as sink:
        for i in range(8):
            sink.write({"__key__": f"{i:03d}", "jpg": jpg.getvalue(), "txt": "a red square"})
    (tmp_path / "shards" / "00002.tar").write_bytes(b"")
    args = train_args("data.synthetic=false", f"data.train={tmp_path / 'shards'}")
    code = cli(args if task == "clip" else _mim(args, f"mim.teacher={files / 'clip.pt'}", f"mim.teacher_model={MODEL}"))
    _one_line(capsys, code, str(tmp_path / "shards" / "00002.tar"), "0 bytes")


@pytest.mark.parametrize("key,name,must", [
    ("model.image_init", "model.onnx", ["is an ONNX model", "not a checkpoint"]),
    ("model.image_init", "pairs.csv", ["is a text file (CSV text)", "not a checkpoint"]),
    ("model.pretrained", "export", ["is an evaclip export", "model.image_init", "model.text_init"]),
    ("model.image_init", "export/text", ["holds a text tower only", "model.text_init"]),
    ("model.text_init", "mim.safetensors", ["is a MIM student", "model.image_init"]),
])
def test_an_init_file_of_the_wrong_kind_is_one_line(files, capsys, key, name, must, train_args):
    _one_line(capsys, cli(train_args(f"{key}={files / name}")), key, str(files / name), *must)


def test_an_image_init_of_another_architecture_is_a_short_line(files, capsys, train_args):
    """Before: a 41-line traceback ending in a 4.6 kB list of every shape."""
    err = _one_line(capsys, cli(train_args("model.name=EVA02-CLIP-demo", f"model.image_init={files / 'clip.pt'}")),
                    "tensors do not fit the model's shapes", "another architecture", "visual.cls_token")
    assert len(err) < 500, len(err)


@pytest.mark.parametrize("name,extra,must", [
    ("model.onnx", [], ["is an ONNX model", "not a checkpoint", "a MIM teacher is a CLIP's image tower"]),
    ("pairs.csv", [], ["is a text file (CSV text)", "a MIM teacher is a CLIP's image tower"]),
    ("export/text", [], ["holds a text tower only"]),
    ("export/text/model.safetensors", [f"mim.teacher_model={MODEL}"], ["holds a text tower only"]),
    ("mim.safetensors", [f"mim.teacher_model={MODEL}"], ["is a MIM student", "not a CLIP"]),
    ("clip.pt", [], ["cannot tell which architecture", "set mim.teacher_model=NAME"]),
])
def test_a_teacher_of_the_wrong_kind_is_one_line_in_the_words_of_training(files, capsys, name, extra, must, train_args):
    err = _one_line(capsys, cli(_mim(train_args(), f"mim.teacher={files / name}", *extra)),
                    f"mim.teacher {files / name}", *must)
    assert "--model" not in err and "model.pretrained" not in err and "model.image_init " not in err
