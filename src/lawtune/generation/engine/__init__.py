"""lawtune's generation engine: continuous batching on a static KV cache, greedy and sampled decoding, streaming.

Its parts, each with the why of its own design in its docstring:

* ``sequence.py``: what is asked (``SamplingParams``, ``Request``), what comes back (``Sample``), and the state of
  one sample in its row (``Sequence``); the seed rule (``sample_seed``).
* ``cache.py``: the KV cache, a row per sequence (``SlotCache``).
* ``scheduler.py``: the waiting queue, admission into free rows, cancelling, the token budget and preemption.
* ``runner.py``: the model's forward passes (prefill, a forced answer's closing, the decoding step) and the CUDA
  graphs the step replays from (``ModelRunner``, ``DeviceRows``); which models the engine runs (``engine_supported``).
* ``sampler.py``: the next token of every row, greedy or sampled, on the device (``choose_tokens``);
  ``sampler_kernel.py``: its bisection for the rows one pass does not settle, a Triton program a row.
* ``readback.py``: what the rows made, read back behind the GPU into the samples; a forced answer on its row.
* ``loop.py``: ``GenerationEngine`` itself: submit, step (schedule, run, read back), stream, generate, the
  background thread, close; ``EngineHolder``, the engine of one owner, grown when a call needs more rows.

There is no engine cache: the command or trainer that generates makes its engine (or holder), passes it down, and
closes it, which gives the cache, the graphs and the model reference back.
"""

from .cache import SlotCache
from .loop import EngineHolder, GenerationEngine, budget_rows
from .readback import CHECK_EVERY, LOOK_LAG, Look, ReadBack
from .runner import MIN_COLUMNS, DeviceRows, ModelRunner, base_model, cache_keyword, engine_supported
from .sampler import choose_tokens, uniform_noise
from .scheduler import ADMIT_FRACTION, ADMIT_WAIT, Scheduler
from .sequence import MAX_STOP_TOKENS, Request, Sample, SamplingParams, Sequence, sample_seed

__all__ = [
    "ADMIT_FRACTION", "ADMIT_WAIT", "CHECK_EVERY", "LOOK_LAG", "MAX_STOP_TOKENS", "MIN_COLUMNS", "DeviceRows", "EngineHolder",
    "GenerationEngine", "Look", "ModelRunner", "ReadBack", "Request", "Sample", "SamplingParams", "Scheduler", "Sequence",
    "SlotCache", "base_model", "budget_rows", "cache_keyword", "choose_tokens", "engine_supported", "sample_seed", "uniform_noise",
]
