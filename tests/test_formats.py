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
    assert out == {"b_records": 5, "overlap": 1, "same_statement_only": 0, "pairs": [{"a_id": "0_2", "b_id": "jec-qa-kd-5"}]}


GENERIC = "以下说法错误的是："


def _stem_file(path: Path, options: list[dict]) -> Path:
    rows = [{"id": f"0_{i}", "statement": GENERIC, "option_list": o, "answer": ["A"]} for i, o in enumerate(options)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_a_shared_stem_with_other_options_is_another_question_and_a_relettered_copy_the_same(tmp_path, capsys):
    first, second = {"A": "甲说", "B": "乙说", "C": "丙说", "D": "丁说"}, {"A": "戊说", "B": "己说", "C": "庚说", "D": "辛说"}
    a = _stem_file(tmp_path / "a.json", [first, second, first])  # the first question twice
    relettered = {"A": "丙说", "B": "丁说", "C": "甲说", "D": "乙说"}
    b = tmp_path / "jec-qa-ca.jsonl"  # AGIEval: options written (A)…, punctuation of its own
    b.write_text("".join(json.dumps({"passage": None, "question": f"以下说法错误的是 {tail}", "label": ["A"],
                                     "options": [f"({k}){v}。" for k, v in options.items()]}, ensure_ascii=False) + "\n"
                         for tail, options in (("", relettered), ("?", {"A": "甲说", "B": "乙说", "C": "丙说", "D": "壬说"}))),
                 encoding="utf-8")
    pairs = find_overlap(load_records(a).records, load_records(b).records)
    assert [(rb.id, ra.id) for rb, ra in pairs] == [("jec-qa-ca-1", "0_0"), ("jec-qa-ca-1", "0_2")]
    assert main(["data", "overlap", str(a), str(b), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["overlap"] == 1 and out["same_statement_only"] == 1 and out["b_records"] == 2
    assert out["pairs"] == [{"a_id": "0_0", "b_id": "jec-qa-ca-1"}, {"a_id": "0_2", "b_id": "jec-qa-ca-1"}]
    assert main(["data", "overlap", str(a), str(b)]) == 0
    assert "1 of 2 questions" in capsys.readouterr().out


@pytest.mark.parametrize("a,b,dropped", [(LAWBENCH, JECQA, {1, 2}), (JECQA, AGIEVAL, {5}), (JECQA, LAWBENCH, {1, 3})],
                         ids=["jecqa", "agieval", "lawbench"])
def test_exclude_output_writes_b_without_the_overlap_in_b_format(a, b, dropped, tmp_path, capsys):
    out = tmp_path / b.name  # named like B: AGIEval and LawBench read KD/CA from the name
    assert main(["data", "overlap", str(a), str(b), "--exclude-output", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    before = load_records(b, require_answer=False).records
    after = load_records(out, require_answer=False).records
    kept = [r for r in before if r.position not in dropped]
    assert result["overlap"] == len(dropped) and result["exclude_output"]["records"] == len(kept)
    assert [(r.statement, r.options, r.answer, r.type, r.format) for r in after] == \
        [(r.statement, r.options, r.answer, r.type, r.format) for r in kept]
    if b == LAWBENCH:  # a JSON array of B's own objects
        assert json.loads(out.read_text(encoding="utf-8")) == \
            [o for i, o in enumerate(json.loads(b.read_text(encoding="utf-8")), start=1) if i not in dropped]
    else:  # JSON Lines: B's other lines, byte for byte
        lines = b.read_text(encoding="utf-8").splitlines()
        assert out.read_text(encoding="utf-8").splitlines() == [x for i, x in enumerate(lines, start=1) if i not in dropped]


def test_exclude_output_named_unlike_b_says_the_type_is_lost(tmp_path, caplog):
    out = tmp_path / "clean.jsonl"
    with caplog.at_level(logging.WARNING, logger="lawtune"):
        assert main(["data", "overlap", str(JECQA), str(AGIEVAL), "--exclude-output", str(out)]) == 0
    assert "name it like B, e.g. jec-qa-kd.clean.jsonl" in caplog.text
    assert main(["data", "overlap", str(JECQA), str(AGIEVAL), "--exclude-output", str(AGIEVAL)]) == 2


def test_eval_of_a_lawbench_file_reports_its_score_in_its_own_words(answering_model_dir, tmp_path, capsys):
    out = tmp_path / "lb.json"
    assert main(["eval", "--model", str(answering_model_dir), "--data", str(LAWBENCH), "--prompt-format", "native",
                 "--output", str(out), "model.dtype=float32"]) == 0
    assert "lawbench_score 0.3333, abstention 0.0000" in capsys.readouterr().out  # the one-line summary
    report = json.loads(out.read_text(encoding="utf-8"))
    s = report["summary"]
    assert [x["pred"] for x in report["samples"]] == [["A"]] * 3  # the rigged model answers A
    assert s["accuracy"] == pytest.approx(1 / 3) and s["lawbench_score"] == pytest.approx(1 / 3)
    assert s["abstention_rate"] == 0 and "after the last </think>" in s["lawbench_rule"]
    assert s["prompt_format"] == "native" and s["do_sample"] is False  # greedy: what compare tells apart


@pytest.mark.parametrize("command", [
    ["eval", "--data", str(JECQA)], ["eval", "--data", str(AGIEVAL)], ["predict", "--data", str(JECQA)],
    ["distill", "--data", str(JECQA)], ["ask", "--question", "题干\nA. 甲\nB. 乙"], ["serve", "--port", "0"],
    ["data", "check", str(JECQA), "--tokenizer"]])
def test_native_prompts_need_a_lawbench_file_and_say_so_before_the_model_loads(command, tmp_path, capsys):
    """The model named does not exist: a command that loaded it first would fail on that instead."""
    missing = str(tmp_path / "no_model")
    extra = {"data": [missing], "ask": ["--model", missing], "serve": ["--model", missing]}.get(
        command[0], ["--model", missing, "--output", str(tmp_path / "x.json")])
    assert main([*command, *extra, "--prompt-format", "native"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "prompt format native asks a LawBench file's own instruction" in err, err
    assert not (tmp_path / "x.json").exists()


def _renamed(source: Path, tmp_path: Path) -> Path:
    copy = tmp_path / f"questions{source.suffix}"  # a name that says neither kd/ca nor 1-2/3-6
    copy.write_bytes(source.read_bytes())
    return copy


@pytest.mark.parametrize("source", [AGIEVAL, ONE_SHOT])
def test_the_type_of_a_renamed_copy_is_given_with_type(source, tmp_path, capsys):
    copy = _renamed(source, tmp_path)
    told = load_records(source).records[0].type
    assert {r.type for r in load_records(copy).records} == {"unknown"}  # the name said it
    assert {r.type for r in load_records(copy, question_type=told).records} == {told}
    assert main(["data", "check", str(copy), "--type", told, "--json"]) == 0
    by_type = json.loads(capsys.readouterr().out)["by_type"]
    assert by_type[told] == len(load_records(copy, require_answer=False).records) and by_type["unknown"] == 0


def test_training_reads_the_type_given_too(tmp_path):
    from lawtune.cli import parse_args
    from lawtune.config import load_config
    from lawtune.train.common import prepare_data

    assert vars(parse_args(["train", "run.yaml", "--type", "KD"])[1])["data.type"] == "KD"
    cfg = load_config(None, [f"data.train={_renamed(AGIEVAL, tmp_path)}", "data.eval_fraction=0"],
                      settings={"data.type": "KD"})
    train, _, _ = prepare_data(cfg, tmp_path / "run")
    assert {r.type for r in train} == {"KD"}
    assert {r.type for r in load_records(tmp_path / "run" / "data" / "train.jsonl").records} == {"KD"}  # as written


def test_eval_reports_the_type_given_for_a_renamed_copy(answering_model_dir, tmp_path, capsys):
    copy, out = _renamed(AGIEVAL, tmp_path), tmp_path / "r.json"
    assert main(["eval", "--model", str(answering_model_dir), "--data", str(copy), "--type", "KD",
                 "--output", str(out), "model.dtype=float32"]) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["summary"]["by_type"]["KD"]["n"] == 4 and {s["type"] for s in report["samples"]} == {"KD"}


def test_a_sampled_eval_prints_avg_maj_and_pass_at_k(answering_model_dir, tmp_path, capsys):
    out = tmp_path / "k.json"
    assert main(["eval", "--model", str(answering_model_dir), "--data", str(LAWBENCH), "--samples", "3",
                 "--output", str(out), "model.dtype=float32"]) == 0
    line = capsys.readouterr().out.strip()
    s = json.loads(out.read_text(encoding="utf-8"))["summary"]
    assert len(line.splitlines()) == 1 and s["do_sample"] is True
    for key in ("avg@3", "maj@3", "pass@3", "lawbench_score"):
        assert f"{key} {s[key]:.4f}" in line, key
