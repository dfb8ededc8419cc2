"""`lawtune eval --api-url URL --api-model NAME --tokenizer DIR`: a served model scored under eval's own rules.

Any OpenAI-compatible server (`lawtune serve`, vLLM, SGLang) answers through standard fields only. The prompt is
rendered here with the served model's tokenizer, exactly as in-process eval renders it, and sent as token ids to
``/v1/completions``; what comes back is scored as in-process answers are (JEC-QA's exact-set rule, LawBench's rule,
maj@K with ``--samples``, the same report and page):

* direct: one completion of the mode's budget (greedy = temperature 0).
* reasoning: a completion of the thinking budget; one cut off by it (``finish_reason`` length) is closed as eval
  closes it (``think.closing_text``) and asked again for the answer with the answer reserve, the trace re-tokenized
  from its text (a server returns text, not token ids: where the model wrote a token sequence its tokenizer would
  not, the forced answer may differ from the in-process one, as it does on transformers' generate).
* choice: every answer set of a question scored by the prompt's log-probabilities (``echo`` with ``logprobs`` and
  ``max_tokens`` 0, or 1 where the server refuses 0 with a 400); a server that returns none is refused in one line.
* ``--api-chat``: ``/v1/chat/completions`` for a chat-only server (it renders its own template): reasoning mode
  only, the answer read after ``</think>`` or from ``content`` beside ``reasoning_content``.

Sampled answers (``--samples K``: ``n`` = K) carry a seed made from (generation.seed, the question's id), so a
question's samples do not depend on what else is asked. Every scored question is appended to
``<report>.questions.jsonl`` as soon as its chunk is scored; a rerun with the same settings asks only the others
(other settings: refused, naming what changed).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from .config import EvalRun, GenerationConfig
from .data import Record, sha256_file
from .errors import UsageError
from .evaluate import candidate_answers, describe_file, load_eval_file, score_records, write_report
from .generation import default_budget, split_budget
from .generation.api_client import ApiClient, ApiError, choices_of
from .prompts import answer_text, chat_user_text, check_native, render_prompt
from .rundir import append_jsonl, resolve_prompt_format
from .scoring import extract_answer
from .think import CLOSE_LINES, answer_part, closing_text

log = logging.getLogger("lawtune")

QUESTIONS_SUFFIX = ".questions.jsonl"
# Questions asked per chunk, per request in flight: a chunk's answers reach the questions file together, and the
# chunk waits for its slowest question (more per chunk: less idle waiting, more to ask again after a crash).
CHUNK_PER_REQUEST = 8


def question_seed(gcfg: GenerationConfig, record_id: str, extra: int = 0) -> int:
    """The sampling seed of a question's request (``extra``: a forced answer's sample index + 1)."""
    digest = hashlib.sha256(f"{gcfg.seed}:{record_id}:{extra}".encode()).digest()
    return int.from_bytes(digest[:4], "big") >> 1  # a non-negative 31-bit int: every server takes it


def sampling_fields(gcfg: GenerationConfig, n: int, record_id: str, extra: int = 0) -> dict[str, Any]:
    """The OpenAI sampling fields of ``gcfg``: greedy is temperature 0."""
    if not gcfg.do_sample:
        return {"temperature": 0.0, "n": n}
    return {"temperature": gcfg.temperature, "top_p": gcfg.top_p, "seed": question_seed(gcfg, record_id, extra), "n": n}


class ServedModel:
    """Answers questions in a mode through an ``ApiClient``: rows as ``evaluate.answer_batch`` returns them."""

    def __init__(self, client: ApiClient, tokenizer, prompt_format: str, mode: str, chat: bool = False):
        self.client, self.tokenizer, self.prompt_format, self.mode = client, tokenizer, prompt_format, mode
        self.echo_tokens = 0  # choice mode's max_tokens: 1 once the server refused 0
        self.ask = self.chat if chat else {"direct": self.direct, "reasoning": self.reasoning,
                                            "choice": self.choice}[mode]

    def answer(self, records: list[Record], gcfg: GenerationConfig, n: int) -> list[dict]:
        """``n`` rows per record, record by record, ``client.concurrency`` questions at once."""
        return [row for rows in self.client.map(lambda r: self.ask(r, gcfg, n), records) for row in rows]

    # ------------------------------------------------------------------ helpers

    def token_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def complete(self, body: dict[str, Any], want: int) -> tuple[list[dict], dict]:
        answer = self.client.post("/completions", body)
        choices = choices_of(answer)
        if len(choices) != want:
            raise UsageError(f"{self.client.key}: {self.client.url}/completions answered {len(choices)} choices for "
                             f"{want} asked")
        return choices, answer

    def completion_tokens(self, choice: dict, answer: dict, n: int) -> int:
        """Tokens a choice generated: the server's count where the answer holds one choice, else its text's."""
        usage = answer.get("usage") or {}
        if n == 1 and isinstance(usage.get("completion_tokens"), int):
            return usage["completion_tokens"]
        text = choice.get("text")
        if text is None:
            text = (choice.get("message") or {}).get("content") or ""
        if self.tokenizer is None:
            return round(usage.get("completion_tokens", 0) / max(n, 1))
        return len(self.token_ids(text)) + int(choice.get("finish_reason") == "stop")

    # ------------------------------------------------------------------ modes

    def direct(self, record: Record, gcfg: GenerationConfig, n: int) -> list[dict]:
        prompt = self.token_ids(render_prompt(record, self.tokenizer, self.prompt_format, think=False))
        body = {"prompt": prompt, "max_tokens": default_budget("direct", gcfg.max_new_tokens),
                **sampling_fields(gcfg, n, record.id)}
        choices, answer = self.complete(body, n)
        letters = "".join(record.options)
        return [{"output": c.get("text") or "", "pred": extract_answer(c.get("text") or "", letters),
                 "generated_tokens": self.completion_tokens(c, answer, n), "forced": False} for c in choices]

    def reasoning(self, record: Record, gcfg: GenerationConfig, n: int) -> list[dict]:
        prompt = self.token_ids(render_prompt(record, self.tokenizer, self.prompt_format, think=True))
        think, reserve = split_budget(default_budget("reasoning", gcfg.max_new_tokens))
        choices, answer = self.complete({"prompt": prompt, "max_tokens": think,
                                          **sampling_fields(gcfg, n, record.id)}, n)
        rows = []
        for j, choice in enumerate(choices):
            output, tokens = choice.get("text") or "", self.completion_tokens(choice, answer, n)
            forced = choice.get("finish_reason") != "stop"
            if forced and reserve:  # cut off by the thinking budget: closed here, then asked for its answer
                closing = closing_text(output, self.prompt_format)
                body = {"prompt": prompt + self.token_ids(output) + self.token_ids(closing), "max_tokens": reserve,
                        **sampling_fields(gcfg, 1, record.id, j + 1)}
                [more], more_answer = self.complete(body, 1)
                output += closing + (more.get("text") or "")
                tokens += self.completion_tokens(more, more_answer, 1)
            rows.append({"output": output, "pred": extract_answer(answer_part(output), "".join(record.options)),
                         "generated_tokens": tokens, "forced": forced})
        return rows

    def choice(self, record: Record, gcfg: GenerationConfig, n: int) -> list[dict]:
        prompt = self.token_ids(render_prompt(record, self.tokenizer, self.prompt_format, think=False))
        cands = candidate_answers("".join(record.options))
        tails = [self.token_ids(answer_text(c)) + [self.tokenizer.eos_token_id] for c in cands]
        body = {"prompt": [prompt + t for t in tails], "max_tokens": self.echo_tokens, "echo": True, "logprobs": 0,
                "temperature": 0.0}
        try:
            choices, _ = self.complete(body, len(cands))
        except ApiError as exc:
            if exc.status != 400 or body["max_tokens"]:
                raise
            # a server that generates at least one token: the prompt's log-probabilities come all the same
            self.echo_tokens = 1
            choices, _ = self.complete({**body, "max_tokens": 1}, len(cands))
        scores = []
        for tail, choice in zip(tails, choices):
            values = (choice.get("logprobs") or {}).get("token_logprobs") or []
            mine = values[len(prompt): len(prompt) + len(tail)]
            if len(mine) != len(tail) or any(not isinstance(v, (int, float)) for v in mine):
                raise UsageError(f"{self.client.key}: {self.client.url}/completions returned no log-probabilities of "
                                 f"the prompt (echo with logprobs), which choice mode scores answers by; use --mode "
                                 f"direct or reasoning")
            scores.append(sum(mine))
        best, value = max(zip(cands, scores), key=lambda cs: cs[1])
        return [{"output": answer_text(best), "pred": list(best), "generated_tokens": 0, "forced": False,
                 "score": round(value, 4)}] * n  # scoring is deterministic: n samples are one

    def chat(self, record: Record, gcfg: GenerationConfig, n: int) -> list[dict]:
        body = {"messages": [{"role": "user", "content": chat_user_text(record)}],
                "max_tokens": default_budget("reasoning", gcfg.max_new_tokens), **sampling_fields(gcfg, n, record.id)}
        answer = self.client.post("/chat/completions", body)
        rows = []
        for choice in choices_of(answer):
            message = choice.get("message") or {}
            content, thought = message.get("content") or "", message.get("reasoning_content")
            # a reasoning parser split the turn: join it as the model wrote it, so the answer is read after </think>
            output = content if thought is None else thought + CLOSE_LINES["chat"] + content
            rows.append({"output": output, "pred": extract_answer(answer_part(output), "".join(record.options)),
                         "generated_tokens": self.completion_tokens(choice, answer, n),
                         "forced": choice.get("finish_reason") != "stop"})
        if len(rows) != n:
            raise UsageError(f"{self.client.key}: {self.client.url}/chat/completions answered {len(rows)} choices for "
                             f"{n} asked")
        return rows


# ----------------------------------------------------------------------------- the questions file (resuming)


def questions_file(report: str | Path) -> Path:
    """The per-question answers beside a report: ``report.json`` -> ``report.questions.jsonl``."""
    out = Path(report)
    return out.with_name((out.stem if out.suffix else out.name) + QUESTIONS_SUFFIX)


def run_settings(cfg: EvalRun, prompt_format: str) -> dict:
    """What decides a question's answer: a rerun resumes only a file of the same settings."""
    e, g = cfg.eval, cfg.generation
    settings = {"api_url": e.api_url, "api_model": e.api_model, "api_chat": e.api_chat, "tokenizer": e.tokenizer,
                "mode": e.mode, "samples": e.samples, "prompt_format": prompt_format,
                "shuffle_options": e.shuffle_options, "shuffle_seed": e.seed, "data_sha256": sha256_file(e.data),
                "generation": {k: getattr(g, k) for k in ("max_new_tokens", "do_sample", "temperature", "top_p",
                                                          "seed")}}
    return json.loads(json.dumps(settings))


