"""Prompt rendering and tokenization: the one place that decides what the model sees.

Format decisions (documented here, where they are made):

* The DeepSeek-R1-Distill chat template keeps only the text after ``</think>`` in assistant turns
  and its generation prompt ends with ``<｜Assistant｜><think>\\n``. Rendering the answer through
  the template would therefore train on ``<｜Assistant｜>答案：B`` while inference sees
  ``<｜Assistant｜><think>\\n``. lawtune renders the *prompt* with the template
  (``add_generation_prompt=True``) and appends the rest of the assistant turn itself, so the
  training text is byte-for-byte what the model sees at inference.
* Without a worked ``reasoning`` the think block is empty (``<think>\\n\\n</think>\\n\\n``) and it is
  part of the prompt, so only ``答案：…`` and the end token carry loss. With ``reasoning`` the
  prompt ends at ``<think>\\n`` and the reasoning, ``</think>`` and the answer are trained.
* Prompt and target are tokenized separately and concatenated, so a BPE merge can never straddle
  the boundary between what is given and what is learned.
* eos == pad for this tokenizer, so the end token is appended by id and padding is masked by the
  attention mask and -100 labels, never by comparing token ids.
* Options are shown one per line as ``A. text``; the answer is written ``答案：`` followed by the
  sorted letters with no separator (``答案：ACD``), which is also what extraction reads first.
"""

from __future__ import annotations

from dataclasses import dataclass

from .data import Record
from .errors import UsageError
from .think import ANSWER_PREFIX, CLOSE_LINES, OPEN_LINE

# The user turn of the chat format. It says that several options may be correct, because about half
# of JEC-QA's knowledge questions have 2-4 correct answers.
CHAT_INSTRUCTION = (
    "你是一位精通中国法律的专家。请分析下面的法律选择题，本题可能有一个或多个正确选项。"
    "请选出全部正确选项，并在最后以“答案：”加选项字母的形式作答，例如“答案：B”或“答案：ACD”。"
)

# The original recipe's single-string template, verbatim (its checkpoints must still evaluate).
PLAIN_TEMPLATE = (
    "请你作为一位法律专家,分析下面的法律问题并给出你认为正确的答案。请先思考分析题目,然后从选项中选择一个最合适的答案。\n"
    "\n"
    "### 问题:\n"
    "{question}\n"
    "\n"
    "### 回应:\n"
    "<think>\n"
)

# The think block's tags (OPEN_LINE, CLOSE_LINES per format) and ANSWER_PREFIX are think.py's.


NATIVE_NEEDS = "prompt format native asks a LawBench file's own instruction and question"


def check_native(prompt_format: str | None, records: list[Record], source: str) -> None:
    """Refuse the native prompt format for questions not read from a LawBench file: checked before a model loads,
    so the mistake costs no loading time."""
    other = next((r for r in records if r.format != "lawbench"), None)
    if prompt_format == "native" and other is not None:
        raise UsageError(f"{source}: {NATIVE_NEEDS}; this file is {other.format} (use --prompt-format chat or plain)")


def format_question(record: Record) -> str:
    lines = [record.statement]
    lines += [f"{letter}. {text}" for letter, text in record.options.items()]
    return "\n".join(lines)


def answer_text(letters: list[str] | str) -> str:
    return ANSWER_PREFIX + "".join(sorted(set(letters)))


def chat_user_text(record: Record) -> str:
    """The user turn of the chat format: the instruction, then the question and its options."""
    return CHAT_INSTRUCTION + "\n\n" + format_question(record)


