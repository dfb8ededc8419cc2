"""The run fingerprint: made of the config fields marked as deciding the weights, so a new such field cannot be
forgotten, and older run files (without a field added since) still resume."""

import json
import logging
import os
import shutil
import stat
from pathlib import Path
from typing import Annotated

import pytest
import yaml

from lawtune.cli import main
from lawtune.config import WEIGHTS, ConfigError, DataConfig, TrainRun, load_config
from lawtune.demo import demo_data_path
from lawtune.rundir import RUN_FILE, prepare_run_dir, run_fingerprint

ROOT = Path(__file__).resolve().parents[1]
OLD_RUN = Path(__file__).resolve().parent / "fixtures" / "run_before_issue26" / RUN_FILE


def _demo_run(*overrides: str) -> TrainRun:
    return load_config(ROOT / "configs" / "demo.yaml", ["model=base_model", f"data.train={demo_data_path()}",
                                                        *overrides])


class DataWithCurriculum(DataConfig):
    curriculum: Annotated[str, WEIGHTS] = "none"
    """A field added later that decides the weights."""


class RunWithCurriculum(TrainRun):
    data: DataWithCurriculum = DataWithCurriculum()


def test_a_new_field_marked_as_deciding_the_weights_is_in_the_fingerprint():
    base = RunWithCurriculum()
    other = RunWithCurriculum(data=DataWithCurriculum(curriculum="easy-first"))
    assert run_fingerprint(base)["data.curriculum"] == "none"
    assert run_fingerprint(other)["data.curriculum"] == "easy-first"
    # a field not marked (how often to log) is not
    assert not any(key.startswith("train.") for key in run_fingerprint(base))


def test_data_format_decides_the_weights():
    assert run_fingerprint(_demo_run())["data.format"] == "auto"
    assert run_fingerprint(_demo_run("data.format=jecqa"))["data.format"] == "jecqa"


def test_files_are_recorded_by_content(tmp_path):
    copy = tmp_path / "train.jsonl"
    shutil.copy(demo_data_path(), copy)
    same = run_fingerprint(_demo_run(f"data.train={copy}"))
    assert same["data.train sha256"] == run_fingerprint(_demo_run())["data.train sha256"]  # moved, same content
    copy.write_text(copy.read_text(encoding="utf-8") + "\n", encoding="utf-8")
    assert run_fingerprint(_demo_run(f"data.train={copy}"))["data.train sha256"] != same["data.train sha256"]
    assert "data.train" not in same  # the path itself does not decide the weights


def test_a_run_file_written_before_data_format_was_recorded_still_resumes(tmp_path):
    """The fixture is lawtune_run.json as the code before issue 26 wrote it for this config (no data.format, no
    data.mix_ratio): the keys it lacks compare equal to their defaults."""
    old = json.loads(OLD_RUN.read_text(encoding="utf-8"))
    assert "data.format" not in old and "data.mix_ratio" not in old
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(OLD_RUN, out / RUN_FILE)
    prepare_run_dir(out, _demo_run(), resume=True, overwrite=False)  # no error: the same run
    shutil.copy(OLD_RUN, out / RUN_FILE)
    with pytest.raises(ConfigError, match="another data.format .*was 'auto', now 'lawbench'"):
        prepare_run_dir(out, _demo_run("data.format=lawbench"), resume=True, overwrite=False)
    with pytest.raises(ConfigError, match="another lora.r"):
        prepare_run_dir(out, _demo_run("lora.r=4"), resume=True, overwrite=False)


@pytest.mark.parametrize("override,key", [("lora.use_dora=true", "lora.use_dora"),
                                          ("lora.use_rslora=true", "lora.use_rslora"),
                                          ("lora.init=pissa", "lora.init"),
                                          ("lora.modules_to_save=[lm_head]", "lora.modules_to_save")])
def test_the_lora_variants_decide_the_weights_and_a_run_from_before_them_still_resumes(override, key, tmp_path):
    old = json.loads(OLD_RUN.read_text(encoding="utf-8"))
    assert key not in old and key in run_fingerprint(_demo_run())
    assert run_fingerprint(_demo_run(override))[key] != run_fingerprint(_demo_run())[key]
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(OLD_RUN, out / RUN_FILE)
    prepare_run_dir(out, _demo_run(), resume=True, overwrite=False)  # plain LoRA: the run it was
    with pytest.raises(ConfigError, match=f"another {key}"):
        prepare_run_dir(out, _demo_run(override), resume=True, overwrite=False)


