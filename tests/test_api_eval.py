"""`lawtune eval --api-url`: a served model (`lawtune serve` on loopback, standard OpenAI fields only) scores as the
same model does in process; retries, resuming, the settings it refuses."""

import json
from contextlib import contextmanager
from pathlib import Path

import pytest

from lawtune.api_eval import ServedModel, eval_api_file
from lawtune.cli import main
from lawtune.config import EvalFileConfig, EvalRun, GenerationConfig, ModelConfig, ServeConfig, load_config
from lawtune.data import load_records
from lawtune.errors import UsageError
from lawtune.evaluate import eval_file, score_candidates
from lawtune.generation.api_client import ApiClient
from lawtune.infer import load_model
from lawtune.model import load_for_inference
from lawtune.serve import make_server, serving

from conftest import REASONING, stub, synthetic_records, write_jsonl


@contextmanager
def served(model_dir):
    """`lawtune serve`'s server for ``model_dir`` on a free loopback port: its API root."""
    server = make_server(load_model(ModelConfig(path=str(model_dir), dtype="float32")), ServeConfig(port=0))
    with serving(server) as url:
        yield f"{url}/v1"


@pytest.fixture(scope="module")
def random_server(tiny_model_dir):
    with served(tiny_model_dir) as url:
        yield url


@pytest.fixture(scope="module")
def answering_server(answering_model_dir):
    with served(answering_model_dir) as url:
        yield url


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("api") / "q.json", synthetic_records(6, seed=3))


def in_process(model_dir, data, out, mode, max_new_tokens=None, **eval_settings):
    return eval_file(EvalRun(model=ModelConfig(path=str(model_dir), dtype="float32"),
                             generation=GenerationConfig(max_new_tokens=max_new_tokens),
                             eval=EvalFileConfig(mode=mode, data=str(data), output=str(out), batch_size=4,
                                                 **eval_settings)))


def over_api(url, model_dir, data, out, mode, max_new_tokens=None, **eval_settings):
    return eval_api_file(EvalRun(generation=GenerationConfig(max_new_tokens=max_new_tokens),
                             eval=EvalFileConfig(mode=mode, data=str(data), output=str(out), api_url=url,
                                                 api_model="lawtune", tokenizer=str(model_dir),
                                                 **{"api_concurrency": 3, **eval_settings})))


SAMPLES = Path(__file__).resolve().parent / "fixtures" / "benchmarks"
PER_QUESTION = ("id", "gold", "pred", "valid", "correct", "forced", "output", "generated_tokens")


def assert_same_report(api, local):
    assert [{k: s[k] for k in PER_QUESTION} for s in api["samples"]] == \
        [{k: s[k] for k in PER_QUESTION} for s in local["samples"]]
    for key in ("n", "accuracy", "single", "multi", "invalid", "forced", "mode", "prompt_format", "data_sha256"):
        assert api["summary"][key] == local["summary"][key], key


def test_a_served_random_model_answers_as_in_process(random_server, tiny_model_dir, questions, tmp_path):
    """Greedy direct mode: the same outputs, answers, token counts and accuracy."""
    local = in_process(tiny_model_dir, questions, tmp_path / "local.json", "direct")
    api = over_api(random_server, tiny_model_dir, questions, tmp_path / "api.json", "direct")
    assert_same_report(api, local)
    assert json.loads((tmp_path / "api.json").read_text(encoding="utf-8"))["summary"]["api_url"] == random_server


def test_a_cut_off_random_trace_is_closed_and_forced_as_in_process(random_server, tiny_model_dir, questions,
                                                                   tmp_path):
    """Every trace runs out of its budget: the same traces, closed the same way, forced. (The forced answer itself is
    asked on the trace re-tokenized from its text; a random model writes pieces of characters that do not come back
    as the same tokens, so only the traces are compared here: the next test compares whole forced answers.)"""
    local = in_process(tiny_model_dir, questions, tmp_path / "local.json", "reasoning", 12)
    api = over_api(random_server, tiny_model_dir, questions, tmp_path / "api.json", "reasoning", 12)
    close = "\n</think>\n\n答案："
    assert all(s["forced"] and close in s["output"] for s in api["samples"])
    assert [s["output"].split(close)[0] for s in api["samples"]] == [s["output"].split(close)[0]
                                                                    for s in local["samples"]]


