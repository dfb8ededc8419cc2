"""`lawtune distill`: only correct, self-closed, non-empty reasoning is kept; resumable; the traces train."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lawtune import distill
from lawtune.cli import main
from lawtune.data import load_records

from conftest import REASONING, stub, synthetic_records, write_jsonl


def _wrong(gold: str) -> str:
    return next(x for x in ("A", "B", "C", "D", "AB") if x != gold)


def planned_choices(i: int, gold: str) -> list[dict]:
    """What the stub teacher answers for question i: a third get only bad completions."""
    def choice(reasoning, content, finish="stop"):
        message = {"role": "assistant", "content": content}
        if reasoning is not None:
            message["reasoning_content"] = reasoning
        return {"index": 0, "message": message, "finish_reason": finish}

    if i % 3 == 0:
        return [choice("分析甲乙的关系。", f"答案：{_wrong(gold)}"),        # wrong
                choice("想了很久还没有想完", None, "length"),              # cut off by the budget: unclosed
                choice("想到一半", f"答案：{gold}", "length")]            # forced after the cut: never kept
    return [choice("   ", f"答案：{gold}"),                               # empty think text
            choice("这是一段很长很长的分析，最后得出结论。", f"答案：{gold}"),  # right, long
            choice(None, f"<think>\n短分析{i}\n</think>\n\n答案：{gold}"),  # right, short, think in content
            choice("错误的分析", f"答案：{_wrong(gold)}")]


@pytest.fixture
def teacher(tmp_path):
    rows = synthetic_records(12, seed=5)
    by_statement = {r["statement"]: (i, "".join(r["answer"])) for i, r in enumerate(rows)}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            text = body["messages"][-1]["content"]
            i, gold = next(v for s, v in by_statement.items() if s in text)
            payload = json.dumps({"choices": planned_choices(i, gold)}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", write_jsonl(tmp_path / "train.json", rows), rows
    finally:
        server.shutdown()
        server.server_close()


def test_only_correct_self_closed_non_empty_reasoning_is_kept(teacher, tmp_path, capsys):
    url, data, rows = teacher
    out = tmp_path / "traces.jsonl"
    assert main(["distill", "--teacher-url", url, "--teacher-model", "r1", "--data", str(data),
                 "--output", str(out), "--batch-size", "5"]) == 0
    traces = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [t["id"] for t in traces] == [r["id"] for i, r in enumerate(rows) if i % 3]
    for t in traces:
        i = next(k for k, r in enumerate(rows) if r["id"] == t["id"])
        assert t["reasoning"] == f"短分析{i}"  # the shortest kept one, trimmed
        assert t["statement"] == rows[i]["statement"] and t["answer"] == rows[i]["answer"]
    rejected = [json.loads(line) for line in (tmp_path / "traces.rejected.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rejected] == [r["id"] for i, r in enumerate(rows) if i % 3 == 0]
    assert all(r["reasons"] == ["wrong", "unclosed", "unclosed"] for r in rejected)
    report = json.loads((tmp_path / "traces.report.json").read_text(encoding="utf-8"))
    assert report["summary"]["questions_kept"] == 8 and report["summary"]["questions"] == 12
    assert report["summary"]["completions_kept"] == 8 * 2 and report["summary"]["completions_sampled"] == 4 * 3 + 8 * 4
    assert report["summary"]["pass_at_k"] == pytest.approx(8 / 12, abs=1e-4)
    assert report["this_run"]["reasons"] == {"kept": 16, "wrong": 12, "unclosed": 8, "empty_reasoning": 8,
                                              "no_answer": 0}
    assert "kept traces for 8 of 12 questions" in capsys.readouterr().out
    # a rerun samples nothing: every id is in one of the two files
    assert main(["distill", "--teacher-url", url, "--teacher-model", "r1", "--data", str(data),
                 "--output", str(out)]) == 0
    assert len(out.read_text(encoding="utf-8").splitlines()) == 8
    # the traces are a JEC-QA file that data check reads
    assert main(["data", "check", str(out)]) == 0


def test_pick_all_writes_each_kept_trace_under_its_own_id(teacher, tmp_path):
    url, data, rows = teacher
    out = tmp_path / "all.jsonl"
    assert main(["distill", "--teacher-url", url, "--teacher-model", "r1", "--data", str(data),
                 "--output", str(out), "--pick", "all"]) == 0
    ids = [t.id for t in load_records(out).records]
    assert len(ids) == 16 and len(set(ids)) == 16 and f"{rows[1]['id']}#2" in ids


@pytest.fixture
def gold_a_questions(tmp_path):
    """Synthetic questions, half of them answered A; the rigged model always reasons 依据民法典 and answers A."""
    rows = synthetic_records(10, seed=2)
    for row in rows[::2]:
        row["answer"] = ["A"]
    return write_jsonl(tmp_path / "q.json", rows), rows


def _distill_local(model_dir, data, out, *extra):
    return main(["distill", "--model", str(model_dir), "--data", str(data), "--output", str(out), "--samples", "2",
                 "--batch-size", "3", "--max-new-tokens", "24", "model.dtype=float32", *extra])


def test_the_local_model_keeps_its_own_correct_reasoning(answering_model_dir, gold_a_questions, tmp_path):
    data, rows = gold_a_questions
    out = tmp_path / "traces.jsonl"
    assert _distill_local(answering_model_dir, data, out) == 0
    traces = load_records(out).records
    assert [t.id for t in traces] == [r["id"] for r in rows if r["answer"] == ["A"]] and traces
    assert all(t.reasoning == REASONING for t in traces)
    rejected = [json.loads(line) for line in (tmp_path / "traces.rejected.jsonl").read_text(encoding="utf-8").splitlines()]
    assert rejected and all(r["reasons"] == ["wrong", "wrong"] and r["sampled"] == [["A"], ["A"]] for r in rejected)
    report = json.loads((tmp_path / "traces.report.json").read_text(encoding="utf-8"))
    assert report["this_run"]["trace_tokens"]["max"] > 0 and report["this_run"]["tokens_per_s"] > 0
    # a rerun has nothing to sample: the report still covers the whole traces file
    assert _distill_local(answering_model_dir, data, out) == 0
    again = json.loads((tmp_path / "traces.report.json").read_text(encoding="utf-8"))
    assert again["summary"] == report["summary"] and again["this_run"]["questions_sampled"] == 0
    assert again["this_run"]["skipped_done"] == len(rows)
    for key in ("trace_tokens", "reasons", "completions", "questions_passed", "generated_tokens"):
        assert again["all_runs"][key] == report["this_run"][key] == report["all_runs"][key], key


def test_a_rerun_adds_to_the_report_and_says_what_it_skipped(teacher, tmp_path, capsys):
    url, data, rows = teacher
    first = tmp_path / "first.json"  # the first half of the questions, then all of them
    first.write_text("".join(data.read_text(encoding="utf-8").splitlines(keepends=True)[:6]), encoding="utf-8")
    run = ["distill", "--teacher-url", url, "--teacher-model", "r1", "--batch-size", "4"]
    assert main([*run, "--data", str(first), "--output", str(tmp_path / "parts.jsonl")]) == 0
    capsys.readouterr()
    assert main([*run, "--data", str(data), "--output", str(tmp_path / "parts.jsonl")]) == 0
    said = capsys.readouterr().out
    assert said.startswith("skipped 6 already done; kept traces for 8 of 12 questions (16 of 44 completions")
    assert main([*run, "--data", str(data), "--output", str(tmp_path / "whole.jsonl")]) == 0
    parts, whole = (json.loads((tmp_path / f"{name}.report.json").read_text(encoding="utf-8")) for name in ("parts", "whole"))
    assert parts["summary"] == whole["summary"] and parts["by_group"] == whole["by_group"]
    assert parts["all_runs"]["runs"] == 2 and whole["all_runs"]["runs"] == 1
    for key in ("questions_sampled", "questions_passed", "completions", "completions_kept", "reasons", "pass_at_k"):
        assert parts["all_runs"][key] == whole["all_runs"][key], key
    assert parts["this_run"]["questions_sampled"] == 6 and parts["this_run"]["skipped_done"] == 6


@pytest.mark.slow  # three sampling runs of the local model, one of them crashed
def test_a_resumed_run_writes_what_one_run_writes(answering_model_dir, gold_a_questions, tmp_path, monkeypatch):
    data, _ = gold_a_questions
    whole = tmp_path / "whole.jsonl"
    assert _distill_local(answering_model_dir, data, whole, "generation.temperature=1.0") == 0
    real_append, calls = distill.append_jsonl, []

    def crash_after_the_first_batch(path, rows):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real_append(path, rows)

    parts = tmp_path / "parts.jsonl"
    monkeypatch.setattr(distill, "append_jsonl", crash_after_the_first_batch)
    assert _distill_local(answering_model_dir, data, parts, "generation.temperature=1.0") == 130
    monkeypatch.setattr(distill, "append_jsonl", real_append)
    assert len(parts.read_text(encoding="utf-8").splitlines()) < len(whole.read_text(encoding="utf-8").splitlines())
    assert _distill_local(answering_model_dir, data, parts, "generation.temperature=1.0") == 0
    assert parts.read_text(encoding="utf-8") == whole.read_text(encoding="utf-8")
    rejected = lambda p: distill.side_files(p)[0].read_text(encoding="utf-8")  # noqa: E731
    assert rejected(parts) == rejected(whole)
    # the stopped run's report counted the batch it wrote; the resumed run added the rest
    report = lambda p: json.loads(distill.side_files(p)[1].read_text(encoding="utf-8"))  # noqa: E731
    for key in ("questions_sampled", "completions", "reasons", "trace_tokens", "trace_token_lengths", "generated_tokens"):
        assert report(parts)["all_runs"][key] == report(whole)["all_runs"][key], key
    assert report(parts)["all_runs"]["uncounted"] == 0 and report(parts)["summary"] == report(whole)["summary"]


def test_teacher_settings_are_checked_before_anything_runs(tmp_path, capsys):
    assert main(["distill", "--teacher-url", "http://127.0.0.1:9/v1", "--data", "d.json", "--output", "o.jsonl"]) == 2
    assert "distill.teacher_model" in capsys.readouterr().err
    assert main(["distill", "--data", "d.json", "--output", "o.jsonl", "--pick", "longest"]) == 2
    assert "distill.pick" in capsys.readouterr().err


@pytest.mark.parametrize("tokenizer", ["tiny_tokenizer", "real_tokenizer"])
def test_traces_train_with_loss_on_the_reasoning_the_answer_and_the_end_token_only(tokenizer, request):
    from lawtune.data import parse_record
    from lawtune.prompts import encode_example

    row = {**synthetic_records(1)[0], "reasoning": "甲与乙的合同成立，因此选A。"}
    record, problem, _ = parse_record(row, "t.json:1", require_answer=True)
    assert problem is None
    for tok in (request.getfixturevalue(tokenizer),):
        ex = encode_example(record, tok, "chat", 4096)
        labels = [t for t in ex.labels if t != -100]
        assert labels[-1] == tok.eos_token_id
        target = tok.decode(labels[:-1])
        assert target == row["reasoning"] + "\n</think>\n\n答案：" + "".join(row["answer"])
        first = ex.labels.index(labels[0])
        assert tok.decode(ex.input_ids[:first]).endswith("<think>\n")  # the prompt ends where the reasoning starts


@pytest.mark.slow  # a training run on traces mixed with answer-only records
def test_traces_train_beside_answer_only_records_of_a_second_file(tiny_config, tmp_path):
    import yaml

    from lawtune.train import train

    rows = synthetic_records(40, seed=9)
    traces = write_jsonl(tmp_path / "traces.jsonl", [{**r, "reasoning": f"分析{i}"} for i, r in enumerate(rows[:20])])
    original = write_jsonl(tmp_path / "orig.json", rows)
    result = train(tiny_config(f"data.train={traces}", f"data.mix={original}", "data.mix_ratio=0.5",
                               "train.max_steps=2", "data.eval_fraction=0.2"))
    run = tmp_path / "run"
    used = load_records(run / "data" / "train.jsonl").records
    direct = [r for r in used if r.id.endswith("#direct")]
    with_reasoning = [r for r in used if not r.id.endswith("#direct")]
    assert len(direct) == round(0.5 * len(with_reasoning)) and all(r.reasoning is None for r in direct)
    assert all(r.reasoning for r in with_reasoning)
    held_out = {r.statement for r in load_records(run / "data" / "eval.jsonl").records}
    assert not held_out & {r.statement for r in direct}  # no answer-only copy of a held-out question
    manifest = json.loads((run / "final_model" / "data_manifest.json").read_text(encoding="utf-8"))
    assert manifest["mix"]["answer_only_records"] == len(direct) and manifest["files"][-1]["role"] == "mix"
    saved = yaml.safe_load((run / "final_model" / "lawtune_config.yaml").read_text(encoding="utf-8"))
    assert saved["data"]["mix"] == str(original) and result.steps == 2


def test_sigterm_while_a_batch_is_written_keeps_it_whole_exits_143_and_a_rerun_ends_as_one_run(teacher, tmp_path,
                                                                                               monkeypatch, capsys):
    """SIGTERM as the second of three batches is being written: both of its files get the whole batch, the third is
    not sampled, the report covers what was written, the exit code is 143; the rerun writes what one run writes."""
    import os
    import signal

    url, data, rows = teacher
    args = lambda out: ["distill", "--teacher-url", url, "--teacher-model", "r1", "--data", str(data),  # noqa: E731
                        "--output", str(out), "--batch-size", "5"]
    whole = tmp_path / "whole.jsonl"
    assert main(args(whole)) == 0
    real_append, calls = distill.append_jsonl, []

    def term_while_writing(path, lines):
        calls.append(path)
        if len(calls) == 3:  # the second batch's traces
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None)
            os.kill(os.getpid(), signal.SIGTERM)
        real_append(path, lines)

    monkeypatch.setattr(distill, "append_jsonl", term_while_writing)
    parts = tmp_path / "parts.jsonl"
    capsys.readouterr()
    assert main(args(parts)) == 143
    rejected = distill.side_files(parts)[0]
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"preempted: 10 of the 12 questions left were sampled and saved in {parts} and {rejected.name}; rerun the "
        "same command to go on")
    assert len(calls) == 4  # the second batch's rejected questions were written too; no third batch
    written = {json.loads(line)["id"] for path in (parts, rejected) for line in path.read_text(encoding="utf-8").splitlines()}
    assert written == {r["id"] for r in rows[:10]}
    report = json.loads(distill.side_files(parts)[1].read_text(encoding="utf-8"))
    assert report["summary"]["questions_kept"] == len(parts.read_text(encoding="utf-8").splitlines())
    monkeypatch.setattr(distill, "append_jsonl", real_append)
    assert main(args(parts)) == 0
    assert parts.read_bytes() == whole.read_bytes() and rejected.read_bytes() == distill.side_files(whole)[0].read_bytes()


def test_the_teacher_is_asked_again_after_a_503_with_the_key_from_the_environment(tmp_path, monkeypatch):
    """distill's teacher goes through eval --api-url's client: its retries and its key."""
    rows = synthetic_records(3, seed=5)
    data, out = write_jsonl(tmp_path / "train.json", rows), tmp_path / "traces.jsonl"
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")

    def answer(path, body, calls):
        if len(calls) == 1:
            return 503, {"error": "warming up"}, {"Retry-After": "0"}
        gold = next("".join(r["answer"]) for r in rows if r["statement"] in body["messages"][-1]["content"])
        message = {"role": "assistant", "reasoning_content": "分析。", "content": f"答案：{gold}"}
        return 200, {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}, {}

    with stub(answer) as (url, calls):
        assert main(["distill", "--teacher-url", url, "--teacher-model", "r1", "--data", str(data), "--output",
                     str(out), "--samples", "1"]) == 0
    assert len(calls) == 4 and {auth for _, _, auth in calls} == {"Bearer sk-env"}
    assert len(out.read_text(encoding="utf-8").splitlines()) == 3


def test_several_teacher_urls_take_the_questions_in_turn_and_a_failing_one_is_named(tmp_path, capsys):
    """--teacher-url twice: question i goes to URL i mod 2 (across batches), the files are those of one URL; a URL
    that answers 500 after the retries stops the run with an error naming it."""
    from lawtune.config import DistillRun, load_config

    rows = synthetic_records(7, seed=5)
    data = write_jsonl(tmp_path / "train.json", rows)

    def answer(path, body, calls):
        gold = next("".join(r["answer"]) for r in rows if r["statement"] in body["messages"][-1]["content"])
        message = {"role": "assistant", "reasoning_content": "分析。", "content": f"答案：{gold}"}
        return 200, {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}, {}

    def failing(path, body, calls):
        return 500, {"error": "down"}, {"Retry-After": "0"}

    def asked(calls) -> list[int]:
        return sorted(next(i for i, r in enumerate(rows) if r["statement"] in body["messages"][-1]["content"])
                      for _, body, _ in calls)

    run = ["distill", "--teacher-model", "r1", "--data", str(data), "--samples", "1", "--batch-size", "3"]
    with stub(answer) as (first, first_calls), stub(answer) as (second, second_calls):
        assert main([*run, "--teacher-url", first, "--output", str(tmp_path / "one.jsonl")]) == 0
        first_calls.clear()
        assert main([*run, "--teacher-url", first, "--teacher-url", second, "--output", str(tmp_path / "two.jsonl")]) == 0
        assert asked(first_calls) == [0, 2, 4, 6] and asked(second_calls) == [1, 3, 5]
        assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
        with stub(failing) as (down, down_calls):
            capsys.readouterr()
            assert main([*run, "--teacher-url", first, "--teacher-url", down, "--output", str(tmp_path / "x.jsonl")]) == 2
            assert capsys.readouterr().err.splitlines()[-1].startswith(
                f"error: distill.teacher_url: {down}/chat/completions answered 500")
            assert len(down_calls) == 6  # its one request, sent again 5 times
    # a YAML or key=value of one URL, as before several were taken
    cfg = load_config(None, ["distill.teacher_url=http://a:8000/v1", "distill.teacher_model=r1"], DistillRun)
    assert cfg.distill.teacher_url == ["http://a:8000/v1"]


def test_sigterm_while_the_sampler_is_made_stops_before_the_first_batch(teacher, tmp_path, monkeypatch, capsys):
    """Loading a model can take minutes: a SIGTERM then stops the run at once (exit 143, a report, nothing sampled)."""
    import os
    import signal

    url, data, _ = teacher
    made = []

    def term_while_loading(cfg):
        os.kill(os.getpid(), signal.SIGTERM)
        made.append(cfg)  # not reached: the handler raised
        raise AssertionError("SIGTERM did not stop the loading")

    monkeypatch.setattr(distill, "teacher_sampler", term_while_loading)
    out = tmp_path / "traces.jsonl"
    assert main(["distill", "--teacher-url", url, "--teacher-model", "r1", "--data", str(data), "--output",
                 str(out)]) == 143
    assert not made and capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "preempted: 0 of the 12 questions left were sampled")
    assert json.loads(distill.side_files(out)[1].read_text(encoding="utf-8"))["this_run"]["questions_sampled"] == 0
