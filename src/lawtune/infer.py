"""Using a fine-tuned model: one question (`ask`), a file without answers (`predict`), and merging.

Everything loads the base model once through ``model.load_for_inference`` (which refuses an adapter
built for another base model) and renders prompts with ``prompts.render_prompt`` in the format the
adapter was trained with, so a question is asked exactly as in training and evaluation:

* ``direct``: the prompt closes an empty think block and the model writes ``答案：…`` at once.
* ``reasoning``: the model thinks first; a trace that runs out of budget is closed and asked for its
  answer, as ``lawtune eval`` does (the answer is then flagged as forced).

``generate_events`` is the one streaming generation path, shared by ``lawtune ask`` and the HTTP
server (``serve/``); ``predict`` reuses the batched evaluation modes of ``evaluate.py``. All text comes
from ``generation``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import threading
import unicodedata
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers.decoders import DecodeStream

from .config import INFER_MODES, GenerationConfig, ModelConfig
from .config import replace as replace_config
from .data import DataError, Record, parse_record
from .errors import UsageError
from .evaluate import answer_batch
from .generation import (
    Generated,
    default_budget,
    engine_holder,
    forced_answer,
    generated,
    hf_generate,
    sampling_params,
    split_budget,
    uses_engine,
)
from .generation.engine import EngineHolder, GenerationEngine
from .model import ModelError, load_for_inference, quiet_loading
from .prompts import ANSWER_PREFIX, render_prompt
from .rundir import resolve_prompt_format
from .scoring import extract_answer, majority
from .think import CLOSE, answer_part, closing_text

log = logging.getLogger("lawtune")

UNREADABLE = "（无法识别）"


def answer_line(letters: list[str] | None) -> str:
    """The answer as printed: ``答案：AC``, or ``答案：（无法识别）`` when nothing could be read."""
    return ANSWER_PREFIX + ("".join(sorted(set(letters))) if letters else UNREADABLE)


# ----------------------------------------------------------------------------- questions


_OPTION_LINE = re.compile(r"^\s*(?:[(（]\s*([A-ZＡ-Ｚ])\s*[)）]|([A-ZＡ-Ｚ])\s*[.．、:：)）])\s*(.*?)\s*$")
_OPTION_ARG = re.compile(r"^\s*([A-Za-z])\s*[=.．:：、]\s*(.*?)\s*$", re.S)


def _letter(match: re.Match) -> str:
    return unicodedata.normalize("NFKC", match.group(1) or match.group(2))


def record_from_fields(statement: str, options: dict[str, str], record_id: str = "question",
                       where: str = "question") -> Record:
    """A validated record (at least two options, letters A-Z) from a statement and its options."""
    record, problem, _ = parse_record({"id": record_id, "statement": statement, "option_list": options}, where, False)
    if record is None:
        raise DataError([problem or f"{where}: not a question"])
    return record


def record_from_json(text: str, where: str = "--record") -> Record:
    """A JEC-QA-shaped JSON object (``statement``, ``option_list``; ``id`` optional, ``answer`` ignored)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError([f"{where}: malformed JSON ({exc.msg})"]) from None
    if not isinstance(obj, dict):
        raise DataError([f"{where}: expected a JSON object with 'statement' and 'option_list'"])
    obj = {k: v for k, v in obj.items() if k != "answer"}  # a gold answer plays no part in asking
    obj.setdefault("id", "question")
    record, problem, _ = parse_record(obj, where, False)
    if record is None:
        raise DataError([problem or f"{where}: not a question"])
    return record


def parse_options_arg(items: list[str]) -> dict[str, str]:
    """``--option A=text`` (also ``A.text``, ``A：text``), in the order given."""
    options: dict[str, str] = {}
    for item in items:
        m = _OPTION_ARG.match(item)
        if not m or not m.group(2):
            raise UsageError(f"--option {item!r}: expected LETTER=text, e.g. --option 'A=合同无效'")
        letter = m.group(1).upper()
        if letter in options:
            raise UsageError(f"--option {item!r}: option {letter} given twice")
        options[letter] = m.group(2)
    return options


