import json
import time
from pathlib import Path

import yaml
from huggingface_hub import ModelCard

from lawtune.card import build_card, write_card
from lawtune.cli import main
from lawtune.demo import demo_data_path
from lawtune.train import train

TEMPLATE = "[More Information Needed]"


def _results(card) -> dict:
    """(data file, metric, mode) -> value of the card's model-index, read back from the saved file."""
    return {(r.dataset_name, r.metric_type, r.metric_config): r.metric_value for r in card.data.eval_results or []}


def _expected(report: dict) -> dict:
    s = report["summary"]
    name = Path(s["data"]).name
    found = {(name, "accuracy", s["mode"]): s["accuracy"]}
    if "lawbench_score" in s:
        found[(name, "lawbench_score", s["mode"])] = s["lawbench_score"]
    if s.get("samples"):
        found[(name, f"maj@{s['samples']}", s["mode"])] = s[f"maj@{s['samples']}"]
    return found


def _report(path: Path, data: str, **summary) -> str:
    """A report of the shape `lawtune eval` writes (the card reads its summary)."""
    s = {"n": 3, "accuracy": 1 / 3, "correct": 1, "invalid": 0, "mode": "direct", "data": data,
         "single": {"n": 2, "accuracy": 0.5}, "multi": {"n": 1, "accuracy": 0.0},
         "by_type": {"KD": {"n": 2, "accuracy": 0.5}, "CA": {"n": 1, "accuracy": 0.0}}, "train_overlap": 0, **summary}
    samples = [{"id": str(i), "gold": ["A"], "correct": i == 0} for i in range(3)]
    path.write_text(json.dumps({"summary": s, "samples": samples}), encoding="utf-8")
    return str(path)


def _adapter_folder(tmp_path: Path, base: str) -> Path:
    """A model folder as lawtune writes one, without weights: what the card reads."""
    folder = tmp_path / "run" / "final_model"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base}), encoding="utf-8")
    (folder / "lawtune_config.yaml").write_text(yaml.safe_dump({
        "working_dir": str(tmp_path), "model": {"path": base}, "lora": {"r": 8, "alpha": 16},
        "data": {"prompt_format": "chat"}, "train": {"max_steps": 7, "learning_rate": 1e-4}}), encoding="utf-8")
    (folder / "data_manifest.json").write_text(json.dumps({
        "files": [{"role": "train", "path": str(tmp_path / "train.json"), "sha256": "ab" * 32, "records": 9}],
        "split": {"train": 8, "eval": 1}, "trained_steps": 7}), encoding="utf-8")
    (tmp_path / "run" / "metrics.jsonl").write_text(
        "\n".join(json.dumps(r) for r in [{"step": 5, "loss": 1.0, "tokens_seen": 1234},
                                           {"step": 7, "eval_accuracy": 0.25, "eval_n": 4, "eval_mode": "direct"}]),
        encoding="utf-8")
    return folder


def test_the_card_carries_the_reported_numbers_and_names_a_hub_base(tmp_path):
    folder = _adapter_folder(tmp_path, "someorg/some-base")
    reports = [_report(tmp_path / "a.json", "exam/kd_test.json"),
               _report(tmp_path / "b.json", "lawbench/1-2.json", mode="reasoning", format="lawbench", accuracy=0.625,
                       lawbench_score=0.7, samples=4, **{"avg@4": 0.55, "maj@4": 0.625, "pass@4": 0.9})]
    write_card(folder, reports)
    card = ModelCard.load(folder / "README.md")  # a local file: nothing is asked of the hub
    assert card.data.base_model == "someorg/some-base" and card.data.library_name == "peft"
    assert card.data.datasets == ["train.json"] and "lawtune" in card.data.tags
    assert _results(card) == {k: v for r in reports for k, v in _expected(json.loads(Path(r).read_text())).items()}
    assert {r.dataset_type for r in card.data.eval_results} == {"jecqa", "lawbench"}  # b's format; a's file is absent
    # two files of one format stay apart (huggingface_hub groups results by type and revision, not by name)
    write_card(folder, [reports[0], _report(tmp_path / "c.json", "exam/ca_test.json", accuracy=0.5)])
    assert len(ModelCard.load(folder / "README.md").data.eval_results) == 2
    assert "ab" * 32 in card.text and "1,234" in card.text and "| 7 |" in card.text
    assert "62.5%" in card.text and "90.0%" in card.text and TEMPLATE not in card.content
    assert "hf upload" in card.text


def test_a_local_base_is_left_out_and_its_license_is_read_from_its_own_card(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# base\n", encoding="utf-8")
    card = build_card(_adapter_folder(tmp_path, str(base)))
    assert card.data.base_model is None and card.data.license == "apache-2.0"
    assert not card.data.eval_results and "No eval report named yet" in card.text


def test_card_command_refuses_a_folder_without_a_model_and_a_bad_report(tmp_path, capsys):
    assert main(["card", str(tmp_path)]) == 2
    assert "holds no model" in capsys.readouterr().err
    folder = _adapter_folder(tmp_path, "someorg/some-base")
    (tmp_path / "bad.json").write_text("{", encoding="utf-8")
    assert main(["card", str(folder), "--report", str(tmp_path / "bad.json")]) == 2
    assert "bad.json" in capsys.readouterr().err and not (folder / "README.md").exists()


def test_a_trained_runs_models_get_lawtunes_card_and_the_command_adds_reports(tiny_config, tiny_model_dir, tmp_path,
                                                                             capsys):
    train(tiny_config("train.eval_steps=2"))
    out = tmp_path / "run"
    manifest = json.loads((out / "final_model" / "data_manifest.json").read_text(encoding="utf-8"))
    for name in ("final_model", "best_model"):
        card = ModelCard.load(out / name / "README.md")
        assert TEMPLATE not in card.content and card.data.library_name == "peft" and card.data.base_model is None
        assert manifest["files"][0]["sha256"] in card.text and (out / name / "curves.png").is_file()
        assert "## Held-out curve" in card.text
    # Two reports: the held-out split, and the training file itself (every question trained on but the held-out).
    reports = []
    for data in (out / "data" / "eval.jsonl", out / "data" / "train.jsonl"):
        report = tmp_path / f"{data.stem}.json"
        assert main(["eval", "--adapter", str(out / "final_model"), "--data", str(data), "--output", str(report),
                     "eval.max_samples=6", "eval.batch_size=8"]) == 0
        reports.append(report)
    before = (out / "final_model" / "README.md").stat().st_mtime_ns
    time.sleep(0.01)  # the refreshed card's mtime must be able to differ
    assert main(["card", str(out), "--report", str(reports[0]), "--report", str(reports[1])]) == 0
    assert "final_model" in capsys.readouterr().out
    card = ModelCard.load(out / "final_model" / "README.md")
    assert (out / "final_model" / "README.md").stat().st_mtime_ns != before
    loaded = [json.loads(r.read_text(encoding="utf-8")) for r in reports]
    assert _results(card) == {k: v for report in loaded for k, v in _expected(report).items()}
    assert {r.dataset_type for r in card.data.eval_results} == {"jecqa"}
    # The contamination check counts the questions in the training split itself; it agrees with eval's count.
    held, trained = (r["summary"]["train_overlap"] for r in loaded)
    assert held == 0 and trained == 6
    assert f"eval.jsonl: {held} of 6 questions" in card.text and f"train.jsonl: {trained} of 6 questions" in card.text
    assert ModelCard.load(out / "best_model" / "README.md").data.eval_results  # both models carry the reports
    assert str(demo_data_path()) not in card.content  # local paths stay off the card: file names only
