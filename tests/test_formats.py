"""AGIEval and LawBench copies of JEC-QA: loading with their quirks, LawBench's own scoring, the normalised overlap."""

import json
import logging
from pathlib import Path

import pytest

from lawtune.cli import main
from lawtune.data import DataError, find_overlap, load_records
from lawtune.scoring import extract_answer, lawbench_judgement

SAMPLES = Path(__file__).resolve().parent / "fixtures" / "benchmarks"
AGIEVAL = SAMPLES / "agieval" / "jec-qa-kd.jsonl"
LAWBENCH = SAMPLES / "lawbench" / "zero_shot" / "1-2.json"
ONE_SHOT = SAMPLES / "lawbench" / "one_shot" / "3-6.json"
JECQA = SAMPLES / "jecqa_train.json"


def test_agieval_labels_as_lists_strings_empty_and_with_stray_punctuation(caplog):
    with caplog.at_level(logging.WARNING, logger="lawtune"):
        loaded = load_records(AGIEVAL)
    records = loaded.records
    assert [r.id for r in records] == ["jec-qa-kd-1", "jec-qa-kd-2", "jec-qa-kd-3", "jec-qa-kd-5"]
    assert [r.answer for r in records] == [["A", "C"], ["B"], ["A", "C"], ["A"]]
    assert loaded.skipped == {"empty label": 1}
    assert all(r.type == "KD" and r.format == "agieval" for r in records)
    assert records[0].options["A"] == "诉讼时效期间为三年" and list(records[0].options) == list("ABCD")
    warnings = [r.getMessage() for r in caplog.records if "stray punctuation" in r.getMessage()]
    assert len(warnings) == 1 and "2 records (lines 3, 5)" in warnings[0]


def test_agieval_label_that_is_not_an_option_is_an_error_with_file_and_line(tmp_path):
    rows = [json.loads(line) for line in AGIEVAL.read_text(encoding="utf-8").splitlines()]
    rows[1]["label"] = ["E"]
    path = tmp_path / "jec-qa-ca.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(DataError, match=r"jec-qa-ca.jsonl:2: label 'E' is not among the options ABCD"):
        load_records(path)
    rows[1]["label"] = ["B"]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert {r.type for r in load_records(path).records} == {"CA"}  # the type comes from the file name


def test_lawbench_inline_options_both_colons_and_answers():
    records = load_records(LAWBENCH).records
    assert [r.answer for r in records] == [["C"], ["B"], ["A"]]
    assert records[0].statement == "根据我国民法典，诉讼时效期间一般为多久？"
    assert records[0].options == {"A": "一年", "B": "二年", "C": "三年", "D": "四年"}
    assert records[1].options["D"] == "行政法规不得设定行政许可"  # full-width colons and the closing 。
    assert all(r.format == "lawbench" and r.type == "KD" for r in records)
    one_shot = load_records(ONE_SHOT).records[0]
    assert one_shot.type == "CA" and "例如" in one_shot.extra["instruction"] and one_shot.options["B"] == "不受影响"


def test_a_lawbench_answer_that_is_not_read_is_an_error(tmp_path):
    rows = json.loads(LAWBENCH.read_text(encoding="utf-8"))
    rows[2]["answer"] = "B"
    path = tmp_path / "1-2.json"
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    with pytest.raises(DataError, match=r"1-2.json:\d+: answer 'B' is not '正确答案：X'"):
        load_records(path)


def test_the_format_is_detected_or_forced():
    with pytest.raises(DataError, match=r"1-2.json:2: data.format=agieval, but the first record has the fields "
                                         r"answer, instruction, question"):
        load_records(LAWBENCH, fmt="agieval")

def test_a_file_of_another_shape_is_named_as_such(tmp_path):
    path = tmp_path / "other.jsonl"
    path.write_text('{"prompt": "…", "completion": "…"}\n', encoding="utf-8")
    with pytest.raises(DataError, match="not a JEC-QA, AGIEval or LawBench file .first record has: completion, prompt"):
        load_records(path)


# LawBench's rule on the text after the last </think>: (output, gold, correct, abstained)
LAWBENCH_TABLE = [
    ("[正确答案]C<eoa>", "C", True, False),
    ("[正确答案]B<eoa>", "C", False, False),
    ("答案：C", "C", True, False),
    ("正确答案：Ｃ", "C", True, False),  # full width
    ("C和D都对", "C", False, False),
    ("我认为是C，不是A", "C", False, False),
    ("无法回答", "C", False, True),
    ("", "C", False, True),
    ("选项c", "C", False, True),  # lower case is not an option letter
    ("<think>A错，B错，D错</think>\n\n[正确答案]C<eoa>", "C", True, False),
    ("<think>显然是C</think>\n\n无法判断", "C", False, True),
    ("<think>A</think>x</think>答案D", "D", True, False),  # the last </think> counts
    ("CC", "C", True, False),
    ("答案为C。理由：略", "C", True, False),
    ("E", "C", False, True),  # not among A-D
    ("A B C D", "C", False, False),
]


@pytest.mark.parametrize("output,gold,correct,abstained", LAWBENCH_TABLE)
def test_lawbench_rule(output, gold, correct, abstained):
    assert lawbench_judgement(output, [gold]) == (correct, abstained)


def test_the_extractor_reads_lawbench_answer_form():
    assert extract_answer("[正确答案]C<eoa>") == ["C"]
    assert extract_answer("<think>A和B都不对</think>\n[正确答案]D<eoa>") == ["D"]


def test_overlap_is_normalised_across_formats(capsys):
    jecqa = load_records(JECQA).records
    lawbench = load_records(LAWBENCH).records
    pairs = find_overlap(jecqa, lawbench)
    assert [(b.id, a.id) for b, a in pairs] == [("1-2-1", "0_1"), ("1-2-3", "0_2")]  # ASCII vs full-width punctuation
    assert main(["data", "overlap", str(JECQA), str(AGIEVAL), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"b_records": 5, "overlap": 1,
                   "examples": [{"b_id": "jec-qa-kd-5", "a_id": "0_2", "statement": "关于物权的设立，下列哪一说法是正确的？"}]}


def test_eval_of_a_lawbench_file_reports_its_score_in_its_own_words(answering_model_dir, tmp_path):
    out = tmp_path / "lb.json"
    assert main(["eval", "--model", str(answering_model_dir), "--data", str(LAWBENCH), "--prompt-format", "native",
                 "--output", str(out), "model.dtype=float32"]) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    s = report["summary"]
    assert [x["pred"] for x in report["samples"]] == [["A"]] * 3  # the rigged model answers A
    assert s["accuracy"] == pytest.approx(1 / 3) and s["lawbench_score"] == pytest.approx(1 / 3)
    assert s["abstention_rate"] == 0 and "after the last </think>" in s["lawbench_rule"]
    assert s["prompt_format"] == "native"


def test_native_prompts_need_a_lawbench_file(answering_model_dir, tmp_path, capsys):
    assert main(["eval", "--model", str(answering_model_dir), "--data", str(JECQA), "--prompt-format", "native",
                 "--output", str(tmp_path / "x.json"), "model.dtype=float32"]) == 2
    assert "needs a LawBench file" in capsys.readouterr().err