def split_question_text(text: str) -> tuple[str, dict[str, str]]:
    """Split plain text into (statement, options): the options are the trailing lines ``A. …``, ``B. …``
    (also ``A、`` ``A：`` ``(A)``, full-width letters) in letter order; a line that is not the next
    option continues the one before. Fewer than two such lines: the whole text is the statement."""
    lines = text.strip().splitlines()
    starts = [i for i, line in enumerate(lines) if (m := _OPTION_LINE.match(line)) and _letter(m) == "A"]
    if not starts:
        return text.strip(), {}
    first = starts[-1]
    options: dict[str, str] = {}
    current = None
    for line in lines[first:]:
        m = _OPTION_LINE.match(line)
        expected = chr(ord("A") + len(options))
        if m and _letter(m) == expected and m.group(3):
            current = expected
            options[current] = m.group(3)
        elif line.strip() and current:
            options[current] += "\n" + line.strip()
    statement = "\n".join(lines[:first]).strip()
    if len(options) < 2 or not statement:
        return text.strip(), {}
    return statement, options


def record_from_text(text: str, where: str = "question", require_options: bool = True) -> Record:
    """A record from what a person typed: a JSON record, or a question with option lines.

    Without option lines a question is refused when ``require_options``; otherwise (the HTTP API) it
    is asked as a free question with no options, whose answer letters are then empty."""
    stripped = text.strip()
    if not stripped:
        raise DataError([f"{where}: empty question"])
    if stripped.startswith("{"):
        try:
            obj = json.loads(stripped)
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict) and ("statement" in obj or "option_list" in obj):
            return record_from_json(stripped, where)
    statement, options = split_question_text(stripped)
    if options:
        return record_from_fields(statement, options, where=where)
    if require_options:
        raise DataError([f"{where}: no options found; give at least two, one per line as 'A. …', or --option A=…"])
    return Record(id="question", statement=statement, options={}, answer=None, where=where)


def record_from_lines(lines: list[str], where: str = "stdin") -> Record:
    """Interactive input: a question followed by its options, one per line; lettered lines (``A. …``)
    keep their letters, unlettered ones are lettered A, B, C… in order."""
    lines = [line.rstrip() for line in lines if line.strip()]
    if not lines:
        raise DataError([f"{where}: empty question"])
    statement, options = split_question_text("\n".join(lines))
    if options:
        return record_from_fields(statement, options, where=where)
    options = {}
    for line in lines[1:]:
        m = _OPTION_LINE.match(line)
        options[chr(ord("A") + len(options))] = m.group(3) if m and m.group(3) else line.strip()
    return record_from_fields(lines[0].strip(), options, where=where)


# ----------------------------------------------------------------------------- engine


@dataclass
class LoadedModel:
    """One loaded model and how its questions are asked."""

    model: Any
    """The transformers (or PEFT) model."""
    tokenizer: Any
    prompt_format: str
    gcfg: GenerationConfig
    """The default generation settings of its requests."""
    generator: GenerationEngine | None = None
    """A generation engine running in the background, shared by concurrent requests (``serve``); None = the
    engine of ``engines``, driven by the caller."""
    engines: EngineHolder | None = None
    """The engine the caller drives (``ask``, ``predict``), made on first use and kept for the next question."""

    def __post_init__(self) -> None:
        if self.engines is None:
            self.engines = engine_holder(self.tokenizer, self.gcfg)

    def close(self) -> None:
        """Give back the model's engines (their caches, graphs and model references); the command that loaded the
        model calls it when done."""
        if self.generator is not None:
            self.generator.close()
        if self.engines is not None:
            self.engines.close()


def load_model(mcfg: ModelConfig, gcfg: GenerationConfig | None = None, adapter: str | None = None,
                prompt_format: str | None = None, force: bool = False, fold: bool = False) -> LoadedModel:
    fmt = resolve_prompt_format(mcfg.path, adapter, prompt_format)
    quiet_loading()
    try:
        model, tokenizer = load_for_inference(mcfg, adapter, force=force, fold=fold)
    except RuntimeError as exc:  # peft's size mismatch for a shape check_adapter does not cover
        raise ModelError(f"{adapter}: adapter does not fit the base model {mcfg.path} "
                         f"({str(exc).strip().splitlines()[-1].strip()[:200]})") from None
    return LoadedModel(model, tokenizer, fmt, gcfg or GenerationConfig())


