"""``make demo`` (evaclip/demo.py): the three stages are wired to each other and to the data, the tables read the runs'
metrics, and the whole bootstrap runs end to end at a tiny step count (the figures themselves: docs/DEMO.md)."""
import json
from pathlib import Path

import pytest

from evaclip import demo
from evaclip.models import get_model_config

STUB = {"train": "d/train/train-{00000..00001}.tar", "zeroshot": "d/zeroshot", "knn_train": "d/knn_train",
        "knn_val": "d/zeroshot", "train_num_samples": 256}


def test_stages_read_each_other(tmp_path):
    cfgs = {s: demo.stage_config(s, demo.stage_overrides(s, STUB, tmp_path)) for s in (demo.TEACHER, demo.MIM,
                                                                                     demo.EVA_CLIP)}
    teacher, mim, eva = cfgs[demo.TEACHER], cfgs[demo.MIM], cfgs[demo.EVA_CLIP]
    assert (teacher.task, mim.task, eva.task) == ("clip", "mim", "clip")
    assert mim.mim.teacher == str(tmp_path / demo.TEACHER)
    assert eva.model.image_init == str(tmp_path / demo.MIM) and eva.model.text_init == str(tmp_path / demo.TEACHER)
    assert teacher.eval.zeroshot == eva.eval.zeroshot == "d/zeroshot" and teacher.eval.every == demo.TEACHER_EVAL_EVERY
    assert (mim.mim.val, mim.mim.knn_train, mim.mim.knn_val) == ("d/zeroshot", "d/knn_train", "d/zeroshot")
    assert {c.data.train for c in cfgs.values()} == {STUB["train"]}
    assert {Path(c.output_dir) / c.name for c in cfgs.values()} == {tmp_path / s for s in cfgs}
    # the student is the teacher's image-tower shape; EVA-CLIP is the teacher's architecture (both inits fit)
    shapes = [get_model_config(c.model.name, **c.model.overrides).vision for c in cfgs.values()]
    assert shapes[0] == shapes[1] == shapes[2] and teacher.model.name == eva.model.name
    assert eva.optim.name == "lamb" and eva.model.token_drop == 0.5
    assert eva.max_steps * 3 <= teacher.max_steps  # the target: the teacher's top-1 in a third of its steps


def _metrics(run: Path, points: dict[int, float]) -> None:
    run.mkdir(parents=True)
    lines = [{"event": "start", "step": 0}] + [{"step": s, demo.TOP1: v} for s, v in points.items()]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")


def test_seed_controls_are_wired(tmp_path):
    """--seeds: the teacher copy loads the teacher's whole image tower, the text-only controls no image init, and
    EVA-02's setting has a teacher wider and deeper than the student, whose student and text tower the EVA-CLIP
    loads."""
    runs = {k: demo.stage_config(r, o) for k, (r, o) in demo.control_overrides(STUB, tmp_path, [], {
        demo.TEACHER: [], demo.MIM: [], demo.EVA_CLIP: []}).items()}
    assert runs["copy"].model.image_init == str(tmp_path / demo.TEACHER)
    assert runs["copy"].model.text_init == str(tmp_path / demo.TEACHER)
    assert runs["text_only"].model.image_init is None and runs["text_only"].model.text_init is not None
    assert runs["scratch"].model.image_init is None and runs["scratch"].model.text_init is None
    wide = get_model_config(runs["wide_teacher"].model.name).vision
    student = get_model_config(runs["wide_mim"].model.name).vision
    assert wide.width > student.width and wide.depth > student.depth
    assert runs["wide_mim"].mim.teacher == str(tmp_path / f"{demo.TEACHER}_wide")
    assert runs["wide_eva"].model.image_init == str(tmp_path / f"{demo.MIM}_wide")
    assert runs["wide_eva"].model.text_init == runs["wide_text_only"].model.text_init == runs["wide_mim"].mim.teacher
    assert len({Path(c.output_dir) / c.name for c in runs.values()}) == len(runs)  # each its own run folder
    assert {c.max_steps for k, c in runs.items() if c.task == "clip" and "teacher" not in k} == {100}