def read_scored(path: Path, settings: dict) -> dict[str, dict]:
    """The questions a file holds, by id, where it was written with ``settings``; a torn last line (a crash while
    writing) is cut off."""
    if not path.is_file():
        return {}
    lines = path.read_text(encoding="utf-8").split("\n")
    rows, good = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
            good.append(line)
        except ValueError:
            if number != len(lines):
                raise UsageError(f"{path}:{number}: not a JSON line (remove the file to score every question "
                                 f"again)") from None
            log.warning("%s: dropping an unfinished last line", path)
    if not rows or not isinstance(rows[0], dict) or "settings" not in rows[0]:
        raise UsageError(f"{path}:1: not a questions file of lawtune eval (remove it, or give another --output)")
    changed = sorted(k for k in settings.keys() | rows[0]["settings"].keys()
                     if settings.get(k) != rows[0]["settings"].get(k))
    if changed:
        raise UsageError(f"{path}: its questions were scored with other settings ({', '.join(changed)} changed); "
                         f"remove it to score them again, or give another --output")
    if len(good) != sum(1 for line in lines if line.strip()):
        path.write_text("".join(line + "\n" for line in good), encoding="utf-8")  # appends start on a whole line
    return {str(row["id"]): row for row in rows[1:]}


# ----------------------------------------------------------------------------- the command


