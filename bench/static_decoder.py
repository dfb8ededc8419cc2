"""Greedy decoding on a static KV cache, every step after the first replayed from one CUDA graph: the static-batch
decoder that lawtune's generation engine replaced, kept as the baseline of ``bench/generation.py``.

Why not ``model.generate``: each eager decoding step of the 1.5B model launches several hundred small
kernels (28 layers) from Python; on the H100 machine plain ``generate`` made 11-12 tokens/s for a single
question, ~85 ms a step for one row (bench/README.md, issue 3). transformers' own remedy, a static cache
under torch.compile's reduce-overhead mode, compiled for more than 300 s there. Capturing the eager step
costs one step instead, and a replay launches the whole step at once (measured: 1.17x the generated
tokens/s of lawtune's own generate path in reasoning mode, batch 512).

Everything a step changes lives in fixed tensors that the step itself advances (token, position, cache
slot, attention-mask column, output column), so the captured graph replays unchanged; the host only
checks every ``check_every`` steps whether all rows have ended. On the CPU, or with ``use_graph=False``,
the very same step runs eagerly, which is how the tests compare it with ``model.generate``.

Limits, those of the engine (``lawtune.generation.engine.engine_supported``): greedy decoding, sdpa-family
attention, and models whose layers all use full attention (no sliding windows).
"""

from __future__ import annotations

import torch

from lawtune.generation.engine import base_model, cache_keyword


@torch.inference_mode()
def greedy_decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                  eos_token_id: int, pad_token_id: int, use_graph: bool | None = None,
                  check_every: int = 16) -> torch.Tensor:
    """New tokens (rows, max_new_tokens) for left-padded prompts; after a row's end token, ``pad_token_id``.

    ``use_graph`` None means: on CUDA devices. Stops early once every row has produced ``eos_token_id``
    (then fewer than ``max_new_tokens`` columns come back, as with ``generate``).
    """
    from transformers import StaticCache

    rows, width = input_ids.shape
    device = input_ids.device
    use_graph = device.type == "cuda" if use_graph is None else use_graph
    total = width + max_new_tokens
    cache = StaticCache(config=base_model(model).config, max_cache_len=total)
    cache_kw = cache_keyword(model)

    # Which cache slots each row may attend to: its real prompt tokens now, each new token as it is fed.
    visible = torch.zeros(rows, total, dtype=torch.bool, device=device)
    visible[:, :width] = attention_mask.bool()
    causal = torch.ones(width, total, dtype=torch.bool, device=device).tril()
    prefill_mask = visible[:, None, None, :] & causal
    # A padding position sees nothing before it; letting it see itself keeps its softmax finite (its
    # output is never used, but a NaN there would reach the cache).
    prefill_mask |= torch.eye(width, total, dtype=torch.bool, device=device)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask={"full_attention": prefill_mask}, position_ids=positions,
                cache_position=torch.arange(width, device=device), use_cache=True, logits_to_keep=1,
                **{cache_kw: cache})
    first = out.logits[:, -1].argmax(-1)
    del out, prefill_mask

    tokens = torch.full((rows, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    tokens[:, 0] = first
    done = first == eos_token_id
    token = first.unsqueeze(1).clone()  # the token fed at the next step
    position = positions[:, -1:] + 1
    slot = torch.tensor([width], device=device)  # its cache slot
    column = torch.tensor([1], device=device)  # where its successor goes in ``tokens``
    step_mask = visible[:, None, None, :]  # a view: the step's in-place updates show through

    def step() -> None:
        visible.index_fill_(1, slot, True)
        logits = model(input_ids=token, attention_mask={"full_attention": step_mask}, position_ids=position,
                       cache_position=slot, use_cache=True, logits_to_keep=1, **{cache_kw: cache}).logits
        nxt = torch.where(done, pad_token_id, logits[:, -1].argmax(-1))
        tokens.index_copy_(1, column, nxt.unsqueeze(1))
        done.logical_or_(nxt == eos_token_id)
        token.copy_(nxt.unsqueeze(1))
        position.add_(1)
        slot.add_(1)
        column.add_(1)

    graph = None
    produced = 1
    while produced < max_new_tokens:
        if produced % check_every == 0 and bool(done.all()):
            break
        if graph is None and use_graph and produced > 1:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # records the step without running it
                step()
        if graph is not None:
            graph.replay()
        elif use_graph:  # the first step runs eagerly on a side stream, as capture requires a warm-up
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                step()
            torch.cuda.current_stream(device).wait_stream(side)
        else:
            step()
        produced += 1
    if bool(done.all()):
        ended = int((tokens == eos_token_id).int().argmax(-1).max()) + 1 if rows else 0
        produced = min(produced, max(ended, 1))
    return tokens[:, :produced]