class ThinkSplitter:
    """Routes streamed text to ("reasoning", …) before ``</think>`` and ("content", …) after it, holding
    back a possibly split marker and the line breaks that start the answer."""

    MARK = CLOSE

    def __init__(self, reasoning: bool) -> None:
        self.in_reasoning = reasoning
        self.buffer = ""
        self.content_started = False

    def feed(self, text: str) -> list[tuple[str, str]]:
        self.buffer += text
        events = []
        if self.in_reasoning:
            if self.MARK in self.buffer:
                before, self.buffer = self.buffer.split(self.MARK, 1)
                self.in_reasoning = False
                if before:
                    events.append(("reasoning", before))
            elif self.MARK[0] not in self.buffer[1 - len(self.MARK):]:  # no start of the marker to hold back
                out, self.buffer = self.buffer, ""
                return [("reasoning", out)] if out else []
            else:
                keep = next((k for k in range(min(len(self.MARK) - 1, len(self.buffer)), 0, -1)
                             if self.MARK.startswith(self.buffer[-k:])), 0)
                out, self.buffer = self.buffer[: len(self.buffer) - keep], self.buffer[len(self.buffer) - keep:]
                return [("reasoning", out)] if out else []
        if not self.content_started:
            self.buffer = self.buffer.lstrip()
            self.content_started = bool(self.buffer)
        if self.buffer:
            events.append(("content", self.buffer))
            self.buffer = ""
        return events

    def flush(self) -> list[tuple[str, str]]:
        out, self.buffer = self.buffer, ""
        return [("reasoning" if self.in_reasoning else "content", out)] if out else []


@dataclass
class Answer:
    output: str
    """Everything generated (for reasoning mode: the trace, ``</think>`` and the answer part)."""
    reasoning: str
    content: str
    answer: list[str] | None
    prompt_tokens: int
    generated_tokens: int
    stopped: bool
    """Ended by the end token; False when the budget ran out (reasoning mode: the answer was forced)."""