def api_client(cfg: EvalRun, api_url: str, api_model: str) -> ApiClient:
    e = cfg.eval
    return ApiClient(api_url, api_model, "eval.api_url", api_key=e.api_key.get_secret_value() if e.api_key else None,
                     timeout_s=e.api_timeout_s, concurrency=e.api_concurrency, retries=e.api_retries)


def api_tokenizer(cfg: EvalRun):
    """The served model's tokenizer (None for a chat server without one)."""
    from .model import load_tokenizer, quiet_loading

    if not cfg.eval.tokenizer:
        return None
    quiet_loading()
    return load_tokenizer(cfg.eval.tokenizer, padding_side="left")


def api_prompt_format(cfg: EvalRun) -> str:
    """The format given, else a merged model's (its folder given as the tokenizer), else chat."""
    return resolve_prompt_format(cfg.eval.tokenizer or "", None, cfg.adapter.prompt_format)


def score_api_file(client: ApiClient, tokenizer, records, skipped, overlap, cfg: EvalRun, prompt_format: str,
                   output: Path) -> dict:
    """The report of one file from the served model: its questions file resumed, then every other question asked."""
    e = cfg.eval
    side = questions_file(output)
    settings = run_settings(cfg, prompt_format)
    done = read_scored(side, settings)
    done = {r.id: done[r.id] for r in records if r.id in done}
    if done:
        log.info("%s: %d of %d questions were scored before; asking the other %d", side, len(done), len(records),
                 len(records) - len(done))

    def scored(rows: list[dict]) -> None:
        if not side.is_file():  # written with the first answers: a run that got none leaves no file
            side.parent.mkdir(parents=True, exist_ok=True)
            append_jsonl(side, [{"settings": settings}])
        append_jsonl(side, rows)

    served = ServedModel(client, tokenizer, prompt_format, e.mode, chat=e.api_chat)
    samples, summary = score_records(served.answer, records, e, cfg.generation, e.api_concurrency * CHUNK_PER_REQUEST,
                                     done=done, on_scored=scored)
    describe_file(summary, records, skipped, overlap, cfg, prompt_format)
    summary.update({"model": client.model, "api_url": client.url, "api_chat": e.api_chat, "tokenizer": e.tokenizer,
                    "resumed_questions": len(done), "retried_requests": client.retried})
    return {"summary": summary, "samples": samples}


def eval_api_file(cfg: EvalRun) -> dict:
    """Score ``eval.data`` on the served model, write the report and return it."""
    e = cfg.eval
    assert e.api_url and e.api_model, "called with eval.api_url and eval.api_model"
    if not e.data:
        raise UsageError("eval.data: no file to score (pass --data FILE, or --suite SUITE.yaml)")
    output = Path(e.output)
    if output.is_dir():
        raise UsageError(f"eval.output: {output} is a directory; give a report file (e.g. {output / 'report.json'})")
    records, skipped, overlap = load_eval_file(e.data, e, None)
    prompt_format = api_prompt_format(cfg)
    check_native(prompt_format, records, e.data)
    tokenizer = api_tokenizer(cfg)
    with api_client(cfg, e.api_url, e.api_model) as client:
        report = score_api_file(client, tokenizer, records, skipped, overlap, cfg, prompt_format, output)
    write_report(report, output)
    return report
