"""The run fingerprint: made of the config fields marked as deciding the weights, so a new such field cannot be
forgotten, and older run files (without a field added since) still resume."""

import json
import shutil
from pathlib import Path
from typing import Annotated

import pytest

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
