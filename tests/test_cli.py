import json
import subprocess
import sys
from pathlib import Path

import pytest

from lawtune.cli import main

from conftest import write_jsonl


def test_data_check_json(tmp_path, capsys, tiny_model_dir):
    rows = [{"id": "0_1", "statement": "下列哪些正确？", "option_list": ["甲", "乙", "丙", "丁"], "answer": ["A", "B"]},
            {"id": "1_2", "statement": "甲打乙，哪一正确？", "option_list": ["甲", "乙"], "answer": ["B"]},
            {"id": "1_3", "statement": "甲打乙，哪一正确？", "option_list": ["甲", "乙"], "answer": []}]
    path = write_jsonl(tmp_path / "d.json", rows)
    assert main(["data", "check", str(path), "--json", "--tokenizer", str(tiny_model_dir)]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["records"] == 2 and stats["skipped"] == {"empty answer list": 1}
    assert (stats["single"], stats["multi"], stats["repeated_statements"]) == (1, 1, 0)
    assert stats["by_type"] == {"KD": 1, "CA": 1, "unknown": 0}
    assert 0 < stats["token_length"]["p50"] <= stats["token_length"]["max"]


def test_bad_data_exits_2_with_file_and_line_no_traceback(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"id": "1", "statement": "s", "option_list": ["a", "b"], "answer": ["A"]}\n{broken\n', encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "lawtune", "data", "check", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert f"{path}:2: malformed JSON" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_config_key_exits_2(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("# lawtune train c.yaml\ntrain:\n  max_stepz: 1\n", encoding="utf-8")
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "train.max_stepz: unknown key" in err and len(err.strip().splitlines()) == 1


def test_eval_and_compare_from_the_command_line(tmp_path, tiny_model_dir, capsys):
    from lawtune.demo import demo_data_path

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    common = ["--model", str(tiny_model_dir), "--data", str(demo_data_path()), "--max-samples", "12",
              "--batch-size", "12", "model.dtype=float32"]
    assert main(["eval", *common, "--mode", "direct", "--output", str(a)]) == 0
    assert main(["eval", *common, "--mode", "choice", "--output", str(b)]) == 0
    html = tmp_path / "c.html"
    assert main(["compare", str(a), str(b), "--html", str(html)]) == 0
    out = capsys.readouterr().out
    assert "McNemar" in out and "WARNING" in out  # the two reports differ in mode
    assert "<svg" in html.read_text(encoding="utf-8")
    assert json.loads(a.read_text(encoding="utf-8"))["summary"]["n"] == 12


def test_missing_model_directory_is_one_line_exit_2(tmp_path, capsys):
    from lawtune.demo import demo_data_path

    config = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    code = main(["train", str(config), "--model", str(tmp_path / "nope"), "--data", str(demo_data_path()),
                 "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "model directory does not exist" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["predict", "compare"])
def test_an_output_that_is_a_directory_is_refused_before_the_work(command, tmp_path, capsys):
    """The work (generation, loading reports) would otherwise be done and then lost in a traceback."""
    folder = tmp_path / "out"
    folder.mkdir()
    args = {"predict": ["predict", "--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "no-data.json"),
                        "--output", str(folder)],
            "compare": ["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--html", str(folder)]}[command]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "is a directory" in err and len(err.splitlines()) == 1
