"""The command line: ``--help`` of every entry point, ``python -m evaclip``, and ``evaclip config``."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest
import yaml

from evaclip.cli import COMMANDS, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _help(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_top_level_usage_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("train", "eval", "export", "bench", "config"):
        assert f"\n  {cmd} " in out
    assert "python -m evaclip" in out
    assert main(["nope"]) == 2


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_names_an_entry_point_its_module_has(name):
    import importlib

    module, func, _ = COMMANDS[name]
    assert callable(getattr(importlib.import_module(module), func, None)), f"{module}.{func}"


def test_python_dash_m_evaclip(tmp_path):
    r = subprocess.run([sys.executable, "-m", "evaclip", "config", "--plain", "max_steps=3"], capture_output=True,
                       text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load(r.stdout)["max_steps"] == 3


@pytest.mark.parametrize("argv, expected", [
    (["eval"], ["usage: evaclip eval", "run folder", "newest complete checkpoint", "ImageNet-style folder (>= 2",
                "no globs"]),
    (["export"], ["usage: evaclip export", "run folder", "(default: safetensors", "register_open_clip",
                  "README.md"]),
    (["bench", "optimizer"], ["usage: evaclip bench optimizer", "--steps STEPS", "timed optimizer steps"]),
    (["bench", "data"], ["usage: evaclip bench data", "open_clip.image_transform(224, is_train=True)"]),
    (["bench", "train"], ["usage: evaclip bench train", "untimed steps before each round"]),
    (["bench", "attention"], ["usage: evaclip bench attention", "sequence lengths"]),
    (["config"], ["usage: evaclip config", "key=value", "--plain"]),
])
def test_help_of_every_entry_point(capsys, argv, expected):
    out = _help(capsys, *argv)
    for e in expected:
        assert e in " ".join(out.split()), (argv, e)
    assert "usage: evaclip [-h]" not in out and "python -m evaclip.bench" not in out.splitlines()[0]
    assert "``" not in out  # no raw reStructuredText markup


@pytest.mark.parametrize("module", ["train", "attention"])
def test_every_bench_option_has_help(module):
    import importlib

    p = argparse.ArgumentParser()
    importlib.import_module(f"evaclip.bench.{module}").add_args(p)
    missing = [a.option_strings[0] for a in p._actions if a.option_strings and not a.help]
    assert not missing, f"bench {module} options without help: {missing}"


def test_config_prints_the_resolved_config_as_a_valid_recipe(capsys, tmp_path):
    from evaclip.config import load_config, to_dict

    args = ["recipes/demo_cpu.yaml", "optim.lr=1e-3", "model.overrides.vision.width=64"]
    assert main(["config", *args]) == 0
    out = capsys.readouterr().out
    assert yaml.safe_load(out) == to_dict(load_config(args[0], args[1:]))
    lines = out.splitlines()
    lr = next(ln for ln in lines if ln.strip().startswith("lr:"))
    assert lr.strip().startswith("lr: 0.001") and "(default: 0.0005)" in lr and "logit scale" in lr
    drop = next(ln for ln in lines if ln.strip().startswith("token_drop:"))
    assert "fraction of image patch tokens dropped" in drop  # the key's comment from the config schema
    # the output works as a recipe
    (tmp_path / "r.yaml").write_text(out)
    assert to_dict(load_config(str(tmp_path / "r.yaml"))) == to_dict(load_config(args[0], args[1:]))
    # a comment that gives the default in words gets no second, different one
    name = next(ln for ln in lines if ln.startswith("name:"))
    assert name.count("default") == 1 and "(default: recipe name)" in name
    # no recipe: the defaults (overrides alone work too)
    assert main(["config", "max_steps=7"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == to_dict(load_config(None, ["max_steps=7"]))


def test_config_errors_are_one_line(capsys):
    assert main(["config", "recipes/demo_cpu.yaml", "optim.lrr=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("evaclip config: error:") and "optim.lrr" in err
    assert main(["config", "no_such_recipe"]) == 2
    assert "recipe not found" in capsys.readouterr().err


def test_train_help_lists_every_key_a_resume_may_change(capsys):
    from evaclip.engine.run_dir import RESUME_MUTABLE

    assert main(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for key in RESUME_MUTABLE:
        assert (key + "*" if key.endswith(".") else key) in text, key
    assert "optim.extend" in text and "RUN/config.yaml" in text
