"""`lawtune eval --suite`: one model on several benchmarks, a report per run and one page (also in Chromium)."""

import json
import shutil
from pathlib import Path

import pytest

from lawtune.cli import main

SAMPLES = Path(__file__).resolve().parent / "fixtures" / "benchmarks"


@pytest.fixture
def suite_page(answering_model_dir, tmp_path):
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"""
model: {answering_model_dir}
runs:
  - {{name: jecqa_direct, data: {SAMPLES / 'jecqa_train.json'}, mode: direct}}
  - {{name: lawbench_native, data: {SAMPLES / 'lawbench' / 'zero_shot' / '1-2.json'}, mode: direct, prompt_format: native}}
  - {{name: lawbench_k2, data: {SAMPLES / 'lawbench' / 'zero_shot' / '1-2.json'}, mode: reasoning, samples: 2, max_new_tokens: 16}}
""", encoding="utf-8")
    page = tmp_path / "page.html"
    assert main(["eval", "--suite", str(suite), "--output", str(page), "model.dtype=float32"]) == 0
    return page


def test_each_run_writes_its_report_and_the_page_holds_every_benchmark(suite_page):
    reports = {name: json.loads((suite_page.parent / f"page.{name}.json").read_text(encoding="utf-8"))
               for name in ("jecqa_direct", "lawbench_native", "lawbench_k2")}
    assert reports["jecqa_direct"]["summary"]["accuracy"] == pytest.approx(2 / 3)  # gold C, A, A; the model says A
    native = reports["lawbench_native"]["summary"]
    assert native["prompt_format"] == "native" and native["lawbench_score"] == pytest.approx(1 / 3)
    assert reports["lawbench_k2"]["summary"]["samples"] == 2 and "avg@2" in reports["lawbench_k2"]["summary"]
    text = suite_page.read_text(encoding="utf-8")
    assert text.count("<section>") == 2  # one table per benchmark file
    for name in reports:
        assert f'data-run="{name}"' in text and f'id="q-{name}"' in text
    assert "<script" not in text and "http" not in text.split("<body>", 1)[1]  # self-contained


def test_a_suite_with_data_too_is_refused(tmp_path, capsys):
    assert main(["eval", "--suite", "s.yaml", "--data", "d.json", "--model", "m"]) == 2
    assert "give --suite or --data" in capsys.readouterr().err


def test_a_bad_run_is_named(tmp_path, capsys):
    suite = tmp_path / "s.yaml"
    suite.write_text("runs:\n  - {name: a, data: x.json, mood: direct}\n", encoding="utf-8")
    assert main(["eval", "--suite", str(suite), "--model", "m"]) == 2
    assert "runs[1].mood: unknown key; valid keys: name, data, mode" in capsys.readouterr().err


@pytest.mark.browser
def test_the_page_in_headless_chromium(suite_page, chromium):
    from selenium.webdriver.common.by import By

    driver = chromium
    driver.get(suite_page.as_uri())
    rows = driver.find_elements(By.CSS_SELECTOR, "table.runs tr[data-run]")
    assert [r.get_attribute("data-run") for r in rows] == ["jecqa_direct", "lawbench_native", "lawbench_k2"]
    native = driver.find_element(By.CSS_SELECTOR, 'tr[data-run="lawbench_native"]')
    assert native.find_element(By.CLASS_NAME, "accuracy").text == "33.3%"
    assert native.find_element(By.CLASS_NAME, "lawbench").text == "33.3%"
    details = driver.find_element(By.ID, "q-jecqa_direct")
    details.find_element(By.TAG_NAME, "summary").click()  # every question one click away
    assert len(details.find_elements(By.TAG_NAME, "tr")) == 1 + 3


def test_suite_paths_are_read_from_the_suite_files_folder(answering_model_dir, tmp_path, monkeypatch):
    (tmp_path / "suites" / "bench").mkdir(parents=True)
    shutil.copy(SAMPLES / "jecqa_train.json", tmp_path / "suites" / "bench" / "jecqa.json")
    suite = tmp_path / "suites" / "s.yaml"
    suite.write_text(f"model: {answering_model_dir}\nruns:\n  - {{name: jecqa, data: bench/jecqa.json}}\n",
                     encoding="utf-8")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["eval", "--suite", str(suite), "--output", "page.html", "model.dtype=float32"]) == 0
    report = json.loads((elsewhere / "page.jecqa.json").read_text(encoding="utf-8"))
    assert Path(report["summary"]["data"]).resolve() == (tmp_path / "suites" / "bench" / "jecqa.json").resolve()


def test_a_missing_suite_file_names_its_run_and_a_files_warning_prints_once(tmp_path, monkeypatch, capsys, caplog):
    shutil.copy(SAMPLES / "agieval" / "jec-qa-kd.jsonl", tmp_path / "jec-qa-kd.jsonl")
    suite = tmp_path / "s.yaml"
    suite.write_text("runs:\n  - {name: kd_direct, data: jec-qa-kd.jsonl}\n  - {name: kd_choice, data: jec-qa-kd.jsonl, "
                     "mode: choice}\n  - {name: ca5, data: ca5.jsonl}\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path.parent)
    assert main(["eval", "--suite", str(suite), "--model", "m"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{suite}: run ca5: " in err and "ca5.jsonl: file not found" in err
    suite.write_text("runs:\n  - {name: kd_direct, data: jec-qa-kd.jsonl}\n  - {name: kd_choice, data: jec-qa-kd.jsonl, "
                     "mode: choice}\n", encoding="utf-8")
    caplog.clear()
    with caplog.at_level("WARNING", logger="lawtune"):
        assert main(["eval", "--suite", str(suite), "--model", str(tmp_path / "no_model")]) == 2  # after the files
    messages = [r.getMessage() for r in caplog.records]
    assert sum("stray punctuation" in m for m in messages) == 1
    assert sum("skipped 1 records (empty label)" in m for m in messages) == 1
