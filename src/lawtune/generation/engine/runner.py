"""The model runner: the forward passes of the engine (a prefill of new rows, a forced answer's closing, one decoding
step of all rows) and, on a GPU, each decoding step replayed from a CUDA graph.

Why graphs (issue 16, one H200, the 1.5B architecture): an eager decoding step launches several hundred small
kernels from Python; transformers' ``generate`` streamed one question at 13 tokens/s. A replay launches the whole
step at once. Everything a step changes therefore lives in fixed tensors that the step itself advances
(``DeviceRows``: each row's token, visibility mask, sampling settings, step number, outputs); a free row computes on
stale data that nothing reads.

* **Only the rows in use.** A new sequence takes the lowest free row, and a step runs the rows up to the highest
  one in use, rounded up to a power of two (one graph per such width): one stream in a server of 32 slots costs
  one row's step, not 32 (issue 16: 92 tokens/s for one client of a 32-slot server before this).
* **Only the columns in use.** A step attends the cache columns up to the furthest position a running row writes
  in it, rounded up to a power of two (at least ``MIN_COLUMNS``; one graph per rows and columns), not the whole
  slot: attention over a one-row batch is latency-bound in its length (issue 16, one H200, one row of a
  32-slot server of 4,096 tokens a slot: 116 tokens/s over all 4,096 columns, 211 in a slot of 768). With the
  length-aware kernel below the window is the whole row: the kernel reads each row's own length.
* **Live weights.** The runner holds the model itself, never a copy: captured graphs point at its parameters,
  which optimizer steps update in place, so generation after a training step uses the new LoRA weights.

* **Fused and length-aware (issue 30).** On a GPU the step runs the decoder layer by layer through one compiled
  layer function (``torch.compile``, dynamic shapes: one compilation serves all layers and widths, seconds instead
  of the minutes a whole-model compile takes; the model's modules stay as they are) and compiles the sampler; the
  element-wise work of a layer (norms, rotary embedding, activations, residuals) fuses into a few kernels inside
  the recorded graph. Attention reads each row's own length with ``decode_attention``'s kernel instead of the
  widest row's window. ``compile_step`` and ``attention_kernel`` switch them (bench/generation.py measures both).

* **Layers that training compiled** (``train.compile``, ``grpo.compile``; in-training evaluation, and GRPO's
  rollouts with ``grpo.fold_adapter=false``, run on the live model) run eagerly in the passes above that run the
  decoder as it is (prefill, a forced answer's closing, the uncompiled step): their compilation is for training's
  shapes. The fused step traces through them into its own compilation, so it stays compiled (a process-wide "force
  eager" would have turned it off too).

On a CPU (or ``use_graph=False``) the same step runs eagerly: that is what the tests check against ``generate``.
Limits: sdpa-family attention and full attention in every layer (``engine_supported``).
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch

from ...model import base_model
from .. import decode_attention
from ..attention import FAST_ATTENTION, attention_implementation, eager_stance
from .cache import LayerSlots, SlotCache, cache_dtype
from .compiled import compiled, failure_reason
from .sampler import choose_tokens
from .sequence import MAX_STOP_TOKENS, Sequence

log = logging.getLogger("lawtune")

# The narrowest window of cache columns a decoding step attends (see "Only the columns in use").
MIN_COLUMNS = 256


def engine_supported(model) -> bool:
    """True where the engine reproduces transformers' greedy ``generate``: sdpa-family attention, every layer full
    attention (no sliding windows), a decoder-only model."""
    config = getattr(base_model(model), "config", None)
    if config is None or attention_implementation(model) not in ("sdpa", "flex_attention", FAST_ATTENTION):
        return False
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    return set(layer_types) == {"full_attention"} and not getattr(config, "is_encoder_decoder", False)


def cache_keyword(model) -> str:
    """transformers 5.24 renamed the forward's ``past_key_values`` to ``cache`` (the old name still warns)."""
    params = inspect.signature(base_model(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def layer_forward(layer, hidden: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, embeddings,
                  cache: LayerSlots, extra: dict, cache_kw: str) -> torch.Tensor:
    """One decoder layer of a decoding step (what ``torch.compile`` compiles once for every layer); ``extra``: the
    attention kernel's lengths and tuning."""
    out = layer(hidden, attention_mask=mask, position_ids=positions, position_embeddings=embeddings, use_cache=True,
                **{cache_kw: cache}, **extra)
    return out[0] if isinstance(out, tuple) else out


def layered(decoder) -> bool:
    """Whether the decoder can run layer by layer here (a Llama/Qwen-style model: embeddings, rotary embedding,
    layers, final norm)."""
    return all(hasattr(decoder, name) for name in ("embed_tokens", "rotary_emb", "layers", "norm"))


def power_of_two(n: int) -> int:
    """The smallest power of two >= n (n >= 1)."""
    return 1 << (n - 1).bit_length()


class DeviceRows:
    """The per-row tensors a decoding step reads and advances: the token fed next, which cache columns the row sees,
    its sampling settings and end rules, and what it made since the host last read it (its tokens, their
    log-probabilities, whether it still runs, how many tokens it had when it ended)."""

    def __init__(self, slots: int, max_len: int, top_logprobs: int, device) -> None:
        d, s = device, slots
        self.token = torch.zeros(s, dtype=torch.long, device=d)
        self.visible = torch.zeros(s, max_len, dtype=torch.bool, device=d)
        # Column 0 of a row that never held a sequence is visible too: a step's window of columns then never leaves
        # a free row with nothing to attend (a softmax of nothing is NaN, which would land in its cache).
        self.visible[:, 0] = True
        self.temperature = torch.zeros(s, device=d)
        self.top_p = torch.ones(s, device=d)
        self.top_k = torch.zeros(s, dtype=torch.long, device=d)
        self.seed = torch.zeros(s, dtype=torch.long, device=d)
        self.step_no = torch.zeros(s, dtype=torch.long, device=d)
        self.min_tokens = torch.zeros(s, dtype=torch.long, device=d)
        self.budget = torch.ones(s, dtype=torch.long, device=d)
        self.ignore_eos = torch.zeros(s, dtype=torch.bool, device=d)
        self.stop_ids = torch.full((s, MAX_STOP_TOKENS), -1, dtype=torch.long, device=d)
        self.out_tokens = torch.zeros(s, max_len, dtype=torch.long, device=d)
        self.out_logprobs = torch.zeros(s, max_len, device=d)
        # The likeliest tokens of every step (an engine made with top_logprobs only: a top-k over the vocabulary a
        # step, and what the host reads grows with it).
        self.out_top_ids = torch.zeros(s, max_len, top_logprobs, dtype=torch.long, device=d)
        self.out_top_logprobs = torch.zeros(s, max_len, top_logprobs, device=d)
        self.alive = torch.zeros(s, dtype=torch.bool, device=d)
        self.length = torch.zeros(s, dtype=torch.long, device=d)
        self.offsets = torch.arange(max_len, device=d)  # column offsets of a reading
        self.max_len = max_len

    def load(self, seq: Sequence, columns: int) -> None:
        """A sequence's settings into its row, whose cache holds its first ``columns`` columns."""
        slot, p = seq.slot, seq.params
        self.temperature[slot] = p.temperature
        self.top_p[slot] = p.top_p
        self.top_k[slot] = p.top_k
        self.seed[slot] = seq.sample.seed
        self.min_tokens[slot] = p.min_tokens
        self.budget[slot] = seq.budget
        self.ignore_eos[slot] = p.ignore_eos
        self.stop_ids[slot] = -1
        if p.stop_token_ids:
            self.stop_ids[slot, : len(p.stop_token_ids)] = torch.tensor(p.stop_token_ids)
        self.step_no[slot] = seq.delivered
        self.visible[slot] = False
        self.visible[slot, :columns] = True

    def ends(self, token: torch.Tensor, count: torch.Tensor, rows, eos: int) -> torch.Tensor:
        """Whether a row's ``count``-th token ``token`` ends it: an end or stop token (after ``min_tokens``), or the
        budget."""
        stops = ((token == eos) & ~self.ignore_eos[rows]) | (self.stop_ids[rows] == token[:, None]).any(-1)
        return (stops & (count >= self.min_tokens[rows])) | (count >= self.budget[rows])

    def reading(self, width: int, top: int, rows: int) -> torch.Tensor:
        """What the first ``rows`` rows made in the ``width`` columns before their step count, as one table (float64
        holds token ids and lengths exactly): tokens, log-probabilities, alive, length, and with ``top`` each column's
        likeliest tokens (ids, then log-probabilities). Only the rows in use: the host turns every cell into a Python
        number (256 rows took ~40 µs a reading on the development CPU, 32 rows ~4)."""
        columns = (self.step_no[:rows, None] - width + self.offsets[None, :width]).clamp(0, self.max_len - 1)
        parts = [self.out_tokens[:rows].gather(1, columns).double(), self.out_logprobs[:rows].gather(1, columns).double(),
                 self.alive[:rows, None].double(), self.length[:rows, None].double()]
        if top:
            where = columns[:, :, None].expand(-1, -1, top)
            parts += [self.out_top_ids[:rows].gather(1, where).flatten(1).double(),
                      self.out_top_logprobs[:rows].gather(1, where).flatten(1).double()]
        return torch.cat(parts, dim=1)


class ModelRunner:
    """The model's forward passes on the slot cache, and the decoding step's graphs (see the module docstring)."""

    def __init__(self, model, eos_token_id: int, slots: int, max_len: int, use_graph: bool | None,
                 top_logprobs: int, compile_step: bool | None = None, attention_kernel: bool | None = None) -> None:
        self.model = model
        base = base_model(model)
        config = base.config
        self.decoder, self.head = base.get_decoder(), base.get_output_embeddings()
        self.cache_kw = cache_keyword(model)
        weight = base.get_input_embeddings().weight
        self.device = weight.device
        self.use_graph = self.device.type == "cuda" if use_graph is None else use_graph
        self.slots, self.max_len, self.eos, self.top = slots, max_len, eos_token_id, top_logprobs
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        dtype = cache_dtype(weight)
        self.cache = SlotCache(config.num_hidden_layers, slots, max_len, getattr(config, "num_key_value_heads", heads),
                               head_dim, dtype, self.device)
        self.rows = DeviceRows(slots, max_len, top_logprobs, self.device)
        # The fused step and the length-aware attention (module docstring): on by default where graphs run.
        gpu = self.use_graph and self.device.type == "cuda"
        self.compile_step = (gpu and decode_attention.available() if compile_step is None else compile_step) \
            and layered(self.decoder)
        kernel_ok = (self.device.type == "cuda" and decode_attention.available()
                     and decode_attention.supports(head_dim, max_len))
        self.attention_kernel = kernel_ok if attention_kernel is None else attention_kernel and kernel_ok
        # By (sampling, rows, columns, top): a step that keeps the likeliest tokens is a graph of its own, recorded when
        # first needed (capture_graphs records the others), so steps that need none never pay for them.
        self.graphs: dict[tuple[bool, int, int, bool], torch.cuda.CUDAGraph] = {}
        self.warm: set[tuple[bool, int, int, bool]] = set()
        self.pool: Any = None  # one memory pool for all graphs (they never run at the same time); torch's handle
        # The stream graph warm-ups run on: one for all of them (each stream of torch's pool would keep a cuBLAS
        # workspace of its own)
        self.side: torch.cuda.Stream | None = None

    # -- prefill: new rows, and a forced answer's closing on a live row

    def prefill(self, contexts: list[list[int]], rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token lists into rows from column 0, right-padded in one forward. Returns the hidden states (rows, width,
        hidden) and the float logits of each list's last position."""
        d = self.device
        lengths = [len(c) for c in contexts]
        width = max(lengths)
        ids = torch.zeros(len(contexts), width, dtype=torch.long)
        for i, c in enumerate(contexts):
            ids[i, : lengths[i]] = torch.tensor(c)
        ids = ids.to(d)
        positions = torch.arange(width, device=d).expand(len(contexts), width)
        # Right padding: a real token never sees a pad (pads come after it), so plain causal attention is exact.
        causal = torch.ones(width, width, dtype=torch.bool, device=d).tril()[None, None]
        self.cache.prefill_rows = torch.tensor(rows, device=d)
        try:
            with eager_stance(self.model):
                hidden = self.decoder(input_ids=ids, attention_mask={"full_attention": causal}, position_ids=positions,
                                      use_cache=True, **{self.cache_kw: self.cache}).last_hidden_state
        finally:
            self.cache.prefill_rows = None
        last = hidden[torch.arange(len(contexts), device=d), torch.tensor(lengths, device=d) - 1]
        return hidden, self.head(last).float()

    def extend(self, slots: list[int], chunks: list[list[int]], at: list[int]) -> torch.Tensor:
        """Each chunk (all of one length) into its row from the row's column ``at`` (its cache holds the columns
        before), attending those columns and the chunk causally; the float logits of each chunk's last token (a
        forced answer's next token)."""
        d, n = self.device, len(chunks[0])
        for slot, start in zip(slots, at):
            self.rows.visible[slot, start:] = False
            self.rows.visible[slot, start: start + n] = True
        columns = max(at) + n
        positions = torch.tensor(at, device=d)[:, None] + torch.arange(n, device=d)  # (rows, n)
        causal = torch.arange(columns, device=d)[None, None, :] <= positions[:, :, None]  # (rows, n, columns)
        index = torch.tensor(slots, device=d)
        mask = (self.rows.visible[index, :columns][:, None, :] & causal)[:, None]
        self.cache.prefill_rows, self.cache.prefill_at = index, positions[:, :1]
        self.cache.prefill_columns = columns
        try:
            with eager_stance(self.model):
                hidden = self.decoder(input_ids=torch.tensor(chunks, device=d),
                                      attention_mask={"full_attention": mask}, position_ids=positions, use_cache=True,
                                      **{self.cache_kw: self.cache}).last_hidden_state
        finally:
            self.cache.prefill_rows, self.cache.prefill_at, self.cache.prefill_columns = None, None, 0
        return self.head(hidden[:, -1]).float()

    def load(self, seq: Sequence, columns: int) -> None:
        """A sequence's settings into its row, whose cache holds its first ``columns`` columns."""
        self.rows.load(seq, columns)
        self.cache.write_at[seq.slot] = columns

    def start(self, seqs: list[Sequence], logits: torch.Tensor, sampling: bool,
              top: bool) -> tuple[list[int], list[float], list[bool], list]:
        """Each sequence's next token from its prefill's ``logits`` (one row each), into its (loaded) row: the
        token fed next, its output column, whether it ended. Returns them as host lists, with the likeliest tokens
        where ``top``."""
        r, d = self.rows, self.device
        index = torch.tensor([s.slot for s in seqs], device=d)
        step_no = r.step_no[index]
        token, logprob = choose_tokens(logits, r.temperature[index], r.top_p[index], r.top_k[index], r.seed[index],
                                       step_no, step_no < r.min_tokens[index], self.eos, sampling)
        r.token[index] = token
        r.out_tokens[index, step_no] = token
        r.out_logprobs[index, step_no] = logprob
        tops: list = [None] * len(seqs)
        if top:
            likeliest = torch.log_softmax(logits, dim=-1).topk(self.top)
            r.out_top_ids[index, step_no], r.out_top_logprobs[index, step_no] = likeliest.indices, likeliest.values
            tops = [[list(zip(i, v))] for i, v in zip(likeliest.indices.tolist(), likeliest.values.tolist())]
        step_no = step_no + 1
        r.step_no[index] = step_no
        ended = r.ends(token, step_no, index, self.eos)
        r.alive[index] = ~ended
        r.length[index] = step_no
        return token.tolist(), logprob.tolist(), ended.tolist(), tops

    def prompt_logprobs(self, hidden: torch.Tensor, targets: list[int],
                        k: int) -> list[tuple[float, list[tuple[int, float]]]]:
        """Each prompt token's log-probability given the ones before it (from the prefill's ``hidden`` states), with
        the ``k`` likeliest tokens at its position; a chunk of positions at a time, so a long prompt never holds its
        whole vocabulary-wide logits at once."""
        out: list[tuple[float, list[tuple[int, float]]]] = []
        for start in range(0, len(targets), 512):
            logprobs = torch.log_softmax(self.head(hidden[start: start + 512]).float(), dim=-1)
            chunk = torch.tensor(targets[start: start + 512], device=logprobs.device)
            chosen = logprobs.gather(1, chunk[:, None])[:, 0].tolist()
            if k:
                top = logprobs.topk(k)
                alternatives = [list(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())]
            else:
                alternatives = [[] for _ in chosen]
            out.extend(zip(chosen, alternatives))
        return out

    # -- decoding

    def decode_step(self, sampling: bool, rows: int, columns: int, top: bool) -> None:
        """One token for each of the first ``rows`` rows, attending their first ``columns`` columns, on fixed tensors
        only (what a CUDA graph records)."""
        t, r = self.rows, slice(0, rows)
        write_at = self.cache.write_at[r]
        t.visible[r].scatter_(1, write_at[:, None], True)
        mask = t.visible[r, None, None, :columns]
        extra = {}
        if self.attention_kernel:  # a running row sees its columns up to the one it writes; any other row one column
            extra = {"decode_lengths": torch.where(t.alive[r], write_at + 1, 1).clamp(max=columns),
                     "decode_tuning": decode_attention.tuning(rows)}
        if self.compile_step:
            hidden = self.layered_step(t.token[r, None], mask, write_at[:, None], extra)
        else:
            self.cache.active, self.cache.columns = rows, columns
            try:
                with eager_stance(self.model):
                    hidden = self.decoder(input_ids=t.token[r, None], attention_mask={"full_attention": mask},
                                          position_ids=write_at[:, None], use_cache=True,
                                          **{self.cache_kw: self.cache}, **extra).last_hidden_state
            finally:
                self.cache.active, self.cache.columns = self.slots, self.max_len
        logits = self.head(hidden[:, -1]).float()
        step_no = t.step_no[r]
        token, logprob = choose_tokens(logits, t.temperature[r], t.top_p[r], t.top_k[r], t.seed[r], step_no,
                                       step_no < t.min_tokens[r], self.eos, sampling, fused=self.compile_step)
        column = step_no.clamp(max=self.max_len - 1)[:, None]  # an ended row's writes land past its end
        t.out_tokens[r].scatter_(1, column, token[:, None])
        t.out_logprobs[r].scatter_(1, column, logprob[:, None])
        if top:
            likeliest = torch.log_softmax(logits, dim=-1).topk(self.top)
            where = column[:, :, None].expand(-1, -1, self.top)
            t.out_top_ids[r].scatter_(1, where, likeliest.indices[:, None])
            t.out_top_logprobs[r].scatter_(1, where, likeliest.values[:, None])
        step_no.add_(1)
        alive = t.alive[r]
        t.length[r].copy_(torch.where(alive, step_no, t.length[r]))
        alive.logical_and_(~t.ends(token, step_no, r, self.eos))
        t.token[r].copy_(token)
        # A free row's column stops at the end; a running row never gets there (its budget fits in the slot).
        write_at.add_(1).clamp_(max=self.max_len - 1)

    def layered_step(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, extra: dict) -> torch.Tensor:
        """The decoder's forward of one token a row, layer by layer through the compiled ``layer_forward``."""
        decoder, cache = self.decoder, self.cache
        step = compiled("layer_forward", layer_forward)
        hidden = decoder.embed_tokens(ids)
        embeddings = decoder.rotary_emb(hidden, positions)
        for layer, keys, values in zip(decoder.layers, cache.keys, cache.values):
            view = LayerSlots(keys, values, cache.rows, cache.write_at, mask)
            hidden = step(layer, hidden, mask, positions, embeddings, view, extra, self.cache_kw)
        return decoder.norm(hidden)

    def width(self, needed: int) -> int:
        """Rows a step runs when row ``needed - 1`` is the highest in use: a power of two (few graphs)."""
        return min(self.slots, power_of_two(needed))

    def window(self, needed: int) -> int:
        """Columns a step attends when its furthest write is column ``needed - 1``: a power of two (few graphs). The
        length-aware kernel reads each row's own length whatever the window, so with it every step passes all
        columns: one graph per width of rows, not one per width of rows and of columns (7 times fewer recordings
        for the 512-request workload's rows of 2,560 tokens)."""
        if self.attention_kernel:
            return self.max_len
        return min(self.max_len, max(MIN_COLUMNS, power_of_two(needed)))

    def run_step(self, sampling: bool, rows: int, columns: int, top: bool = False) -> None:
        key = (sampling, rows, columns, top)
        if not self.use_graph:
            self.first_run(sampling, rows, columns, top)
        elif key in self.graphs:
            self.graphs[key].replay()
        elif key in self.warm:  # warmed up once: record the step (recording does not run it), then replay
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.decode_step(sampling, rows, columns, top)
            self.graphs[key] = graph
            graph.replay()
        else:  # capture needs one eager run on a side stream first
            side = self.side = self.side or torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self.first_run(sampling, rows, columns, top)
            torch.cuda.current_stream(self.device).wait_stream(side)
            self.warm.add(key)

    def first_run(self, sampling: bool, rows: int, columns: int, top: bool) -> None:
        """A step run eagerly, where the fused step's parts compile. A compilation that fails (a GPU or a torch build
        inductor cannot serve) leaves the step uncompiled from then on, logged once, and runs it again: what the
        failed run wrote before it failed (the visibility mask, the cache columns) is written again the same way."""
        try:
            self.decode_step(sampling, rows, columns, top)
        except Exception as exc:  # noqa: BLE001 - any failure of the compiler; the uncompiled step re-raises others
            if not self.compile_step:
                raise
            reason = failure_reason(exc)
            log.warning("generation engine: compiling the decoding step failed (%s); it runs uncompiled", reason)
            self.compile_step = False
            self.decode_step(sampling, rows, columns, top)

    def capture_graphs(self) -> int:
        """Record every step graph (each width of rows and of columns, greedy and sampling), on free rows only,
        whose state a prefill resets. Returns the graphs held."""
        widths = sorted({self.width(1 << k) for k in range(self.slots.bit_length() + 1)})
        windows = sorted({self.window(1 << k) for k in range(self.max_len.bit_length() + 1)})
        for sampling in (False, True):
            for rows in widths:
                for columns in windows:
                    while (sampling, rows, columns, False) not in self.graphs:
                        self.run_step(sampling, rows, columns, False)
        torch.cuda.synchronize(self.device)
        return len(self.graphs)

    def close(self) -> None:
        """Let go of the model, the cache, the row tensors and the graphs (with their memory pool)."""
        self.graphs.clear()
        self.warm.clear()
        self.pool = self.side = None
        self.cache.release()
        self.model = self.decoder = self.head = None
        self.rows = None  # type: ignore[assignment]