@pytest.mark.parametrize("budget", [None, 4])
def test_a_served_answering_model_reasons_and_answers_as_in_process(budget, answering_server, answering_model_dir,
                                                                    questions, tmp_path):
    """Reasoning to its own end (no budget), and cut off after two tokens and forced (budget 4: 2 to think, 2 to
    answer): the same report."""
    local = in_process(answering_model_dir, questions, tmp_path / "local.json", "reasoning", budget)
    api = over_api(answering_server, answering_model_dir, questions, tmp_path / "api.json", "reasoning", budget)
    assert_same_report(api, local)
    assert all(s["pred"] == ["A"] and s["forced"] == (budget is not None) for s in api["samples"])
    if budget is None:
        assert all(s["output"].startswith(REASONING) for s in api["samples"])


def test_choice_mode_scores_the_answer_sets_by_the_prompt_log_probabilities(random_server, tiny_model_dir, questions,
                                                                           tmp_path):
    local = in_process(tiny_model_dir, questions, tmp_path / "local.json", "choice")
    api = over_api(random_server, tiny_model_dir, questions, tmp_path / "api.json", "choice")
    assert [s["pred"] for s in api["samples"]] == [s["pred"] for s in local["samples"]]
    assert api["summary"]["accuracy"] == local["summary"]["accuracy"]
    # the best answer set's summed log-probability, from the server's prompt log-probabilities and in process
    records = load_records(questions).records
    model, tokenizer = load_for_inference(ModelConfig(path=str(tiny_model_dir), dtype="float32"))
    with ApiClient(random_server, "lawtune", "eval.api_url") as client:
        rows = ServedModel(client, tokenizer, "chat", "choice").answer(records, GenerationConfig(), 1)
    best = [max(score for _, score in scored) for scored in score_candidates(model, tokenizer, records, "chat")]
    assert [row["score"] for row in rows] == pytest.approx(best, abs=1e-3)


# ----------------------------------------------------------------------------- against a stub server


def completion(text="答案：A", finish="stop"):
    return {"choices": [{"index": 0, "text": text, "finish_reason": finish}]}


def test_429_and_503_are_asked_again_after_a_wait_and_the_key_comes_from_the_environment(monkeypatch):
    statuses = [429, 503, 200]
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")

    def answer(path, body, calls):
        status = statuses[len(calls) - 1]
        return status, (completion() if status == 200 else {"error": "busy"}), {"Retry-After": "0"} if status == 429 else {}

    with stub(answer) as (url, calls), ApiClient(url, "m", "eval.api_url", backoff_s=0.01) as client:
        assert client.post("/completions", {"prompt": [1, 2]})["choices"][0]["text"] == "答案：A"
        assert len(calls) == 3 and client.retried == 2
        assert all(auth == "Bearer sk-from-env" for _, _, auth in calls) and calls[0][1]["model"] == "m"


def test_a_server_that_keeps_failing_or_refuses_is_one_line_naming_the_setting():
    with stub(lambda path, body, calls: (503, {"error": "down"}, {})) as (url, calls):
        with ApiClient(url, "m", "eval.api_url", retries=2, backoff_s=0.01) as client:
            with pytest.raises(UsageError, match=r"^eval.api_url: .* answered 503: .*down"):
                client.post("/completions", {})
        assert len(calls) == 3
    with stub(lambda path, body, calls: (401, {"error": "no key"}, {})) as (url, calls):
        with ApiClient(url, "m", "eval.api_url", api_key="sk-secret", backoff_s=0.01) as client:
            with pytest.raises(UsageError, match="answered 401 \\(check the API key") as err:
                client.post("/completions", {})
        assert len(calls) == 1 and "sk-secret" not in str(err.value)


def test_a_rerun_asks_only_the_questions_not_yet_scored(tiny_model_dir, tmp_path):
    rows = synthetic_records(5, seed=4)
    data = write_jsonl(tmp_path / "q.json", rows)
    asked = []

    def answer(path, body, calls):
        asked.append(body["prompt"])
        return 200, completion(), {}

    out = tmp_path / "r.json"
    with stub(answer) as (url, calls):
        first = over_api(url, tiny_model_dir, data, out, "direct", max_samples=3)
        assert len(asked) == 3
        side = tmp_path / "r.questions.jsonl"
        lines = side.read_text(encoding="utf-8").splitlines()
        assert len(lines) == 4 and "settings" in json.loads(lines[0])
        side.write_text("\n".join(lines[:3]) + "\n" + lines[3][:20], encoding="utf-8")  # a crash while writing
        asked.clear()
        second = over_api(url, tiny_model_dir, data, out, "direct")
        assert len(asked) == 3  # the torn question and the two never asked
        assert second["summary"]["resumed_questions"] == 2 and second["summary"]["n"] == 5
        assert [s["id"] for s in second["samples"]] == [r["id"] for r in rows]
        assert [s["pred"] for s in second["samples"][:3]] == [s["pred"] for s in first["samples"]]
        asked.clear()
        with pytest.raises(UsageError, match=r"r.questions.jsonl: .*\(mode changed\)"):
            over_api(url, tiny_model_dir, data, out, "reasoning")
        assert not asked


