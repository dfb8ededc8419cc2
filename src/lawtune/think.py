"""The think block of R1-style reasoning: its tags and the one set of rules that reads it.

A reasoning completion is the think text, ``</think>``, then the answer. The rules, used everywhere lawtune reads
a completion (scoring, eval, ask/serve, distill, RL rewards):

* The answer is the text after the LAST ``</think>`` (``answer_part``): the reasoning mentions, and rejects,
  option letters, and a model may close its block more than once. R1-Distill's chat template keeps the same
  part of an assistant turn (``content.split('</think>')[-1]``). A text without ``</think>`` is all answer part.
* The reasoning is the text before the FIRST ``</think>`` (``split``), which is what a stream shows as reasoning
  before the answer starts; with several, what lies between the first and the last is neither.
* A think block is closed when ``</think>`` occurs at all (``closed``).
* A trace cut off by its reasoning budget gets ``closing_text`` appended, so that the model writes its answer
  next (the forced answer of reasoning mode).

A leaf module: it imports nothing from lawtune.
"""

from __future__ import annotations

OPEN = "<think>"
CLOSE = "</think>"
# How a prompt opens the think block of the assistant turn (R1-Distill's generation prompt ends with it).
OPEN_LINE = OPEN + "\n"
# What closes the think block before the answer, per prompt format: the chat form mirrors what R1 models
# emit ("</think>\n\n"); the plain form is the original template's "\n</think>" plus a line break.
CLOSE_LINES = {"chat": "\n" + CLOSE + "\n\n", "plain": "\n" + CLOSE + "\n", "native": "\n" + CLOSE + "\n\n"}
# What starts the answer line; a forced answer is asked for with it.
ANSWER_PREFIX = "答案："


def closed(text: str) -> bool:
    """Whether the think block was closed (``</think>`` occurs anywhere in ``text``)."""
    return CLOSE in text


def answer_part(text: str) -> str:
    """The text after the last ``</think>``; all of ``text`` where there is none."""
    return text.rsplit(CLOSE, 1)[-1]


def split(text: str) -> tuple[str | None, str]:
    """(reasoning, answer part) of a completion: the reasoning is the text before the first ``</think>`` (None
    where the block was never closed), without leading white space and an opening ``<think>`` (a server may
    return the whole assistant turn); the answer part is ``answer_part(text)``. Neither is stripped."""
    if not closed(text):
        return None, text
    body = text.lstrip()
    if body.startswith(OPEN):
        body = body[len(OPEN):]
    return body.partition(CLOSE)[0], answer_part(text)


def closing_text(trace: str, prompt_format: str) -> str:
    """What is appended to a trace cut off by its budget, so that the model writes its answer next: the format's
    closing of the think block and ``答案：``, or only a new ``答案：`` line where the trace already closed it."""
    return "\n" + ANSWER_PREFIX if closed(trace) else CLOSE_LINES[prompt_format] + ANSWER_PREFIX
