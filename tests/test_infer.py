"""ask / predict on tiny random models: streaming, resumable prediction, refusals."""

import io
import json
import sys

import pytest

from lawtune import evaluate, infer
from lawtune.cli import main
from lawtune.config import GenerationConfig, ModelConfig
from lawtune.data import DataError
from lawtune.errors import UsageError
from lawtune.model import ModelError

from conftest import synthetic_records, write_jsonl


def unanswered_file(tmp_path, n=7):
    rows = synthetic_records(n, seed=3)
    for row in rows:
        row.pop("answer")  # like JEC-QA's *_test.json
    return write_jsonl(tmp_path / "test.json", rows), [r["id"] for r in rows]


def read_lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ----------------------------------------------------------------------------- questions


def test_plain_text_questions_json_records_and_option_flags():
    statement, options = infer.split_question_text(
        "甲公司与乙公司订立合同。\n下列说法正确的是：\nA. 合同有效\nB、合同无效\n（C）可撤销\n  的情形\nＤ：效力待定")
    assert statement == "甲公司与乙公司订立合同。\n下列说法正确的是："
    assert options == {"A": "合同有效", "B": "合同无效", "C": "可撤销\n的情形", "D": "效力待定"}
    # "A公司" is a statement, not an option; a single option line is no option list.
    assert infer.split_question_text("A公司起诉B公司。\nA. 对") == ("A公司起诉B公司。\nA. 对", {})
    record = infer.record_from_text('{"statement": "题干", "option_list": ["甲", "乙"], "answer": ["B"]}')
    assert record.options == {"A": "甲", "B": "乙"} and record.answer is None  # a gold answer plays no part
    assert infer.record_from_text("什么是诉讼时效？", require_options=False).options == {}
    with pytest.raises(DataError, match="no options"):
        infer.record_from_text("什么是诉讼时效？")
    with pytest.raises(DataError, match="at least 2 options"):
        infer.record_from_json('{"statement": "题干", "option_list": ["甲"]}')
    assert infer.parse_options_arg(["A=甲", "b：乙"]) == {"A": "甲", "B": "乙"}
    with pytest.raises(UsageError, match="LETTER=text"):
        infer.parse_options_arg(["甲"])
    lines = infer.record_from_lines(["题干\n", "甲\n", "乙\n"])  # interactive: unlettered options in order
    assert lines.statement == "题干" and lines.options == {"A": "甲", "B": "乙"}


def test_think_splitter_holds_back_a_split_marker():
    splitter = infer.ThinkSplitter(reasoning=True)
    events = []
    for piece in ["先分析", "。</th", "ink>\n\n答案", "：B"]:
        events += splitter.feed(piece)
    events += splitter.flush()
    assert "".join(t for k, t in events if k == "reasoning") == "先分析。"
    assert "".join(t for k, t in events if k == "content") == "答案：B"


def test_think_splitter_gives_the_same_text_however_the_pieces_fall():
    """Every cut of the text in three pieces, a '<' that starts no marker among them, routes as the whole text does."""
    def routed(pieces):
        splitter = infer.ThinkSplitter(reasoning=True)
        events = [e for piece in pieces for e in splitter.feed(piece)] + splitter.flush()
        return ("".join(t for k, t in events if k == "reasoning"), "".join(t for k, t in events if k == "content"))

    for text in ["先<b>分析。</think>\n\n答案：B", "a<</think>b<", "只想</thin", "<</think></think>"]:
        whole = routed([text])
        for i in range(len(text) + 1):
            for j in range(i, len(text) + 1):
                assert routed([text[:i], text[i:j], text[j:]]) == whole, (text, i, j)
    assert routed(["先<b>分析。</think>\n\n答案：B"]) == ("先<b>分析。", "答案：B")


# ----------------------------------------------------------------------------- ask