def test_choice_mode_is_refused_in_one_line_where_the_server_gives_no_prompt_log_probabilities(tiny_model_dir,
                                                                                             questions, tmp_path):
    def answer(path, body, calls):
        return 200, {"choices": [{"index": i, "text": "", "finish_reason": "length"} for i in range(len(body["prompt"]))]}, {}

    with stub(answer) as (url, calls):
        with pytest.raises(UsageError, match="^eval.api_url: .*no log-probabilities of the prompt"):
            over_api(url, tiny_model_dir, questions, tmp_path / "r.json", "choice")
        assert calls[0][1]["echo"] is True and calls[0][1]["max_tokens"] == 0 and calls[0][1]["logprobs"] == 0
    assert not (tmp_path / "r.questions.jsonl").exists()  # nothing was scored: no file to resume


def test_a_chat_only_server_reasons_and_is_read_after_the_think_block(questions, tmp_path):
    gold = {r["statement"]: "".join(r["answer"]) for r in synthetic_records(6, seed=3)}

    def answer(path, body, calls):
        assert path == "/v1/chat/completions"
        letters = next(v for s, v in gold.items() if s in body["messages"][0]["content"])
        message = {"role": "assistant", "reasoning_content": "答案：Z 不对", "content": f"答案：{letters}"}
        return 200, {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                     "usage": {"completion_tokens": 7}}, {}

    with stub(answer) as (url, calls):
        report = eval_api_file(EvalRun(eval=EvalFileConfig(mode="reasoning", data=str(questions), api_url=url, api_model="r1",
                                                           api_chat=True, output=str(tmp_path / "r.json"))))
    assert report["summary"]["accuracy"] == 1.0 and report["samples"][0]["generated_tokens"] == 7


