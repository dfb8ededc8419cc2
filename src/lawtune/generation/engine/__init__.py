"""lawtune's generation engine: continuous batching on a static KV cache, greedy and sampled decoding, streaming.

Its parts, each with the why of its own design in its docstring:

* ``sequence.py``: what is asked (``SamplingParams``, ``Request``), what comes back (``Sample``), and the state of
  one sample in its row (``Sequence``); the seed rule (``sample_seed``).
* ``cache.py``: the KV cache, a row per sequence (``SlotCache``).
* ``scheduler.py``: the waiting queue, admission into free rows, cancelling, the token budget and preemption.
* ``runner.py``: the model's forward passes (prefill, a forced answer's closing, the decoding step) and the CUDA
  graphs the step replays from (``ModelRunner``, ``DeviceRows``); which models the engine runs (``engine_supported``).
* ``sampler.py``: the next token of every row, greedy or sampled, on the device (``choose_tokens``).
* ``readback.py``: what the rows made, read back behind the GPU into the samples; a forced answer on its row.
* ``loop.py``: ``GenerationEngine`` itself: submit, step (schedule, run, read back), stream, generate, the
  background thread, close.
"""

from .cache import SlotCache
from .loop import GenerationEngine
from .readback import CHECK_EVERY, LOOK_LAG, Look, ReadBack
from .runner import MIN_COLUMNS, DeviceRows, ModelRunner, base_model, cache_keyword, engine_supported
from .sampler import choose_tokens, uniform_noise
from .scheduler import ADMIT_FRACTION, ADMIT_WAIT, Scheduler
from .sequence import MAX_STOP_TOKENS, Request, Sample, SamplingParams, Sequence, sample_seed

__all__ = [
    "ADMIT_FRACTION", "ADMIT_WAIT", "CHECK_EVERY", "LOOK_LAG", "MAX_STOP_TOKENS", "MIN_COLUMNS", "DeviceRows",
    "GenerationEngine", "Look", "ModelRunner", "ReadBack", "Request", "Sample", "SamplingParams", "Scheduler", "Sequence",
    "SlotCache", "base_model", "cache_keyword", "choose_tokens", "engine_supported", "sample_seed", "uniform_noise",
]

# ----------------------------------------------------------------------------- one engine per model (until issue 29's
# second part: engines owned by their callers)

import weakref  # noqa: E402

import torch  # noqa: E402

_ENGINES: weakref.WeakKeyDictionary[torch.nn.Module, GenerationEngine] = weakref.WeakKeyDictionary()


def engine_for(model, eos_token_id: int, slots: int, max_len: int, use_graph: bool | None = None) -> GenerationEngine:
    """The model's engine, reused while it has these slots and at least ``max_len`` tokens a slot; else a new one."""
    max_len = -(-max_len // 256) * 256
    engine = _ENGINES.get(model)
    if (engine is not None and engine.slots == slots and engine.max_len >= max_len and engine.eos == eos_token_id
            and (use_graph is None or engine.use_graph == use_graph) and engine.thread is None):
        return engine
    if engine is not None and engine.thread is None:
        del _ENGINES[model]
        engine.close()
    engine = GenerationEngine(model, eos_token_id, slots=slots, max_len=max_len, use_graph=use_graph)
    _ENGINES[model] = engine
    return engine