def test_ask_streams_reasoning_then_prints_the_answer_line(tiny_model_dir, capsys):
    engine = infer.load_model(ModelConfig(path=str(tiny_model_dir), dtype="float32"), GenerationConfig(max_new_tokens=12))
    record = infer.record_from_fields("甲乙之间的合同纠纷如何处理？", {"A": "调解", "B": "仲裁", "C": "诉讼"})
    events = list(infer.generate_events(engine, record, "reasoning"))
    kinds = [k for k, _ in events]
    assert kinds[-1] == "done" and kinds.count("reasoning") >= 2  # streamed piece by piece, not at the end
    answer = events[-1][1]
    assert not answer.stopped  # a random model never ends: its trace is closed and an answer forced
    assert "".join(t for k, t in events if k == "reasoning").strip() == answer.reasoning
    assert answer.output.startswith(answer.reasoning) and "答案：" in answer.output
    non_streamed = list(infer.generate_events(engine, record, "reasoning", stream=False))[-1][1]
    assert non_streamed == answer  # the streaming path generates exactly what the plain one does

    rc = main(["ask", "--model", str(tiny_model_dir), "--question", record.statement, "--option", "A=调解",
               "--option", "B=仲裁", "--option", "C=诉讼", "--mode", "reasoning", "--max-new-tokens", "12",
               "model.dtype=float32"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.startswith(answer.reasoning)
    assert out.splitlines()[-1] == ("答案：" + "".join(sorted(answer.answer)) if answer.answer else "答案：（无法识别）")
    assert infer.answer_line(None) == "答案：（无法识别）" and infer.answer_line(["C", "A"]) == "答案：AC"


def test_ask_interactive_reads_question_and_options_until_an_empty_line(tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("第一题题干\n甲\n乙\n\n第二题题干\nA. 丙\nB. 丁\nC. 戊\n\n"))
    assert main(["ask", "--model", str(tiny_model_dir), "model.dtype=float32"]) == 0
    answers = [line for line in capsys.readouterr().out.splitlines() if line.startswith("答案：")]
    assert len(answers) == 2


def test_ask_rejects_a_question_without_options_before_loading(capsys):
    assert main(["ask", "--model", "/nonexistent", "--question", "什么是诉讼时效？"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no options" in err and len(err.splitlines()) == 1


# ----------------------------------------------------------------------------- predict


def test_predict_writes_one_line_per_record_and_resumes(answering_model_dir, tmp_path, monkeypatch, capsys):
    data, ids = unanswered_file(tmp_path)
    out = tmp_path / "preds.jsonl"
    args = ["predict", "--model", str(answering_model_dir), "--data", str(data), "--output", str(out),
            "--batch-size", "3", "model.dtype=float32"]
    assert main(args) == 0
    rows = read_lines(out)
    assert [r["id"] for r in rows] == ids
    for row in rows:
        assert set(row) >= {"id", "answer", "output"} and isinstance(row["answer"], list)
        assert row["output"] == "答案：A" and row["answer"] == ["A"]  # what the rigged model says, read

    # A crash after 3 lines, in the middle of writing the 4th: a rerun generates only the other 4.
    raw = out.read_text(encoding="utf-8").splitlines(keepends=True)
    out.write_text("".join(raw[:3]) + raw[3][:10], encoding="utf-8")
    generated = []
    real = evaluate.MODES["direct"]

    def counting(model, tokenizer, records, prompt_format, gcfg, slots=None, **kwargs):
        generated.extend(r.id for r in records)
        return real(model, tokenizer, records, prompt_format, gcfg, slots, **kwargs)

    monkeypatch.setitem(evaluate.MODES, "direct", counting)
    assert main(args) == 0
    assert generated == ids[3:]
    rows2 = read_lines(out)
    assert sorted(r["id"] for r in rows2) == sorted(ids) and rows2[:3] == rows[:3]
    assert "4 answered" in capsys.readouterr().out
    generated.clear()
    assert main(args) == 0 and generated == []  # all done: nothing generated, nothing loaded


def test_predict_reasoning_mode_forces_an_answer_when_the_budget_runs_out(tiny_model_dir, tmp_path):
    data, ids = unanswered_file(tmp_path, n=2)
    out = tmp_path / "preds.jsonl"
    assert main(["predict", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(out),
                 "--mode", "reasoning", "--max-new-tokens", "6", "model.dtype=float32"]) == 0
    rows = read_lines(out)
    assert [r["id"] for r in rows] == ids
    assert all(r["forced"] and "</think>" in r["output"] and "答案：" in r["output"] for r in rows)


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("command", ["ask", "predict", "merge", "serve"])
def test_adapter_for_another_base_model_is_refused_in_one_line(command, tiny_model_dir, foreign_adapter_dir,
                                                              tmp_path, capsys):
    data, _ = unanswered_file(tmp_path, n=1)
    extra = {"ask": ["--record", data.read_text(encoding="utf-8").strip()],
             "predict": ["--data", str(data), "--output", str(tmp_path / "p.jsonl")],
             "merge": ["--output", str(tmp_path / "merged")],
             "serve": ["--port", "0"]}[command]
    rc = main([command, "--model", str(tiny_model_dir), "--adapter", str(foreign_adapter_dir), *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "another base model" in err, err
    assert not (tmp_path / "merged").exists() and not (tmp_path / "p.jsonl").exists()


def test_load_engine_raises_model_error(tiny_model_dir, foreign_adapter_dir):
    with pytest.raises(ModelError, match="another base model"):
        infer.load_model(ModelConfig(path=str(tiny_model_dir), dtype="float32"), adapter=str(foreign_adapter_dir))


def test_ask_prints_one_answer_line_the_letters_as_read(monkeypatch):
    """The model's raw answer line (all four letters on a two-option question) is not printed beside the read one."""
    import io

    record = infer.record_from_fields("甲能否撤销合同？", {"A": "能", "B": "不能"})
    answer = infer.Answer(output="答案：ABCD", reasoning="", content="理由如下。\n答案：ABCD", answer=["A", "B"],
                          prompt_tokens=10, generated_tokens=6, stopped=True)

    def events(engine, record, mode, max_new_tokens):
        yield "content", "理由如下。\n答案：ABCD"
        yield "done", answer

    monkeypatch.setattr(infer, "generate_events", events)
    out = io.StringIO()
    infer.ask(None, record, "direct", out=out)
    lines = out.getvalue().strip().splitlines()
    assert lines == ["理由如下。", "答案：AB"]


def test_predict_max_samples_answers_only_the_first_questions(answering_model_dir, tmp_path):
    data, ids = unanswered_file(tmp_path)
    out = tmp_path / "preds.jsonl"
    assert main(["predict", "--model", str(answering_model_dir), "--data", str(data), "--output", str(out),
                 "--max-samples", "2", "model.dtype=float32"]) == 0
    assert [r["id"] for r in read_lines(out)] == ids[:2]


def test_sigterm_keeps_every_answered_batch_exits_143_and_a_rerun_ends_as_one_run(tiny_model_dir, tmp_path,
                                                                                   monkeypatch, capsys):
    """SIGTERM while the second of three batches is generated: that batch is dropped at once, the first stays
    whole on disk, the exit code is 143; the rerun writes what a run without the signal writes."""
    import os
    import signal

    data, ids = unanswered_file(tmp_path)
    args = lambda out: ["predict", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(out),  # noqa: E731
                        "--batch-size", "3", "model.dtype=float32"]
    whole = tmp_path / "whole.jsonl"
    assert main(args(whole)) == 0
    real, batches = evaluate.MODES["direct"], []

    def term_in_the_second_batch(model, tokenizer, records, prompt_format, gcfg, slots=None, **kwargs):
        batches.append([r.id for r in records])
        if len(batches) == 2:
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(model, tokenizer, records, prompt_format, gcfg, slots, **kwargs)

    monkeypatch.setitem(evaluate.MODES, "direct", term_in_the_second_batch)
    parts = tmp_path / "parts.jsonl"
    handler = signal.getsignal(signal.SIGTERM)
    capsys.readouterr()
    assert main(args(parts)) == 143
    assert capsys.readouterr().err.strip().splitlines()[-1] == (f"preempted: 3 of 7 questions answered in {parts}; "
                                                                "rerun the same command to go on")
    assert len(batches) == 2 and signal.getsignal(signal.SIGTERM) is handler
    whole_lines = whole.read_text(encoding="utf-8").splitlines(keepends=True)
    assert parts.read_text(encoding="utf-8") == "".join(whole_lines[:3])
    monkeypatch.setitem(evaluate.MODES, "direct", real)
    assert main(args(parts)) == 0
    assert parts.read_bytes() == whole.read_bytes()


@pytest.mark.parametrize("fast", [True, False])
def test_text_pieces_join_to_the_decoded_text_and_hold_back_a_split_character(real_tokenizer, fast):
    """The pieces of a stream of ids (Chinese, rare characters split over byte-level tokens, random ids) join to what the
    tokenizer decodes at once, and no piece ends in half a character; special tokens are left out. ``fast`` False:
    the fallback for a tokenizer without a ``tokenizers`` backend."""
    import random

    text = "甲公司与乙公司签订合同，约定交付货物。龘𠀀 The court held é.\n答案：AB"
    ids = real_tokenizer(text, add_special_tokens=False)["input_ids"]
    noise = [random.Random(0).randrange(len(real_tokenizer)) for _ in range(300)]
    for stream, whole_characters in ((ids + [real_tokenizer.eos_token_id], True), (noise, False)):
        pieces = infer.TextPieces(real_tokenizer)
        if not fast:
            pieces.backend = None
        out = [pieces.put(token) for token in stream]
        assert "".join(out) == real_tokenizer.decode(stream, skip_special_tokens=True)
        assert not whole_characters or not any("\ufffd" in piece for piece in out)
    split = real_tokenizer("𠀀", add_special_tokens=False)["input_ids"]
    assert len(split) > 1  # one character, several byte-level tokens: held back until it is whole
    pieces = infer.TextPieces(real_tokenizer)
    assert [pieces.put(token) for token in split] == [""] * (len(split) - 1) + ["𠀀"]


# ----------------------------------------------------------------------------- voted answers


def test_predict_and_ask_samples_vote_as_eval_maj_at_k_and_predict_resumes(voting_model_dir, tmp_path, capsys):
    """predict --samples K and ask --samples K answer with eval --samples K's majority answer set, sample for sample
    (same model, questions, K and seed), whatever the batching; a voted predictions file resumes like a plain one."""
    rows = synthetic_records(6, seed=5)
    gold = write_jsonl(tmp_path / "gold.json", rows)
    data = write_jsonl(tmp_path / "test.json", [{k: v for k, v in r.items() if k != "answer"} for r in rows])
    report, out = tmp_path / "report.json", tmp_path / "preds.jsonl"
    common = ["--model", str(voting_model_dir), "--samples", "5", "model.dtype=float32"]
    assert main(["eval", "--data", str(gold), "--output", str(report), "--batch-size", "8", *common]) == 0
    scored = {q["id"]: q for q in json.loads(report.read_text(encoding="utf-8"))["samples"]}
    predict = ["predict", "--data", str(data), "--output", str(out), "--batch-size", "3", *common]
    assert main(predict) == 0
    lines = read_lines(out)
    assert [line["id"] for line in lines] == [r["id"] for r in rows]
    for line in lines:
        q = scored[line["id"]]
        assert line["answer"] == (q["pred"] if q["valid"] else []) and line["output"] == q["output"]
        assert line["samples"] == [s["pred"] for s in q["sampled"]] and line["agreement"] == q["agreement"]
    # the model answers A, B or (unreadable) 无 with equal odds: the votes must really differ for this to test much
    assert len({tuple(line["answer"]) for line in lines}) > 1 and any(line["agreement"] < 1 for line in lines)
    assert any([] in line["samples"] for line in lines)
    assert "vote of 5 samples" in capsys.readouterr().out

    raw = out.read_text(encoding="utf-8").splitlines(keepends=True)
    out.write_text("".join(raw[:4]) + raw[4][:12], encoding="utf-8")  # a crash while writing the 5th line
    assert main(predict) == 0
    assert read_lines(out) == lines  # seeded per question: the rerun writes the very lines it lost
    assert f"{len(rows) - 4} answered" in capsys.readouterr().out

    split = next(line for line in lines if 0 < line["agreement"] < 1)
    record = next(r for r in rows if r["id"] == split["id"])
    asked = {k: v for k, v in record.items() if k != "answer"}
    assert main(["ask", "--record", json.dumps(asked, ensure_ascii=False), *common]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1] == infer.answer_line(split["answer"] or None)
    assert printed[-2].startswith("voted over 5 samples") and f"agreement {split['agreement']:.2f}" in printed[-2]


def test_samples_are_bounded_and_one_stays_one_greedy_answer(answering_model_dir, tmp_path, capsys):
    assert main(["predict", "--model", "m", "--data", "d", "--output", "o", "--samples", "0"]) == 2
    assert "predict.samples" in capsys.readouterr().err
    assert main(["ask", "--model", "m", "--question", "q", "--samples", "1000"]) == 2
    assert "ask.samples" in capsys.readouterr().err
    data, ids = unanswered_file(tmp_path, n=2)
    out = tmp_path / "preds.jsonl"
    assert main(["predict", "--model", str(answering_model_dir), "--data", str(data), "--output", str(out),
                 "--samples", "1", "model.dtype=float32"]) == 0
    lines = read_lines(out)
    assert [line["id"] for line in lines] == ids
    assert all(set(line) == {"id", "answer", "output"} for line in lines)  # no vote fields