class TextPieces:
    """The text of a stream of token ids, a piece as it becomes final: the ``tokenizers`` library's incremental
    decoder (``DecodeStream``) holds back only a character still split across byte-level tokens. Special tokens are
    left out.

    Why not transformers' ``TextStreamer``: it decodes everything since the last line break again for every token.
    Measured on the development CPU with R1-Distill's tokenizer: 57 µs a token over 512 random tokens and 19 over
    870 tokens of Chinese text, against 2.1 and 1.3 here; in `serve` that work holds the interpreter lock that the
    engine's loop needs between its steps (issue 27). A tokenizer without a ``tokenizers`` backend (a slow one)
    decodes the whole stream each time instead."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.backend = tokenizer.backend_tokenizer if getattr(tokenizer, "is_fast", False) else None
        self.stream = DecodeStream(skip_special_tokens=True)
        self.ids: list[int] = []
        self.shown = 0

    def put(self, token: int) -> str:
        """The text that ``token`` makes final ('' while a character is incomplete)."""
        if self.backend is not None:
            return self.stream.step(self.backend, token) or ""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        piece, self.shown = text[self.shown:], len(text)
        return piece


# Models the engine cannot run go through transformers' generate, one request at a time.
HF_GENERATE_LOCK = threading.Lock()

# What a generation asked not to wait (``wait=False``) yields where it would wait for its next token: its caller
# drives other generations and comes back once the engine tells the request's listeners (serve's pump).
IDLE = ("idle", None)


class SharedSamples:
    """The ``n`` choices of one request (``serve``'s ``n``) as ONE engine request of ``n`` samples: one prefill, and
    sample i seeded by (seed, key, i), the engine's one seed rule. The first choice to reach the engine submits it,
    each streams its own sample (``stream_tokens(shared=..., index=i)``), and the request is cancelled only once every
    choice has let go of it (finished, stopped by a stop string, or its client gone)."""

    def __init__(self, n: int) -> None:
        self.n, self.lock = n, threading.Lock()
        self.runner: Any = None
        self.request: Any = None
        self.left: set[int] = set()

    def join(self, runner, ids: list[int], params, key: str | None, stream: bool):
        with self.lock:
            if self.request is None:
                self.runner = runner
                self.request = runner.submit(ids, dataclasses.replace(params, n=self.n), key=key, stream=stream)
            return self.request

    def leave(self, index: int) -> None:
        with self.lock:
            self.left.add(index)
            last = len(self.left) == self.n and self.request is not None
        if last:
            self.runner.cancel(self.request)

    def handle(self, index: int) -> SampleHandle:
        return SampleHandle(self, index)


@dataclass
class SampleHandle:
    """What ``on_request`` gets for a shared request in place of the engine: its ``cancel`` lets go of one choice."""

    shared: SharedSamples
    index: int

    def cancel(self, request) -> None:
        self.shared.leave(self.index)


def stream_tokens(engine: LoadedModel, ids: list[int], budget: int, gcfg: GenerationConfig, stream: bool = True,
                  top_logprobs: int = 0, key: str | None = None, on_request: Callable[[Any, Any], None] | None = None,
                  prompt_logprobs: int | None = None, forced: dict[str, Any] | None = None,
                  shared: SharedSamples | None = None, index: int = 0,
                  wait: bool = True) -> Generator[tuple[int, float, list] | None, None, Generated]:
    """Yield (token, log-probability, likeliest tokens of its step) of one generation as its tokens arrive (with
    ``stream``; else none); return its Generated. Closing the generator early cancels the request (its engine row is
    freed); so does ``engine.cancel(request)`` from another thread, given the two by ``on_request(engine, request)``
    once it is queued. Models the engine cannot run go through transformers' generate, one request at a time, and
    yield nothing. ``prompt_logprobs``: the request computes its prompt's log-probabilities (``request.prompt_logprobs``
    once its first token has come). ``forced``: reasoning mode's forced answer (``generation.forced_answer``); the
    Generated is then of all the sample's tokens, the closing not among them (``_generate`` assembles the text).
    ``shared``: this is choice ``index`` of a request shared by several (``SharedSamples``); ``on_request`` then gets
    the choice's handle in place of the engine. Not ``wait``: yields None where it would wait for a token (on the
    engine's background loop, ``GenerationEngine.stream``)."""
    model, tokenizer = engine.model, engine.tokenizer
    if not uses_engine(model, gcfg):
        with HF_GENERATE_LOCK:  # one model, several request threads (serve)
            return hf_generate(model, tokenizer, [tokenizer.decode(ids)], budget, gcfg)[0]
    params = dataclasses.replace(sampling_params(gcfg, budget), top_logprobs=top_logprobs,
                                 prompt_logprobs=prompt_logprobs, **(forced or {}))
    assert engine.engines is not None
    runner = engine.generator or engine.engines.get(model, 1, len(ids) + params.row_tokens)
    if shared is None:
        request = runner.submit(ids, params, key=key, stream=stream)
        if on_request is not None:
            on_request(runner, request)
    else:
        request = shared.join(runner, ids, params, key, stream)
        if on_request is not None:
            on_request(shared.handle(index), request)
    sample = request.samples[index]
    try:
        i = 0
        for item in runner.stream(request, sample=index, cancel_on_close=shared is None, wait=wait):
            if item is None:
                yield None
                continue
            if stream:
                yield item[1], item[2], sample.top_logprobs[i] if top_logprobs else []
            i += 1
    finally:
        if shared is not None:
            shared.leave(index)
    return generated(tokenizer, sample.tokens, sample.logprobs)