GENERIC = "以下说法错误的是："


def _questions(path: Path, options: list[dict]) -> Path:
    rows = [{"id": f"1_{i}", "statement": GENERIC, "option_list": o, "answer": ["A"]} for i, o in enumerate(options)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_the_training_split_check_compares_options_and_an_older_manifest_says_it_compares_statements(tmp_path, caplog):
    import hashlib

    from lawtune.config import EvalFileConfig
    from lawtune.data import load_records, statement_key
    from lawtune.evaluate import load_eval_file
    from lawtune.rundir import MANIFEST_FILE, training_overlap
    from lawtune.train.common import prepare_data

    trained = _questions(tmp_path / "train.json", [{"A": "甲说", "B": "乙说", "C": "丙说", "D": "丁说"}])
    # the trained question re-lettered, and the same stem with other options
    evaluated = _questions(tmp_path / "dev.json", [{"A": "丙说", "B": "甲说", "C": "丁说", "D": "乙说"},
                                                   {"A": "戊说", "B": "己说", "C": "庚说", "D": "辛说"}])
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    train, _, manifest = prepare_data(_demo_run(f"data.train={trained}", "data.eval_fraction=0"), tmp_path / "run")
    assert len(train) == 1
    (adapter / MANIFEST_FILE).write_text(json.dumps(manifest), encoding="utf-8")
    records = load_records(evaluated).records
    assert training_overlap(str(adapter), records) == (1, manifest["train_statements_key"])
    with caplog.at_level("WARNING", logger="lawtune"):
        assert load_eval_file(str(evaluated), EvalFileConfig(), str(adapter))[2] == 1
    assert "1 of 2 questions" in caplog.text and "statement and options compared" in caplog.text
    caplog.clear()
    # a manifest written before options were compared: hashes of the folded statement, checked as such
    older = {**manifest, "train_statements_key": "normalized-1", "train_statements_sha256":
             [hashlib.sha256(statement_key(r).encode("utf-8")).hexdigest()[:16] for r in train]}
    (adapter / MANIFEST_FILE).write_text(json.dumps(older), encoding="utf-8")
    assert training_overlap(str(adapter), records) == (2, "normalized-1")
    with caplog.at_level("WARNING", logger="lawtune"):
        load_eval_file(str(evaluated), EvalFileConfig(), str(adapter))
    assert "2 of 2 questions" in caplog.text and "holds statements only" in caplog.text


def test_the_split_still_groups_by_statement_whatever_the_options(tmp_path):
    from lawtune.data import load_records, split_records

    options = [{"A": f"{x}甲", "B": f"{x}乙"} for x in "一二三四五六"]
    records = load_records(_questions(tmp_path / "q.json", options)).records
    records += [type(records[0])(id=f"x{i}", statement=f"问题{i}", options={"A": "a", "B": "b"}, answer=["A"])
                for i in range(6)]
    stem = {r.id for r in records if r.statement == GENERIC}
    for seed in range(4):
        train, held = split_records(records, 0.3, seed)
        assert stem <= {r.id for r in train} or stem <= {r.id for r in held}  # one stem, one side


# ----------------------------------------------------------------------------- relative paths in run files


def _train_in(project: Path, model_dir: Path, monkeypatch) -> Path:
    """A one-step run started in ``project`` with relative paths, as a new user runs the demo's files."""
    from lawtune.train import train

    shutil.copytree(model_dir, project / "outputs" / "demo" / "base_model")
    shutil.copy(demo_data_path(), project / "train.jsonl")
    monkeypatch.chdir(project)
    cfg = load_config(None, ["model.path=outputs/demo/base_model", "model.dtype=float32", "data.train=train.jsonl",
                             "data.max_length=512", "data.eval_fraction=0.1", "train.output_dir=outputs/demo",
                             "train.max_steps=1", "train.save_steps=1", "train.eval_steps=0", "train.optim=adamw_torch",
                             "train.report_to=[none]", "eval.batch_size=16"])
    return Path(train(cfg).final_model).resolve()


def test_a_run_is_read_from_the_folder_it_was_started_in_from_any_other(tiny_model_dir, tmp_path, monkeypatch, capsys,
                                                                         caplog):
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    final = _train_in(project, tiny_model_dir, monkeypatch)
    base, run_file = project / "outputs" / "demo" / "base_model", final / "lawtune_config.yaml"
    # what peft and the config record is relative, as the issue found it; the run file also says where from
    assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == "outputs/demo/base_model"
    assert yaml.safe_load(run_file.read_text())["working_dir"] == str(project)

    monkeypatch.chdir(elsewhere)
    saved = load_config(run_file)
    assert (saved.model.path, saved.data.train) == (str(base), str(project / "train.jsonl"))
    assert saved.train.output_dir == str(project / "outputs" / "demo")
    data = ["--data", str(demo_data_path()), "--max-samples", "2"]
    assert main(["eval", "--config", str(run_file), "--adapter", str(final), *data, "--output", "a.json"]) == 0
    assert json.loads(Path("a.json").read_text())["summary"]["model"] == str(base)
    # no --model: the base the adapter records, said in one line
    with caplog.at_level(logging.INFO, logger="lawtune"):
        assert main(["eval", "--adapter", str(final), *data, "--output", "b.json"]) == 0
    said = [r.getMessage() for r in caplog.records if "no --model" in r.getMessage()]
    assert said == [f"no --model given: using {base}, the base model recorded in {run_file}"]
    assert json.loads(Path("b.json").read_text())["summary"]["model"] == str(base)

    shutil.rmtree(base)  # the error names the file the path came from, and the folder it is read from
    capsys.readouterr()
    for argv in (["--config", str(run_file)], ["--adapter", str(final)]):
        assert main(["eval", *argv, *data, "--output", "c.json"]) == 2
        assert capsys.readouterr().err.strip() == (f"error: {run_file}: model.path outputs/demo/base_model (relative to "
                                                   f"{project}): model directory does not exist" +
                                                   ("; pass --model DIR" if argv[0] == "--adapter" else ""))


def test_a_run_file_written_before_it_recorded_its_folder_names_itself_when_a_path_is_not_there(tiny_model_dir,
                                                                                                  tmp_path, monkeypatch,
                                                                                                  capsys):
    run_file = tmp_path / "final_model" / "lawtune_config.yaml"
    run_file.parent.mkdir()
    run_file.write_text("model:\n  path: outputs/demo/base_model\n  dtype: float32\ndata:\n  prompt_format: chat\n")
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--config", str(run_file), "--data", str(demo_data_path()), "--output", "r.json"]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {run_file}: model.path outputs/demo/base_model (relative to "
                                               f"{tmp_path}): model directory does not exist")
    # a path given on the command line replaces the file's, which is then not looked for
    assert main(["eval", "--config", str(run_file), "--model", str(tiny_model_dir), "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"]["path"] == str(tiny_model_dir)


def test_resume_compares_resolved_paths_so_a_run_started_elsewhere_or_before_continues(tmp_path, monkeypatch):
    project, out = tmp_path / "project", tmp_path / "run"
    (project / "base_model").mkdir(parents=True)
    monkeypatch.chdir(project)
    prepare_run_dir(out, _demo_run(), resume=False, overwrite=False)  # model=base_model, relative
    assert json.loads((out / RUN_FILE).read_text())["model.path"] == str(project / "base_model")
    monkeypatch.chdir(tmp_path)
    prepare_run_dir(out, _demo_run(f"model={project / 'base_model'}"), resume=True, overwrite=False)  # the same base
    with pytest.raises(ConfigError, match="another model.path"):  # base_model here is another folder
        prepare_run_dir(out, _demo_run(), resume=True, overwrite=False)
    # a run file written before paths were resolved holds the path as given: read from where that run was started
    shutil.copy(OLD_RUN, out / RUN_FILE)
    monkeypatch.chdir(project)
    prepare_run_dir(out, _demo_run(f"model={project / 'base_model'}"), resume=True, overwrite=False)


def test_weights_lawtune_writes_have_the_mode_of_its_other_files(tiny_config, tmp_path):
    from lawtune.demo import write_base_model
    from lawtune.train import train

    umask = os.umask(0o022)  # the usual one, whatever the test runner's
    try:
        run = Path(train(tiny_config("train.max_steps=1", "train.save_steps=1")).final_model).parent
        base = write_base_model(tmp_path / "base", [demo_data_path()])
    finally:
        os.umask(umask)
    for folder, other in ((run / "final_model", "adapter_config.json"), (run / "checkpoint-1", "adapter_config.json"),
                          (base, "config.json")):
        weights = list(folder.glob("*.safetensors"))
        assert weights and {stat.S_IMODE(f.stat().st_mode) for f in weights} == {0o644}, folder
        assert stat.S_IMODE((folder / other).stat().st_mode) == 0o644
