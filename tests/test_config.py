"""Config: recipes load, unknown keys and wrong types fail early naming the key, the resolved config round-trips."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from evaclip.config import ConfigError, from_dict, from_yaml, load_config, to_dict, to_yaml
from evaclip.engine.loop import check_global_batch
from evaclip.train import cli

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_loads_and_round_trips(recipe):
    cfg = load_config(recipe)
    assert cfg.name == recipe.stem
    assert from_dict(yaml.safe_load(yaml.safe_dump(to_dict(cfg)))) == cfg


def test_paper_recipes_match_the_published_global_batch():
    expect = {"eva02_clip_b16": 131072, "eva02_clip_l14": 131072, "eva02_clip_l14_336": 61440,
              "eva02_clip_bige14_plus": 144000, "eva01_clip_g14_plus": 114688}
    for name, batch in expect.items():
        cfg = load_config(name)
        assert cfg.global_batch == batch
        assert cfg.optim.name == "lamb" and cfg.optim.grad_clip_norm == 5.0
        assert batch % cfg.data.batch_size == 0  # a whole number of GPUs at accum 1
    assert load_config("eva02_clip_bige14_plus").model.token_drop == 0.5


def test_unknown_override_key_is_named():
    with pytest.raises(ConfigError, match=r"^config key 'optim\.lrr': not in OptimCfg; did you mean 'lr'\?$"):
        load_config("demo_cpu", ["optim.lrr=1e-3"])
    with pytest.raises(ConfigError, match="config key 'modle': not in ClipTrainCfg; did you mean 'model'"):
        load_config("demo_cpu", ["modle.name=x"])
    with pytest.raises(ConfigError, match="'optim.lr.x'"):
        load_config("demo_cpu", ["optim.lr.x=1"])
    # a top-level key gets its suggestion too (OmegaConf gives none there)
    with pytest.raises(ConfigError, match=r"^config key 'maxsteps': not in ClipTrainCfg; did you mean 'max_steps'\?$"):
        load_config("demo_cpu", ["maxsteps=3"])


def test_a_token_drop_phase_that_never_ends_before_max_steps_is_refused():
    """demo_cpu unmasks at step 260: a 200-step run of it would never run its unmasked phase."""
    with pytest.raises(ConfigError, match=r"'model.token_drop_until' \(260\) is not below max_steps \(200\)"):
        load_config("demo_cpu", ["max_steps=200"])
    assert load_config("demo_cpu", ["max_steps=200", "model.token_drop_until=160"]).max_steps == 200
    assert load_config("demo_cpu", ["max_steps=200", "model.token_drop=0"]).max_steps == 200


def test_unknown_recipe_key_is_named(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  lr: 1.0e-3\n  warmup: 10\n")
    with pytest.raises(ConfigError, match="config key 'optim.warmup': not in OptimCfg"):
        load_config(recipe)


@pytest.mark.parametrize("override, key", [("data.batch_size=big", "data.batch_size"), ("accum_freq=1.5", "accum_freq"),
                                           ("model.grad_checkpointing=maybe", "model.grad_checkpointing"),
                                           ("precision=fp8", "precision"), ("model.token_drop=1.0", "model.token_drop"),
                                           ("max_bad_steps=0", "max_bad_steps")])
def test_wrong_type_or_value_is_named(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config("demo_cpu", [override])


def test_overrides_are_typed():
    cfg = load_config("demo_cpu", ["optim.lr=2e-3", "max_steps=7", "resume=auto", "model.token_drop_until=5"])
    assert cfg.optim.lr == 2e-3 and cfg.max_steps == 7 and cfg.resume == "auto" and cfg.model.token_drop_until == 5


def test_global_batch_mismatch_suggests_accum_freq():
    cfg = load_config("eva02_clip_b16")
    check_global_batch(cfg, 64)
    with pytest.raises(ConfigError, match="set accum_freq=8"):
        check_global_batch(cfg, 8)


def test_cli_rejects_bad_key_before_any_work(tmp_path, capsys):
    rc = cli(["demo_cpu", "optim.lrr=1", f"output_dir={tmp_path}"])
    assert rc == 2
    assert "config key 'optim.lrr': not in OptimCfg" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing was created


def test_evaclip_command_dispatch(capsys):
    from evaclip.cli import main as evaclip_main

    assert evaclip_main(["--help"]) == 0
    assert "train" in capsys.readouterr().out
    assert evaclip_main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err
    assert evaclip_main(["train", "demo_cpu", "data.batch_size=x"]) == 2
    assert "'data.batch_size'" in capsys.readouterr().err


def test_null_override_clears_optional_keys():
    cfg = load_config("demo_cpu", ["eval.zeroshot=digits", "eval.zeroshot=null", "model.token_drop_until=null"])
    assert cfg.eval.zeroshot is None and cfg.model.token_drop_until is None
    with pytest.raises(ConfigError, match="'data.batch_size'"):
        load_config("demo_cpu", ["data.batch_size=null"])


@pytest.mark.parametrize("override, expect", [
    ("optim.lrr=1", "config key 'optim.lrr': not in OptimCfg; did you mean 'lr'?"),
    ("data.batch_size=big", "config key 'data.batch_size': Value 'big' of type 'str' could not be converted"),
    ("optim.name=sgd", "config key 'optim.name': Invalid value 'sgd', expected one of ['lamb', 'adamw']"),
    ("model.overrides.vision.widht=64", "config key 'model.overrides.vision.widht': not in VisionCfg; did you mean "
                                        "'width'?"),
    ("model.overrides.vision.width=wide", "config key 'model.overrides.vision.width': Value 'wide'"),
    ("model.overrides.width=64", "config key 'model.overrides.width': not in CLIPCfg; tower keys go under a tower: "
                                 "model.overrides.vision.width or model.overrides.text.width"),
    ("optim.betas=[0.9,", "override 'optim.betas=[0.9,': the value is not valid YAML"),
    ("optim.lr.x=1", "config key 'optim.lr.x': 'optim.lr' is a value, not a section"),
])
def test_evaclip_train_config_errors_are_one_line_naming_the_key(tmp_path, capsys, override, expect):
    rc = cli(["demo_cpu", override, f"output_dir={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert expect in err
    assert not any(tmp_path.iterdir())


def test_malformed_recipe_names_the_file_and_line(tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("optim:\n  lr: 1.0e-3\n  betas: [0.9, 0.98\nmax_steps: 3\n")
    assert cli([str(recipe), f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(recipe) in err and "line 4" in err, err
    assert "<unicode string>" not in err


def test_glob_in_the_train_spec_is_a_config_error():
    with pytest.raises(ConfigError, match=r"config key 'data.train': 'shards/\*.tar' is a glob; name shards with "
                                          "braces"):
        load_config("demo_cpu", ["data.train=shards/*.tar"])


def test_mim_teacher_model_contradicting_the_teacher_run_is_a_config_error(tmp_path):
    from evaclip.tasks.mim import check_mim_cfg

    run = tmp_path / "teacher_run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"name": "EVA02-CLIP-tiny"}}))
    args = {"task": "mim", "model.name": "EVA02-CLIP-tiny", "data.synthetic": "true", "mim.teacher": str(run)}
    check_mim_cfg(load_config(None, args))  # the run's own config names it: fine
    check_mim_cfg(load_config(None, {**args, "mim.teacher_model": "EVA02-CLIP-tiny"}))  # agreeing: fine
    with pytest.raises(ConfigError, match="config key 'mim.teacher_model' is 'EVA02-CLIP-demo' but the teacher"):
        check_mim_cfg(load_config(None, {**args, "mim.teacher_model": "EVA02-CLIP-demo"}))


@pytest.mark.parametrize("name,schema", [("clip", "ClipTrainCfg"), ("mim", "MIMTrainCfg")])
def test_stored_configs_written_before_the_per_task_schemas_still_load(name, schema):
    """``config.yaml`` of the demo's runs as the single-schema main wrote them (every task's sections in each)."""
    text = (Path(__file__).parent / "data" / f"stored_config_{name}_v1.yaml").read_text()
    cfg = from_yaml(text)
    stored = yaml.safe_load(text)
    assert type(cfg).__name__ == schema and cfg.task == name
    assert (cfg.model.name, cfg.optim.lr, cfg.data.batch_size) == (stored["model"]["name"], stored["optim"]["lr"],
                                                                  stored["data"]["batch_size"])
    assert not hasattr(cfg, "mim" if name == "clip" else "loss")
    if name == "mim":
        assert cfg.mim.teacher == stored["mim"]["teacher"] and not hasattr(cfg.eval, "zeroshot")
    assert from_yaml(to_yaml(cfg)) == cfg  # and what this version writes reads back the same


def test_a_section_of_another_task_is_named_with_its_task():
    with pytest.raises(ConfigError, match=r"^config key 'mim': a section of task mim, not of task=clip"):
        load_config("demo_cpu", ["mim.mask_ratio=0.5"])
    with pytest.raises(ConfigError, match=r"^config key 'loss': a section of task clip, not of task=mim"):
        load_config("demo_mim_cpu", ["loss.name=siglip"])
    with pytest.raises(ConfigError, match=r"^config key 'task': unknown task 'nosuchtask'"):
        load_config("demo_cpu", ["task=nosuchtask"])