def _generate(engine: LoadedModel, ids: list[int], budget: int, gcfg: GenerationConfig, splitter: ThinkSplitter,
              stream: bool, tokens: bool = False, top_logprobs: int = 0, on_request=None, reserve: int = 0,
              shared: SharedSamples | None = None, index: int = 0, key: str | None = None, wait: bool = True):
    """Yield text events of the generation that continues the prompt ``ids`` as its tokens arrive (and, with
    ``tokens``, a ("token", (id, log-probability, likeliest tokens)) event for each); return its Generated. ``reserve`` > 0: reasoning mode's
    forced answer on the engine (a trace cut off by ``budget`` is closed on its row and answered in ``reserve`` more
    tokens; the closing's text is streamed as the model's, it has no token events). ``shared``, ``index``,
    ``key``: as in ``stream_tokens``; not ``wait``: ``IDLE`` where it would wait."""
    tokenizer = engine.tokenizer
    if not uses_engine(engine.model, gcfg):
        result = yield from stream_tokens(engine, ids, budget, gcfg)
        yield from splitter.feed(result.text)
        return result
    requests: list = []

    def remember(runner, request) -> None:
        requests.append(request)
        if on_request is not None:
            on_request(runner, request)

    forced = forced_answer(tokenizer, engine.prompt_format, reserve) if reserve else None
    pieces = TextPieces(tokenizer)
    eos = tokenizer.eos_token_id  # once: transformers looks it up by name each time (~2.5 µs a token)
    shown, count, trace = "", 0, None
    tokens_of = stream_tokens(engine, ids, budget, gcfg, stream=stream, top_logprobs=top_logprobs,
                              on_request=remember, forced=forced, shared=shared, index=index, key=key, wait=wait)
    try:
        while True:
            try:
                item = next(tokens_of)
            except StopIteration as done:
                result = done.value
                break
            if item is None:
                yield IDLE
                continue
            token, logprob, top = item
            if trace is None and requests[0].samples[index].forced_at == count:  # the answer's first token
                trace = yield from _close_trace(tokenizer, requests[0].samples[index], shown, splitter,
                                                engine.prompt_format)
                pieces, shown = TextPieces(tokenizer), ""
            count += 1
            if tokens:
                yield "token", (token, logprob, top)
            if token == eos:
                continue
            piece = pieces.put(token)
            if piece:
                shown += piece
                yield from splitter.feed(piece)
    finally:
        tokens_of.close()
    sample = requests[0].samples[index] if requests else None
    if sample is None or sample.forced_at is None:
        if result.text.startswith(shown):
            yield from splitter.feed(result.text[len(shown):])
        return result
    if trace is None:  # nothing streamed
        trace = yield from _close_trace(tokenizer, sample, shown, splitter, engine.prompt_format)
        shown = ""
    answer = generated(tokenizer, sample.tokens[sample.forced_at:])
    if answer.text.startswith(shown):
        yield from splitter.feed(answer.text[len(shown):])
    return Generated(trace.text + closing_text(trace.text, engine.prompt_format) + answer.text,
                     trace.tokens + answer.tokens, False, sample.tokens, sample.logprobs)


def _close_trace(tokenizer, sample, shown: str, splitter: ThinkSplitter, prompt_format: str):
    """The text events that end a forced sample's trace (what is left of it after ``shown``, then the closing the
    engine appended); returns the trace's Generated."""
    trace = generated(tokenizer, sample.tokens[: sample.forced_at])
    if trace.text.startswith(shown):
        yield from splitter.feed(trace.text[len(shown):])
    yield from splitter.feed(closing_text(trace.text, prompt_format))
    return trace