def _open_prompt(record: Record, tokenizer, prompt_format: str) -> str:
    """The prompt up to and including the opening ``<think>\\n`` of the assistant turn."""
    question = format_question(record)
    if prompt_format == "native":
        # LawBench's protocol: the file's own instruction and question are the user turn, in the chat template
        if record.format != "lawbench":
            raise UsageError(f"{record.where or record.id}: {NATIVE_NEEDS}; this record is {record.format}")
        user = record.extra["instruction"] + "\n" + record.extra["question"]
        text = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
        return text if text.endswith(OPEN_LINE) else text + OPEN_LINE
    if prompt_format == "plain":
        return (tokenizer.bos_token or "") + PLAIN_TEMPLATE.format(question=question)
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError("prompt_format 'chat' needs a tokenizer with a chat template; use data.prompt_format=plain")
    messages = [{"role": "user", "content": chat_user_text(record)}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # R1-Distill's template already opens the think block; a template that does not gets it here, so
    # every model is trained and queried with the same assistant prefix.
    if not text.endswith(OPEN_LINE):
        text += OPEN_LINE
    return text


def render_prompt(record: Record, tokenizer, prompt_format: str = "chat", think: bool = False) -> str:
    """What the model is given. think=False closes an empty think block (direct answering)."""
    text = _open_prompt(record, tokenizer, prompt_format)
    return text if think else text + CLOSE_LINES[prompt_format]


def render_target(record: Record, prompt_format: str = "chat") -> str:
    """What the model learns to write (without the end token)."""
    if record.answer is None:
        raise UsageError(f"{record.where or record.id}: no answer to train on")
    if record.reasoning:
        return record.reasoning + CLOSE_LINES[prompt_format] + answer_text(record.answer)
    return answer_text(record.answer)


def render_example(record: Record, tokenizer, prompt_format: str = "chat") -> tuple[str, str]:
    """(prompt, target) pair used for training: a record with reasoning trains the think block too."""
    return render_prompt(record, tokenizer, prompt_format, think=bool(record.reasoning)), render_target(
        record, prompt_format
    )


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def _encode(text: str, tokenizer) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_example(record: Record, tokenizer, prompt_format: str, max_length: int) -> Encoded | None:
    """Token ids and labels (-100 on the prompt). Over-long examples are cut inside the statement.

    Returns None when even an empty statement would not fit (options alone exceed max_length).
    """
    target_ids = _encode(render_target(record, prompt_format), tokenizer) + [tokenizer.eos_token_id]
    prompt_ids = _encode(render_example(record, tokenizer, prompt_format)[0], tokenizer)
    truncated = False
    statement_ids: list[int] | None = None
    keep = 0
    # Cutting text changes tokenization at the cut, so re-render and re-check; a few rounds converge.
    for _ in range(8):
        excess = len(prompt_ids) + len(target_ids) - max_length
        if excess <= 0:
            break
        if statement_ids is None:
            statement_ids = _encode(record.statement, tokenizer)
            keep = len(statement_ids)
        keep -= excess + 2  # the "……" marker costs a token or two
        if keep <= 0:
            return None
        truncated = True
        cut = tokenizer.decode(statement_ids[:keep]).rstrip("\ufffd")  # drop a half-decoded character
        work = Record(**{**record.__dict__, "statement": cut + "……"})
        prompt_ids = _encode(render_example(work, tokenizer, prompt_format)[0], tokenizer)
    else:
        return None
    return Encoded(prompt_ids + target_ids, [-100] * len(prompt_ids) + target_ids, truncated)


def encode_records(records: list[Record], tokenizer, prompt_format: str, max_length: int) -> tuple[list[dict], dict]:
    """Encode a list; returns features for the Trainer and counts of truncated / dropped examples."""
    features, truncated, dropped = [], 0, []
    for record in records:
        enc = encode_example(record, tokenizer, prompt_format, max_length)
        if enc is None:
            dropped.append(record.where or record.id)
            continue
        truncated += enc.truncated
        features.append({"input_ids": enc.input_ids, "labels": enc.labels, "attention_mask": [1] * len(enc.input_ids)})
    return features, {"truncated": truncated, "dropped_too_long": len(dropped), "dropped_where": dropped[:20]}