@pytest.mark.parametrize("args,message", [
    (["--api-url", "http://x/v1", "--api-model", "m", "--tokenizer", "t", "--model", "m2"], "model.path: not read with"),
    (["--api-url", "http://x/v1", "--api-model", "m", "--tokenizer", "t", "--adapter", "a"], "adapter.path: not read"),
    (["--api-url", "http://x/v1", "--api-model", "m", "--tokenizer", "t", "model.dtype=bfloat16"], "model.dtype: not"),
    (["--api-url", "http://x/v1", "--tokenizer", "t"], "eval.api_model: give both"),
    (["--api-url", "http://x/v1", "--api-model", "m"], "eval.tokenizer: needed with eval.api_url"),
    (["--api-url", "http://x/v1", "--api-model", "m", "--api-chat"], "eval.api_chat: direct mode needs"),
    (["--api-url", "http://x/v1", "--api-model", "m", "--api-chat", "--mode", "choice"], "eval.api_chat: choice mode"),
    (["--model", "m", "--tokenizer", "t"], "eval.tokenizer: only with eval.api_url"),
])
def test_settings_a_served_model_does_not_read_are_refused_in_one_line(args, message, capsys, tmp_path):
    assert main(["eval", "--data", "d.json", "--output", str(tmp_path / "r.json"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_the_api_key_flag_is_never_printed(capsys):
    cfg = load_config(None, ["eval.api_url=http://x/v1", "eval.api_model=m", "eval.tokenizer=t",
                             "eval.api_key=sk-hidden"], run_cls=EvalRun)
    assert cfg.eval.api_key.get_secret_value() == "sk-hidden" and "sk-hidden" not in repr(cfg)


def test_a_suite_of_a_served_model_writes_the_reports_and_page_the_local_suite_does(answering_server,
                                                                                  answering_model_dir, tmp_path):
    runs = f"""runs:
  - {{name: jecqa_direct, data: {SAMPLES / 'jecqa_train.json'}, mode: direct}}
  - {{name: lawbench_native, data: {SAMPLES / 'lawbench' / 'zero_shot' / '1-2.json'}, mode: direct, prompt_format: native}}
  - {{name: lawbench_k2, data: {SAMPLES / 'lawbench' / 'zero_shot' / '1-2.json'}, mode: reasoning, samples: 2, max_new_tokens: 16}}
"""
    (tmp_path / "local.yaml").write_text(f"model: {answering_model_dir}\n" + runs, encoding="utf-8")
    (tmp_path / "api.yaml").write_text(f"api_url: {answering_server}\napi_model: lawtune\n"
                                       f"tokenizer: {answering_model_dir}\n" + runs, encoding="utf-8")
    assert main(["eval", "--suite", str(tmp_path / "local.yaml"), "--output", str(tmp_path / "local.html"),
                 "model.dtype=float32"]) == 0
    assert main(["eval", "--suite", str(tmp_path / "api.yaml"), "--output", str(tmp_path / "api.html")]) == 0
    for name in ("jecqa_direct", "lawbench_native", "lawbench_k2"):
        local, api = (json.loads((tmp_path / f"{side}.{name}.json").read_text(encoding="utf-8"))
                      for side in ("local", "api"))
        assert [s["pred"] for s in api["samples"]] == [s["pred"] for s in local["samples"]]
        for key in ("accuracy", "lawbench_score", "samples", "avg@2", "maj@2", "prompt_format"):
            assert api["summary"].get(key) == local["summary"].get(key), (name, key)
    assert "lawtune at http" in (tmp_path / "api.html").read_text(encoding="utf-8")


def test_a_suite_of_a_served_model_refuses_a_local_model_in_one_line(tmp_path, capsys):
    suite = tmp_path / "s.yaml"
    suite.write_text("api_url: http://x/v1\napi_model: m\nmodel: ./m\nruns:\n  - {name: a, data: x.json}\n",
                     encoding="utf-8")
    assert main(["eval", "--suite", str(suite), "--tokenizer", "t"]) == 2
    assert "model: a suite with api_url scores the served model" in capsys.readouterr().err
    suite.write_text("api_url: http://x/v1\nruns:\n  - {name: a, data: x.json}\n", encoding="utf-8")
    assert main(["eval", "--suite", str(suite), "--tokenizer", "t"]) == 2
    assert "s.yaml: eval.api_model: give both api_url and api_model" in capsys.readouterr().err


def test_sampled_answers_come_from_the_question_whatever_is_asked_beside_it(random_server, tiny_model_dir,
                                                                            questions, tmp_path):
    """--samples K: n = K samples a question, seeded by (generation.seed, its id): two requests at a time or five give
    the same report; the K samples are drawn (they differ) and voted."""
    two = over_api(random_server, tiny_model_dir, questions, tmp_path / "two.json", "direct", 6, samples=3,
                   api_concurrency=2)
    five = over_api(random_server, tiny_model_dir, questions, tmp_path / "five.json", "direct", 6, samples=3,
                    api_concurrency=5)
    assert [s["sampled"] for s in two["samples"]] == [s["sampled"] for s in five["samples"]]
    assert all(len(s["sampled"]) == 3 for s in two["samples"]) and "maj@3" in two["summary"]
    assert any(len({x["output"] for x in s["sampled"]}) > 1 for s in two["samples"])


def test_choice_mode_asks_for_one_token_where_the_server_refuses_none(tiny_model_dir, tmp_path):
    """A server that will not score a prompt without generating (max_tokens 0: 400) is asked with max_tokens 1."""
    data = write_jsonl(tmp_path / "q.json", synthetic_records(2, seed=6))

    def answer(path, body, calls):
        if body["max_tokens"] == 0:
            return 400, {"error": "max_tokens must be at least 1"}, {}
        # every answer set's end token at -1, except the last one's (ABCD): it wins
        last = len(body["prompt"]) - 1
        return 200, {"choices": [{"index": i, "text": "", "finish_reason": "length", "logprobs": {
            "token_logprobs": [None] + [0.0] * (len(p) - 2) + [0.0 if i == last else -1.0]}}
            for i, p in enumerate(body["prompt"])]}, {}

    with stub(answer) as (url, calls):
        report = over_api(url, tiny_model_dir, data, tmp_path / "r.json", "choice")
    # 0 refused (by each question asked before the first refusal came back: requests run concurrently, so a second 0
    # may come after the first 1), then 1 for each question.
    asked = [c[1]["max_tokens"] for c in calls]
    assert asked[0] == 0 and asked.count(1) == 2 and 1 <= asked.count(0) <= 2 and len(asked) <= 4
    assert all(s["pred"] == ["A", "B", "C", "D"] for s in report["samples"])