def generate_events(engine: LoadedModel, record: Record, mode: str = "direct", max_new_tokens: int | None = None,
                    gcfg: GenerationConfig | None = None, stream: bool = True, tokens: bool = False,
                    top_logprobs: int = 0, on_request=None, shared: SharedSamples | None = None,
                    index: int = 0, key: str | None = None, wait: bool = True,
                    prompt_ids: list[int] | None = None) -> Generator[tuple[str, Any], None, None]:
    """Yield ("reasoning", text) and ("content", text) as the model writes, then ("done", Answer). With ``tokens``,
    also ("token", (id, log-probability, its step's ``top_logprobs`` likeliest tokens)) for every generated token
    (the text a forced answer's closing adds has none).

    ``max_new_tokens`` (else the engine's, else the mode's default) caps every generated token, a forced
    answer's included. Closing the iterator early stops the generation; ``on_request``, ``shared``, ``index`` and
    ``key`` (the request's name for its samples' seeds; default: its prompt) are as in ``stream_tokens``. Not
    ``wait``: yields ``IDLE`` where it would wait for the engine (serve's pump drives many from one thread).
    ``prompt_ids``: the record's prompt in this mode, tokenized, where the caller has it (serve checks its length
    first): not rendered and tokenized again."""
    if mode not in INFER_MODES:
        raise UsageError(f"mode: {mode!r} is not one of {', '.join(INFER_MODES)}")
    gcfg = gcfg or engine.gcfg
    think = mode == "reasoning"
    budget = default_budget(mode, max_new_tokens or gcfg.max_new_tokens)
    budget, reserve = split_budget(budget) if think else (budget, 0)
    tokenizer = engine.tokenizer
    if prompt_ids is None:
        prompt_ids = tokenizer(prompt_text(engine, record, think), add_special_tokens=False)["input_ids"]
    splitter = ThinkSplitter(reasoning=think)
    continued = think and uses_engine(engine.model, gcfg)  # the forced answer continues the sample's row
    first = yield from _generate(engine, prompt_ids, budget, gcfg, splitter, stream, tokens, top_logprobs,
                                 on_request, reserve=reserve if continued else 0, shared=shared, index=index,
                                 key=key, wait=wait)
    output, n_tokens, stopped = first.text, first.tokens, first.stopped
    if think and not stopped and reserve and not continued:
        # Out of budget: close the trace and ask for the answer, by the rule `lawtune eval` uses.
        closing = closing_text(first.text, engine.prompt_format)
        yield from splitter.feed(closing)
        asked = tokenizer(prompt_text(engine, record, think) + first.text + closing, add_special_tokens=False)
        more = yield from _generate(engine, asked["input_ids"], reserve, gcfg, splitter, stream, tokens,
                                    top_logprobs, on_request, wait=wait)
        output, n_tokens = first.text + closing + more.text, n_tokens + more.tokens
    yield from splitter.flush()
    # Split as the stream was: reasoning up to the first </think>; the letters are read after the last one.
    reasoning, _, content = output.partition(CLOSE) if think else ("", "", output)
    reasoning, content = reasoning.strip(), content.strip()
    letters = "".join(record.options)
    pred = extract_answer(answer_part(output), letters) if letters else None
    yield "done", Answer(output, reasoning, content, pred, len(prompt_ids), n_tokens, stopped)


def prompt_text(engine: LoadedModel, record: Record, think: bool) -> str:
    """What ``generate_events`` gives the model for ``record`` (``think``: reasoning mode)."""
    return render_prompt(record, engine.tokenizer, engine.prompt_format, think=think)


def ask(engine: LoadedModel, record: Record, mode: str = "direct", max_new_tokens: int | None = None, out=None) -> Answer:
    """Stream the reasoning to ``out`` as it is written, then print the answer line (last line of output)."""
    import sys

    out = out or sys.stdout
    content_parts: list[str] = []
    last = "\n"
    result: Answer | None = None
    for kind, value in generate_events(engine, record, mode, max_new_tokens):
        if kind == "reasoning":
            out.write(value)
            out.flush()
            last = value[-1]
        elif kind == "content":
            content_parts.append(value)
        else:
            result = value
    assert result is not None, "generate_events ends with its ('done', Answer) event"
    if last != "\n":
        out.write("\n")
    content = own_words("".join(content_parts))
    if content:
        out.write(content + "\n")
    out.write(answer_line(result.answer) + "\n")
    out.flush()
    return result


def own_words(content: str) -> str:
    """The model's own words after thinking, without its own answer line: the letters are printed once, as read (a
    raw 答案：ABCD on a two-option question is 答案：AB)."""
    return "\n".join(x for x in content.strip().splitlines() if not x.strip().startswith(ANSWER_PREFIX)).strip()