def test_tables(tmp_path):
    _metrics(tmp_path / "t", {50: 0.2, 100: 0.5, 300: 0.9})
    _metrics(tmp_path / "e", {25: 0.8, 50: 0.91, 100: 0.95})
    assert demo.crossing(demo.curve(tmp_path / "e"), 0.9) == 50
    assert demo.crossing(demo.curve(tmp_path / "e"), 0.96) is None
    table = demo.comparison_table(tmp_path / "t", tmp_path / "e").splitlines()
    assert table[2:] == ["| 25 | - | 80.0 |", "| 50 | 20.0 | 91.0 |", "| 100 | 50.0 | 95.0 |", "| 300 | 90.0 | - |"]
    row = {"seed": 3, "teacher": demo.curve(tmp_path / "t"), "knn": {400: 0.7}, "eva": demo.curve(tmp_path / "e"),
           "copy": {100: 0.97}, "text_only": {100: 0.6}, "scratch": {100: 0.4}, "wide_teacher": {300: 0.93},
           "wide_mim": {400: 0.75}, "wide_eva": {100: 0.94}, "wide_text_only": {100: 0.62}}
    text = demo.seeds_table([row])
    assert "| 3 | 90.0 | 70.0 | 95.0 | 97.0 | 60.0 | 40.0 | 93.0 | 75.0 | 94.0 | 62.0 |" in text
    assert "beats the teacher copy in 0 of 1 seeds, the text-only init in 1 of 1, its 300-step teacher in 1 of 1" \
        in text
    assert "beats its larger teacher in 1 of 1 seeds" in text
    doc = tmp_path / "DEMO.md"
    doc.write_text(f"intro\n{demo.TABLE_BEGIN}\nold\n{demo.TABLE_END}\nafter\n")
    demo.write_table(doc, "new")
    assert doc.read_text() == f"intro\n{demo.TABLE_BEGIN}\nnew\n{demo.TABLE_END}\nafter\n"


def test_bad_override_fails_before_any_work(tmp_path, capsys):
    assert demo.main(["--data", str(tmp_path / "d"), "--runs", str(tmp_path), "--mim", "mim.mask_ratoi=0.5"]) == 2
    assert "mim.mask_ratoi" in capsys.readouterr().err and not (tmp_path / "d").exists()


@pytest.mark.slow
def test_bootstrap_end_to_end_tiny(tmp_path, capsys):
    """Stages 1-3 at two steps each on a small digits set, exported; a second call finds every stage finished."""
    from data_tools.make_demo import make_demo

    make_demo(str(tmp_path / "d"), seed=0, copies=1, show_progress=False)
    args = ["--data", str(tmp_path / "d"), "--runs", str(tmp_path / "runs"), "model.name=EVA02-CLIP-tiny",
            "data.batch_size=16", "max_steps=2", "optim.warmup_steps=1", "log.every=1", "--teacher", "eval.every=1",
            "model.token_drop_until=1",
            "--mim", "mim.knn_train=null", "mim.knn_val=null", "--eva-clip", "eval.every=1",
            "model.token_drop_until=1"]
    demo.main(args)  # the verdict (exit code) means nothing at two steps
    out = capsys.readouterr().out
    assert "dropped: mask_token, lm_head.weight, lm_head.bias; fresh: visual.blocks.0.attn.inner_attn_ln.bias" in out
    result = json.loads((tmp_path / "runs" / demo.EVA_CLIP / "demo_result.json").read_text())
    assert set(result["curves"]["eva_init"]) == {"1", "2"} and result["zeroshot_top1"] is not None
    assert [s["steps"] for s in result["stages"]] == [2, 2, 2] and result["stages"][1]["task"] == "mim"
    assert (tmp_path / "runs" / demo.EVA_CLIP / "export").is_dir()
    assert (tmp_path / "runs" / demo.MIM / "export" / "eva_mim.safetensors").is_file()
    demo.main(args)  # resumes: every stage is finished, nothing is retrained (the first call's seconds are kept)
    again = json.loads((tmp_path / "runs" / demo.EVA_CLIP / "demo_result.json").read_text())
    assert again["stages"] == result["stages"] and again["curves"] == result["curves"]
