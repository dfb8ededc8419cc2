import json

import pytest

from lawtune.data import DataError, data_stats, drop_overlap, load_records, split_records, statement_key

from conftest import write_jsonl

GOOD = [
    {"id": "0_1", "statement": "关于诉讼时效，下列哪些说法正确？", "option_list": {"A": "一", "B": "二", "C": "三", "D": "四"},
     "answer": ["A", "C"], "type": "0", "subject": "民法", "source_note": "kept"},
    {"id": "1_2", "statement": "甲打伤乙，下列哪一说法正确？", "option_list": ["甲", "乙", "丙", "丁"], "answer": "B"},
    {"id": "0_3", "statement": "下列哪些属于物权？", "option_list": {"A": "所有权", "B": "抵押权", "C": "债权", "D": "质权"},
     "answer": "ABD"},
]


def test_jsonl_and_json_array_load_the_same(tmp_path):
    a = load_records(write_jsonl(tmp_path / "a.json", GOOD))
    b_path = tmp_path / "b.json"
    b_path.write_text(json.dumps(GOOD, ensure_ascii=False, indent=2), encoding="utf-8")
    b = load_records(b_path)
    assert [r.to_json() for r in a.records] == [r.to_json() for r in b.records]
    r0, r1, r2 = a.records
    assert r0.answer == ["A", "C"] and r0.type == "KD" and r0.extra == {"source_note": "kept"}
    assert r1.options == {"A": "甲", "B": "乙", "C": "丙", "D": "丁"} and r1.answer == ["B"] and r1.type == "CA"
    assert r2.answer == ["A", "B", "D"]
    assert r0.to_json()["source_note"] == "kept"


def test_test_files_without_answers_load_for_prediction_only(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "answer"} for r in GOOD]
    path = write_jsonl(tmp_path / "0_test.json", rows)
    assert [r.answer for r in load_records(path, require_answer=False).records] == [None, None, None]
    with pytest.raises(DataError, match=r"0_test\.json:1: 3 records have no 'answer'"):
        load_records(path)


def test_every_problem_is_reported_with_file_and_line(tmp_path):
    path = tmp_path / "bad.json"
    lines = [json.dumps(GOOD[0], ensure_ascii=False), "{not json", json.dumps({"id": "x", "option_list": {"A": "a", "B": "b"}}),
             json.dumps({**GOOD[1], "id": "y", "answer": ["E"]}), "", json.dumps({**GOOD[2], "id": "0_1"})]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_records(path)
    problems = err.value.problems
    assert problems[0].startswith(f"{path}:2: malformed JSON")
    assert problems[1] == f"{path}:3: missing field 'statement'"
    assert problems[2].startswith(f"{path}:4: answer letter 'E' is not among the options")
    assert problems[3].startswith(f"{path}:6: duplicate id '0_1'")
    assert len(problems) == 4


def test_problems_are_capped_at_twenty_then_counted(tmp_path):
    path = write_jsonl(tmp_path / "many.json", [{"id": str(i)} for i in range(25)])
    with pytest.raises(DataError) as err:
        load_records(path)
    text = str(err.value).splitlines()
    assert len(text) == 21 and text[-1] == "... and 5 more problems"


def test_json_array_errors_point_at_the_line(tmp_path):
    path = tmp_path / "arr.json"
    path.write_text('[\n {"id": "1", "statement": "s", "option_list": ["a", "b"], "answer": ["A"]},\n {"id": "2", "statement": \n]',
                    encoding="utf-8")
    with pytest.raises(DataError, match=r"arr\.json:4: malformed JSON"):
        load_records(path)


def test_empty_answers_are_skipped_and_counted(tmp_path):
    path = write_jsonl(tmp_path / "e.json", GOOD + [{**GOOD[0], "id": "0_9", "answer": []}])
    loaded = load_records(path)
    assert len(loaded.records) == 3 and loaded.skipped == {"empty answer list": 1}


def test_max_samples_limits_loading(tmp_path):
    assert len(load_records(write_jsonl(tmp_path / "m.json", GOOD), max_samples=2).records) == 2


def test_split_is_seeded_and_keeps_repeated_statements_on_one_side():
    from lawtune.data import Record

    records = [Record(id=str(i), statement=f"问题{i % 30}", options={"A": "a", "B": "b"}, answer=["A"]) for i in range(90)]
    train, held = split_records(records, 0.2, seed=1)
    assert {statement_key(r) for r in train}.isdisjoint({statement_key(r) for r in held})
    assert len(train) + len(held) == 90 and len(held) == 18
    assert [r.id for r in split_records(records, 0.2, seed=1)[1]] == [r.id for r in held]
    assert [r.id for r in split_records(records, 0.2, seed=2)[1]] != [r.id for r in held]
    kept, dropped = drop_overlap(records, held)
    assert dropped == 18 and len(kept) == 72


def test_stats(tmp_path):
    rows = GOOD + [{**GOOD[1], "id": "1_7"}, {**GOOD[0], "id": "0_8", "answer": []}]
    stats = data_stats(load_records(write_jsonl(tmp_path / "s.json", rows)), token_lengths=[10, 20, 30, 40])
    assert stats["records"] == 4 and stats["skipped"] == {"empty answer list": 1}
    assert (stats["single"], stats["multi"]) == (2, 2)
    assert stats["by_type"] == {"KD": 2, "CA": 2, "unknown": 0}
    assert stats["repeated_statements"] == 1
    assert stats["token_length"]["max"] == 40


def test_bundled_demo_set_is_varied():
    from lawtune.demo import demo_data_path

    stats = data_stats(load_records(demo_data_path()))
    assert stats["records"] >= 60 and stats["by_type"]["KD"] >= 20 and stats["by_type"]["CA"] >= 20
    assert stats["single"] >= 20 and stats["multi"] >= 20


def test_a_file_without_answers_is_one_line_pointing_to_predict_and_a_folder_is_named(tmp_path):
    rows = [{"id": f"0_{i}", "statement": "下列哪些正确？", "option_list": ["甲", "乙"]} for i in range(30)]
    path = write_jsonl(tmp_path / "test.json", rows)
    with pytest.raises(DataError) as err:
        load_records(path, require_answer=True)
    assert len(str(err.value).splitlines()) == 1
    assert f"{path}:1: 30 records have no 'answer'" in str(err.value) and "lawtune predict" in str(err.value)
    assert len(load_records(path, require_answer=False).records) == 30
    with pytest.raises(DataError, match="is a directory"):
        load_records(tmp_path)