# ----------------------------------------------------------------------------- voted answers


@dataclass
class Voted:
    """K sampled answers of one question voted into one by eval's maj@K rule (``scoring.majority``)."""

    answer: list[str] | None
    """The majority answer set; None when no sample could be read."""
    output: str
    """The output of the first sample that gave the majority answer (the first sample's when none could be read)."""
    forced: bool
    """That sample's answer was forced (its reasoning ran out of budget)."""
    agreement: float
    """The share of the K samples that gave the majority answer."""
    samples: list[list[str] | None]
    """Every sample's answer, in sample order (None = unreadable)."""


def vote_rows(rows: list[dict]) -> Voted:
    """One question's K rows of ``evaluate.answer_batch`` (``pred``, ``output``, ``forced``) as its voted answer."""
    preds = [row["pred"] for row in rows]
    index, agreement = majority(preds)
    best = rows[index if index is not None else 0]
    return Voted(best["pred"] if index is not None else None, best["output"], bool(best.get("forced")), agreement,
                 preds)


def sampled(gcfg: GenerationConfig, samples: int) -> GenerationConfig:
    """The generation settings of ``samples`` answers a question: more than one are sampled (eval's --samples)."""
    return replace_config(gcfg, do_sample=True) if samples > 1 else gcfg


def answer_voted(engine: LoadedModel, records: list[Record], mode: str, samples: int,
                 slots: int | None = None) -> list[Voted]:
    """``samples`` sampled answers of every record (one engine request each: one prefill, sample i seeded by
    (generation.seed, the record's id, i), as in ``eval --samples``), voted."""
    rows = answer_batch(mode, engine.model, engine.tokenizer, records, engine.prompt_format,
                        sampled(engine.gcfg, samples), slots=slots or samples, engines=engine.engines, n=samples)
    return [vote_rows(rows[i * samples: (i + 1) * samples]) for i in range(len(records))]


def ask_voted(engine: LoadedModel, record: Record, mode: str, samples: int, out=None) -> Voted:
    """``ask --samples K``: the majority sample's reasoning and words, a line with every sample's answer and the
    agreement, then the voted answer line (last line of output). Nothing is streamed: the vote needs all K."""
    import sys

    out = out or sys.stdout
    voted = answer_voted(engine, [record], mode, samples)[0]
    reasoning, _, content = voted.output.partition(CLOSE) if mode == "reasoning" else ("", "", voted.output)
    for text in (reasoning.strip(), own_words(content)):
        if text:
            out.write(text + "\n")
    answers = ", ".join("".join(sorted(set(a))) if a else "?" for a in voted.samples)
    out.write(f"voted over {samples} samples ({answers}): agreement {voted.agreement:.2f}\n")
    out.write(answer_line(voted.answer) + "\n")
    out.flush()
    return voted


# ----------------------------------------------------------------------------- predict


def done_ids(output: Path) -> set[str]:
    """Ids already in a predictions file; a torn last line (a crash while writing) is cut off."""
    if not output.is_file():
        return set()
    raw = output.read_bytes()
    lines = raw.split(b"\n")
    done: set[str] = set()
    keep = 0  # bytes of whole, valid lines
    for number, line in enumerate(lines, start=1):
        last = number == len(lines)
        if line.strip():
            try:
                done.add(str(json.loads(line)["id"]))
            except (ValueError, KeyError, TypeError):
                if last:  # a line cut off by a crash: drop it, its record is generated again
                    log.warning("%s: dropping an unfinished last line", output)
                    break
                raise DataError([f"{output}:{number}: not a predictions line (JSON with an 'id')"]) from None
        keep += len(line) + (0 if last else 1)
    if keep != len(raw) or not raw.endswith(b"\n"):
        with open(output, "r+b") as fh:
            fh.truncate(keep)
            if keep and not raw[:keep].endswith(b"\n"):
                fh.seek(keep)
                fh.write(b"\n")
    return done
