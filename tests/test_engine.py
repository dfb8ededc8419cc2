"""The generation engine (continuous batching): the same tokens as transformers' generate, reproducible sampling,
log-probabilities, streaming, and live weights. CPU, eager steps (CUDA graphs are what a GPU adds)."""

import pytest
import torch

from lawtune.errors import UsageError
from lawtune.generation.engine import EngineHolder, GenerationEngine, SamplingParams, choose_tokens, engine_supported

TEXTS = ["甲与乙订立买卖合同", "合同", "物权问题：甲与乙的物权纠纷，涉及房屋。下列哪些规则适用？", "丙", "法院认为当事人",
         "侵权", "继承问题：甲死亡后", "婚姻"]
BUDGETS = [5, 12, 7, 20, 3, 9, 15, 6]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    return model, tok, [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]


def _reference(model, tok, prompt, budget):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=budget, do_sample=False, temperature=None, top_p=None,
                         top_k=None, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return out[0, len(prompt):].tolist()


def test_greedy_output_equals_generate_token_for_token_while_rows_are_refilled(tiny):
    model, tok, prompts = tiny
    engine = GenerationEngine(model, tok.eos_token_id, slots=3, max_len=64)
    done = engine.generate([(p, SamplingParams(max_new_tokens=b), None) for p, b in zip(prompts, BUDGETS)])
    assert engine.steps < sum(BUDGETS) - 3  # rows were refilled as others ended: fewer steps than one at a time
    for prompt, budget, request in zip(prompts, BUDGETS, done):
        assert request.samples[0].tokens == _reference(model, tok, prompt, budget)
        assert request.samples[0].finish_reason in ("stop", "length")


def test_a_step_runs_only_the_rows_in_use_and_new_sequences_take_the_lowest_free_row(tiny):
    model, tok, prompts = tiny
    engine = GenerationEngine(model, tok.eos_token_id, slots=16, max_len=64)
    widths = []
    hook = engine.runner.decoder.register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape), with_kwargs=True)
    try:
        alone = engine.generate([(prompts[0], SamplingParams(max_new_tokens=6, ignore_eos=True), None)])[0]
        decoded = [shape[0] for shape in widths if shape[1] == 1]
        assert decoded and set(decoded) == {1}  # one sequence in a 16-slot engine: one row a step
        widths.clear()
        three = engine.generate([(p, SamplingParams(max_new_tokens=6, ignore_eos=True), None) for p in prompts[:3]])
        assert {shape[0] for shape in widths if shape[1] == 1} == {4}  # rows 0-2, rounded up to a power of two
    finally:
        hook.remove()
    assert alone.samples[0].tokens == _reference_eos_ignored(model, prompts[0], 6)
    for prompt, request in zip(prompts[:3], three):
        assert request.samples[0].tokens == _reference_eos_ignored(model, prompt, 6)


def test_a_step_attends_only_the_columns_in_use(tiny):
    # A slot of 1,024 columns, a sequence that ends past column 256: its steps attend 256 columns, then 512, never the
    # whole slot, and give the tokens a full-width attention gives.
    model, tok, prompts = tiny
    engine = GenerationEngine(model, tok.eos_token_id, slots=2, max_len=1024)
    windows = []
    hook = engine.runner.decoder.register_forward_pre_hook(
        lambda module, args, kwargs: windows.append(kwargs["attention_mask"]["full_attention"].shape[-1])
        if kwargs["input_ids"].shape[1] == 1 else None, with_kwargs=True)
    try:
        done = engine.generate([(prompts[0], SamplingParams(max_new_tokens=300, ignore_eos=True), None)])[0]
    finally:
        hook.remove()
    crossing = 256 - len(prompts[0])  # the step that writes column 256 is the first of the wider window
    # (the steps past the budget are those the host, reading two steps behind, runs before it sees the end)
    assert windows[:crossing] == [256] * crossing and set(windows[crossing:]) == {512} and len(windows) >= 299
    assert engine.column_steps == sum(windows)
    assert done.samples[0].tokens == _reference_eos_ignored(model, prompts[0], 300)


def _reference_eos_ignored(model, prompt, budget):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=budget, min_new_tokens=budget, do_sample=False,
                         temperature=None, top_p=None, top_k=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_log_probabilities_are_the_models_own(tiny):
    model, tok, prompts = tiny
    engine = GenerationEngine(model, tok.eos_token_id, slots=4, max_len=64)
    request = engine.generate([(prompts[2], SamplingParams(max_new_tokens=6, temperature=1.0, seed=3), None)])[0]
    tokens, logprobs = request.samples[0].tokens, request.samples[0].logprobs
    full = torch.tensor([prompts[2] + tokens])
    with torch.no_grad():
        logits = model(full).logits[0, len(prompts[2]) - 1: -1].float()
    expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(tokens)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(logprobs), expected, rtol=1e-4, atol=1e-4)


def test_sampling_repeats_with_a_seed_and_does_not_depend_on_the_batch(tiny):
    model, tok, prompts = tiny
    params = SamplingParams(max_new_tokens=10, temperature=0.8, top_p=0.95, top_k=50, seed=7, n=3)
    crowded = GenerationEngine(model, tok.eos_token_id, slots=5, max_len=64).generate(
        [(p, params, f"q{i}") for i, p in enumerate(prompts)])
    alone = GenerationEngine(model, tok.eos_token_id, slots=3, max_len=64).generate([(prompts[2], params, "q2")])[0]
    assert [s.tokens for s in alone.samples] == [s.tokens for s in crowded[2].samples]
    assert len({tuple(s.tokens) for s in alone.samples}) == 3  # the n samples differ
    other_seed = GenerationEngine(model, tok.eos_token_id, slots=3, max_len=64).generate(
        [(prompts[2], SamplingParams(max_new_tokens=10, temperature=0.8, seed=8, n=3), "q2")])[0]
    assert [s.tokens for s in other_seed.samples] != [s.tokens for s in alone.samples]


def test_sampled_tokens_follow_the_softmax_and_top_k_top_p_cut_it():
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]]).repeat(20000, 1)
    rows = logits.shape[0]
    ones, zeros = torch.ones(rows), torch.zeros(rows, dtype=torch.long)
    seeds = torch.arange(rows)
    no = torch.zeros(rows, dtype=torch.bool)
    token, _ = choose_tokens(logits, ones, ones, zeros, seeds, zeros, no, 4, sampling=True)
    freq = torch.bincount(token, minlength=5).float() / rows
    assert (freq - logits[0].softmax(-1)).abs().max() < 0.015
    top2, _ = choose_tokens(logits, ones, ones, torch.full((rows,), 2), seeds, zeros, no, 4, sampling=True)
    assert set(top2.tolist()) == {0, 1}
    nucleus, _ = choose_tokens(logits, ones, torch.full((rows,), 0.5), zeros, seeds, zeros, no, 4, sampling=True)
    assert set(nucleus.tolist()) == {0}  # the first token alone holds over half the mass
    banned, _ = choose_tokens(logits, torch.zeros(rows), ones, zeros, seeds, zeros, torch.ones(rows, dtype=torch.bool),
                              0, sampling=True)
    assert set(banned.tolist()) == {1}  # greedy, with the likeliest token banned


def test_end_rules_min_tokens_ignore_eos_and_stop_tokens(tiny):
    model, tok, prompts = tiny
    first = _reference(model, tok, prompts[0], 1)[0]
    engine = GenerationEngine(model, first, slots=2, max_len=64)  # the greedy first token plays the end token
    ends, held, runs = engine.generate([(prompts[0], SamplingParams(max_new_tokens=8), None),
                                        (prompts[0], SamplingParams(max_new_tokens=8, min_tokens=3), None),
                                        (prompts[0], SamplingParams(max_new_tokens=8, ignore_eos=True), None)])
    assert ends.samples[0].tokens == [first] and ends.samples[0].finish_reason == "stop"
    assert len(held.samples[0].tokens) >= 3 and held.samples[0].tokens[0] != first
    assert len(runs.samples[0].tokens) == 8 and runs.samples[0].finish_reason == "length"
    second = _reference(model, tok, prompts[1], 2)[1]
    stop = GenerationEngine(model, tok.eos_token_id, slots=1, max_len=64).generate(
        [(prompts[1], SamplingParams(max_new_tokens=8, stop_token_ids=(second,)), None)])[0]
    assert stop.samples[0].tokens[-1] == second and stop.samples[0].finish_reason == "stop"


def test_streaming_yields_tokens_as_made_and_closing_frees_the_row(tiny):
    model, tok, prompts = tiny
    engine = GenerationEngine(model, tok.eos_token_id, slots=2, max_len=64)
    request = engine.submit(prompts[3], SamplingParams(max_new_tokens=20, ignore_eos=True))
    seen = []
    for _, token, _ in engine.stream(request):
        seen.append(token)
        if len(seen) == 4:
            break
    assert seen == request.samples[0].tokens[:4]
    assert request.cancelled and not engine.running and len(engine.scheduler.free) == 2
    assert request.samples[0].finish_reason == "cancelled"


def test_background_loop_serves_callers_from_several_threads(tiny):
    import threading

    model, tok, prompts = tiny
    engine = GenerationEngine(model, tok.eos_token_id, slots=4, max_len=64)
    engine.start()
    try:
        results = {}

        def ask(i):
            request = engine.submit(prompts[i], SamplingParams(max_new_tokens=BUDGETS[i]))
            results[i] = [t for _, t, _ in engine.stream(request)]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        engine.stop()
    for i, prompt in enumerate(prompts):
        assert results[i] == _reference(model, tok, prompt, BUDGETS[i])


def test_one_thread_streams_many_requests_without_waiting_on_each(tiny):
    """``wait=False`` (serve's pump): a stream yields None where it would wait, and the request's listeners are told
    whenever it has more; one thread drives every stream from those calls alone, and gets the reference tokens."""
    import threading

    model, tok, prompts = tiny
    engine = GenerationEngine(model, tok.eos_token_id, slots=4, max_len=64)
    told, ready = threading.Event(), []
    engine.start()
    try:
        streams, results, idles = {}, {i: [] for i in range(len(prompts))}, 0
        for i in range(len(prompts)):
            request = engine.submit(prompts[i], SamplingParams(max_new_tokens=BUDGETS[i]), stream=True)
            request.listeners.append(lambda _r, i=i: (ready.append(i), told.set()))
            streams[i] = engine.stream(request, wait=False)
        pending = set(streams)
        while pending:
            for i in list(pending):
                for item in streams[i]:
                    if item is None:
                        idles += 1
                        break
                    results[i].append(item[1])
                else:
                    pending.discard(i)
            if pending:
                assert told.wait(timeout=60), "no listener was told while requests still ran"
                told.clear()
    finally:
        engine.stop()
    for i, prompt in enumerate(prompts):
        assert results[i] == _reference(model, tok, prompt, BUDGETS[i])
    assert idles and set(ready) == set(streams)


def test_the_background_loop_gives_the_model_its_attention_back_when_idle(tiny):
    """The loop keeps its attention switched over a run of steps, not beyond: idle, the model's config is its own."""
    import time

    from lawtune.generation.attention import FAST_ATTENTION, attention_implementation

    model, tok, prompts = tiny
    before = attention_implementation(model)
    seen = []
    engine = GenerationEngine(model, tok.eos_token_id, slots=2, max_len=64)
    engine.start()
    try:
        request = engine.submit(prompts[0], SamplingParams(max_new_tokens=BUDGETS[0]), stream=True)
        request.listeners.append(lambda _r: seen.append(attention_implementation(model)))
        tokens = [t for _, t, _ in engine.stream(request)]
        deadline = time.monotonic() + 10
        while attention_implementation(model) != before and time.monotonic() < deadline:
            time.sleep(0.01)
        assert attention_implementation(model) == before != FAST_ATTENTION
    finally:
        engine.stop()
    assert tokens == _reference(model, tok, prompts[0], BUDGETS[0]) and set(seen) == {FAST_ATTENTION}


def test_a_failed_step_in_the_background_loop_is_logged_and_raised_to_its_caller(tiny, caplog, monkeypatch):
    model, tok, prompts = tiny
    engine = GenerationEngine(model, tok.eos_token_id, slots=2, max_len=64)

    def broken_step(*args, **kwargs):
        raise RuntimeError("a bug in step")

    monkeypatch.setattr(engine.runner, "run_step", broken_step)
    engine.start()
    try:
        request = engine.submit(prompts[0], SamplingParams(max_new_tokens=4))
        with caplog.at_level("ERROR", logger="lawtune"), pytest.raises(RuntimeError, match="a bug in step"):
            list(engine.stream(request))
    finally:
        engine.stop()
    failed = [r for r in caplog.records if r.exc_info and "a step failed" in r.getMessage()]
    assert failed and "broken_step" in caplog.text  # the traceback, not only the message


def test_generation_follows_the_live_weights_after_an_update(tiny):
    """GRPO and in-training evaluation generate from the weights being trained, never from a stale copy."""
    model, tok, prompts = tiny
    holder = EngineHolder(tok.eos_token_id)
    engine = holder.get(model, 2, 64)
    before = engine.generate([(prompts[2], SamplingParams(max_new_tokens=8), None)])[0].samples[0].tokens
    head = model.get_output_embeddings().weight
    saved = head.detach().clone()
    try:
        with torch.no_grad():
            head.add_(torch.randn_like(head) * 0.5)  # in place, as an optimizer step does
        assert holder.get(model, 2, 64) is engine
        after = engine.generate([(prompts[2], SamplingParams(max_new_tokens=8), None)])[0].samples[0].tokens
        assert after == _reference(model, tok, prompts[2], 8) and after != before
    finally:
        holder.close()
        with torch.no_grad():
            head.copy_(saved)


def test_a_request_that_cannot_fit_is_refused(tiny):
    model, tok, prompts = tiny
    engine = GenerationEngine(model, tok.eos_token_id, slots=2, max_len=32)
    with pytest.raises(ValueError, match="do not fit"):
        engine.submit(prompts[2], SamplingParams(max_new_tokens=30))
    with pytest.raises(ValueError, match="slots"):
        engine.submit(prompts[1], SamplingParams(max_new_tokens=2, n=3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_on_a_gpu_the_replayed_steps_give_what_eager_steps_give(tiny_tokenizer):
    from lawtune.demo import build_tiny_model

    model = build_tiny_model(tiny_tokenizer).to("cuda").eval()
    prompts = [tiny_tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    outputs = []
    for use_graph in (False, True):  # the graphs alone (the fused step has a test of its own)
        engine = GenerationEngine(model, tiny_tokenizer.eos_token_id, slots=3, max_len=600, use_graph=use_graph,
                                  compile_step=False, attention_kernel=False)
        for temperature in (0.0, 0.9):
            done = engine.generate([(p, SamplingParams(max_new_tokens=b, temperature=temperature, seed=1), str(i))
                                    for i, (p, b) in enumerate(zip(prompts, BUDGETS))])
            outputs.append([r.samples[0].tokens for r in done])
            # and a stream alone, on the one-row graphs, past column 256 (a wider window of columns)
            alone = engine.submit(prompts[2], SamplingParams(max_new_tokens=280, temperature=temperature, seed=1,
                                                             ignore_eos=True), "2", stream=True)
            outputs.append([t for _, t, _ in engine.stream(alone)])
        assert not use_graph or {key[0] for key in engine.runner.graphs} == {False, True}  # (sampling, rows, columns)
        assert not use_graph or {1, 3} <= {key[1] for key in engine.runner.graphs} <= {1, 2, 3}
        assert not use_graph or {key[2] for key in engine.runner.graphs} == {256, 512}
    assert outputs[:4] == outputs[4:]
    assert outputs[1][: len(outputs[0][2])] == outputs[0][2]  # greedy: alone as in the batch
    ready = GenerationEngine(model, tiny_tokenizer.eos_token_id, slots=3, max_len=600, compile_step=False,
                             attention_kernel=False)
    assert ready.capture_graphs() == 18  # rows 1, 2, 3 x columns 256, 512, 600, greedy and sampling, before any request
    done = ready.generate([(p, SamplingParams(max_new_tokens=b, temperature=0.9, seed=1), str(i))
                           for i, (p, b) in enumerate(zip(prompts, BUDGETS))])
    assert [r.samples[0].tokens for r in done] == outputs[2] and len(ready.runner.graphs) == 18


def test_top_logprobs_and_prompt_logprobs_are_the_models(tiny):
    """An engine made with top_logprobs keeps each step's likeliest tokens, and a request's prefill scores its prompt:
    both as transformers' forward pass over the prompt and the generated tokens gives them."""
    model, tok, _ = tiny
    engine = GenerationEngine(model, tok.eos_token_id, slots=4, max_len=256, use_graph=False, top_logprobs=5)
    prompt = tok("甲与乙订立买卖合同", add_special_tokens=False)["input_ids"]
    params = SamplingParams(max_new_tokens=6, ignore_eos=True, top_logprobs=3, prompt_logprobs=2)
    [request] = engine.generate([(prompt, params, None)])
    sample = request.samples[0]
    with torch.no_grad():
        reference = torch.log_softmax(model(torch.tensor([prompt + sample.tokens])).logits[0].float(), dim=-1)
    for i, token in enumerate(sample.tokens):
        step = reference[len(prompt) - 1 + i]
        assert [t for t, _ in sample.top_logprobs[i]] == step.topk(3).indices.tolist()
        assert [lp for _, lp in sample.top_logprobs[i]] == pytest.approx(step.topk(3).values.tolist(), abs=1e-4)
        assert sample.logprobs[i] == pytest.approx(step[token].item(), abs=1e-4)
    assert len(request.prompt_logprobs) == len(prompt) - 1
    for j, (logprob, alternatives) in enumerate(request.prompt_logprobs):
        assert logprob == pytest.approx(reference[j, prompt[j + 1]].item(), abs=1e-4)
        assert [t for t, _ in alternatives] == reference[j].topk(2).indices.tolist()
    plain = engine.generate([(prompt, SamplingParams(max_new_tokens=6, ignore_eos=True), None)])[0]
    assert plain.samples[0].tokens == sample.tokens and plain.samples[0].top_logprobs == []
    assert plain.prompt_logprobs is None
    with pytest.raises(ValueError, match="top_logprobs"):
        engine.submit(prompt, SamplingParams(max_new_tokens=2, top_logprobs=6))


def test_only_full_attention_sdpa_models_run_on_the_engine(tiny_tokenizer):
    from lawtune.compat import set_attn_implementation
    from lawtune.demo import build_tiny_model

    model = build_tiny_model(tiny_tokenizer, hidden_size=64, layers=2)
    set_attn_implementation(model.config, "sdpa")
    assert engine_supported(model)
    set_attn_implementation(model.config, "eager")
    assert not engine_supported(model)
    set_attn_implementation(model.config, "sdpa")
    model.config.layer_types = ["sliding_attention"] * model.config.num_hidden_layers
    assert not engine_supported(model)


def test_greedy_and_seeded_tokens_are_unchanged_when_rows_are_preempted(tiny):
    """A token budget smaller than the rows' needs: the newest rows are preempted and recomputed later, never dropped,
    and every sample is the one an engine with room for all makes (greedy: transformers' generate)."""
    model, tok, prompts = tiny
    requests = [(p, SamplingParams(max_new_tokens=b, ignore_eos=True), None) for p, b in zip(prompts, BUDGETS)]
    tight = GenerationEngine(model, tok.eos_token_id, slots=4, max_len=64, max_tokens=36)
    done = tight.generate(requests)
    assert tight.scheduler.preemptions > 0
    for (prompt, _, _), budget, request in zip(requests, BUDGETS, done):
        assert request.samples[0].tokens == _reference_eos_ignored(model, prompt, budget)
        assert request.samples[0].finish_reason == "length"
    sampled = SamplingParams(max_new_tokens=14, temperature=0.9, seed=5, n=2)
    roomy = GenerationEngine(model, tok.eos_token_id, slots=4, max_len=64).generate(
        [(p, sampled, str(i)) for i, p in enumerate(prompts[:4])])
    tight.scheduler.preemptions = 0
    squeezed = tight.generate([(p, sampled, str(i)) for i, p in enumerate(prompts[:4])])
    assert tight.scheduler.preemptions > 0
    assert [[s.tokens for s in r.samples] for r in squeezed] == [[s.tokens for s in r.samples] for r in roomy]
    with pytest.raises(ValueError, match="budget"):
        tight.submit(prompts[2], SamplingParams(max_new_tokens=30))  # fits a slot of 64, not the budget


def test_a_closed_engine_lets_go_of_the_model(tiny_tokenizer):
    import gc
    import weakref

    from lawtune.demo import build_tiny_model

    model = build_tiny_model(tiny_tokenizer, hidden_size=64, layers=2).eval()
    prompt = tiny_tokenizer("合同", add_special_tokens=False)["input_ids"]
    with GenerationEngine(model, tiny_tokenizer.eos_token_id, slots=2, max_len=64) as engine:
        engine.generate([(prompt, SamplingParams(max_new_tokens=3), None)])
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None  # the closed engine (still referenced here) holds no model, cache or graph
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit(prompt, SamplingParams(max_new_tokens=3))


def test_an_engine_holder_reuses_its_engine_for_fewer_rows_and_grows_it_for_more(tiny):
    model, tok, prompts = tiny
    with EngineHolder(tok.eos_token_id) as holder:
        big = holder.get(model, 4, 100)
        assert holder.get(model, 1, 40) is big  # fewer rows, a shorter row: the same engine
        assert (big.slots, big.max_len) == (4, 256)  # lengths rounded up to a multiple of 256
        bigger = holder.get(model, 8, 64)
        assert bigger is not big and big.runner is None  # more rows: a new engine, the old one closed
        assert holder.get(model, 4, 300).max_len == 512 and holder.engine.slots == 8  # never fewer rows than before
    assert holder.engine is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu_closing_the_engine_returns_its_memory(tiny_tokenizer):
    import gc

    from lawtune.demo import build_tiny_model

    model = build_tiny_model(tiny_tokenizer).to("cuda").eval()
    prompt = tiny_tokenizer("合同", add_special_tokens=False)["input_ids"]
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    engine = GenerationEngine(model, tiny_tokenizer.eos_token_id, slots=8, max_len=1024)
    engine.capture_graphs()
    engine.generate([(prompt, SamplingParams(max_new_tokens=20, temperature=0.7), None)])
    taken = torch.cuda.memory_allocated() - before
    assert taken > 1 << 20  # the cache alone: 8 rows x 1,024 columns of every layer's keys and values
    engine.close()
    gc.collect()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - before < max(taken // 100, 64 << 10)


def test_a_forced_answer_continues_the_row_as_a_second_prefill_of_the_closed_trace_would(tiny):
    """A trace cut off by its thinking budget gets its closing appended on its own row and decodes on: the tokens a
    second prefill of the prompt, the trace and the closing gives, which are the old way's (detokenise, append the
    closing text, tokenize the whole again) where the text's tokenisation round-trips."""
    from lawtune.generation import forced_answer
    from lawtune.think import closing_text

    model, tok, prompts = tiny
    think, reserve = 3, 6
    params = SamplingParams(max_new_tokens=think, ignore_eos=True, **forced_answer(tok, "chat", reserve))
    engine = GenerationEngine(model, tok.eos_token_id, slots=3, max_len=96)
    done = engine.generate([(p, params, None) for p in prompts])
    round_trips = 0
    for prompt, request in zip(prompts, done):
        sample = request.samples[0]
        assert sample.forced_at == think and len(sample.tokens) == think + reserve and sample.finish_reason == "length"
        trace = tok.decode(sample.tokens[:think], skip_special_tokens=True)
        assert sample.closing == tok(closing_text(trace, "chat"), add_special_tokens=False)["input_ids"]
        closed = prompt + sample.tokens[:think] + sample.closing
        assert sample.tokens[think:] == _reference_eos_ignored(model, closed, reserve)
        text = tok.decode(prompt, skip_special_tokens=True) + trace + closing_text(trace, "chat")
        round_trips += tok(text, add_special_tokens=False)["input_ids"] == closed
    assert round_trips >= 1  # (byte-level pieces of a random model's trace often do not)
    tight = GenerationEngine(model, tok.eos_token_id, slots=3, max_len=96, max_tokens=params.row_tokens + 24)
    again = tight.generate([(p, params, None) for p in prompts])  # forced rows preempted and recomputed too
    assert tight.scheduler.preemptions > 0
    assert [r.samples[0].tokens for r in again] == [r.samples[0].tokens for r in done]


def _sampler_cases(device):
    generator = torch.Generator().manual_seed(0)
    rows, vocab = 48, 613  # a prime: no top-p below lands on a boundary of a flat distribution
    yield "random", torch.randn(rows, vocab, generator=generator) * 3
    yield "flat", torch.zeros(rows, vocab)  # every token tied: the nucleus is most of the vocabulary
    yield "peaked", torch.randn(rows, vocab, generator=generator) * 12
    yield "bfloat16 ties", (torch.randn(rows, vocab, generator=generator) * 2).bfloat16().float()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU")])])
def test_sampling_without_a_sort_picks_the_full_sorts_token(device):
    from lawtune.generation.engine import sampler_kernel
    from lawtune.generation.engine.sampler import gumbel_first, nucleus, sample, sorted_choice, uniform_noise

    for name, logits in _sampler_cases(device):
        logits = logits.to(device)
        rows, vocab = logits.shape
        seed, step = torch.arange(rows, device=device), torch.full((rows,), 3, device=device)
        tokens = torch.arange(vocab, device=device)[None, :]
        for top_p, top_k in [(0.95, 0), (0.5, 0), (1.0, 0), (0.0, 0), (0.95, 5), (1.0, 40), (0.3, 1)]:
            p = torch.full((rows,), top_p, device=device)
            k = torch.full((rows,), top_k, dtype=torch.long, device=device)
            for temperature in (0.6, 1.0):
                scaled = logits / temperature
                u = uniform_noise(seed[:, None], step[:, None], tokens)
                keep = nucleus(scaled.softmax(-1), p, k)
                ours = (scaled.masked_fill(~keep, float("-inf")) - torch.log(-torch.log(u))).argmax(-1)
                reference = sorted_choice(scaled, p, k, seed, step)
                assert torch.equal(ours, reference), (name, top_p, top_k, temperature)
                # the step's sampler: the first token where it is kept, the bisection (the kernel on a GPU) elsewhere
                assert torch.equal(sample(scaled, p, k, seed, step), reference), (name, top_p, top_k, temperature)
                if device == "cuda":  # every row through the kernel's bisection, not only those gumbel_first cut
                    first, _, probs, noisy = gumbel_first(scaled, p, k, seed, step)
                    every = torch.zeros(rows, dtype=torch.bool, device=device)
                    assert torch.equal(sampler_kernel.kept_pick(probs, noisy, p, k, every, first), reference)
        if name == "flat":  # ties keep the lowest ids, as many as top-p's mass allows
            keep = nucleus(logits.softmax(-1), torch.full((rows,), 0.5, device=device),
                           torch.zeros(rows, dtype=torch.long, device=device))
            assert keep[0].nonzero()[:, 0].tolist() == list(range(307))  # the mass before token 307 is past 0.5


def test_a_sampler_kernel_that_fails_leaves_its_rows_to_torchs_bisection(monkeypatch, caplog):
    """A Triton build that cannot compile the kernel costs speed, not the step: the rows it would serve take the
    torch bisection, with the same tokens, and it is not tried again in the process."""
    from lawtune.generation.engine import compiled as compiled_module
    from lawtune.generation.engine import sampler, sampler_kernel
    from lawtune.generation.engine.sampler import sorted_choice

    tries = []

    def broken(*args):
        tries.append(1)
        raise RuntimeError("ptxas: unsupported version")

    monkeypatch.setattr(sampler_kernel, "triton", object())  # as if Triton were installed, with its interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(sampler_kernel, "kept_pick", broken)
    monkeypatch.setattr(compiled_module, "_failed", {})
    rows = 32
    scaled = torch.zeros(rows, 101)  # flat: top-p 0.5 cuts about half of the rows' first tokens
    p, k = torch.full((rows,), 0.5), torch.zeros(rows, dtype=torch.long)
    seed, step = torch.arange(rows), torch.zeros(rows, dtype=torch.long)
    with caplog.at_level("WARNING", logger="lawtune"):
        for _ in range(2):
            assert torch.equal(sampler.sample(scaled, p, k, seed, step), sorted_choice(scaled, p, k, seed, step))
    assert caplog.text.count("ptxas: unsupported version") == 1 and len(tries) == 1  # not tried again


def test_a_sampler_part_that_fails_to_compile_runs_uncompiled(monkeypatch, caplog):
    """The sampler's compiled parts are a speed-up only: a compiler that cannot serve one leaves that part eager
    (logged once), the same tokens, instead of failing the step (which would turn the whole step, layers too,
    eager)."""
    from lawtune.generation.engine import compiled as compiled_module
    from lawtune.generation.engine import sampler
    from lawtune.generation.engine.sampler import sorted_choice

    def failing(name, fn):
        def call(*args):
            raise RuntimeError(f"inductor cannot lower {name}")
        return call

    monkeypatch.setattr(compiled_module, "compiled", failing)
    monkeypatch.setattr(compiled_module, "_failed", {})
    rows = 16
    scaled = torch.randn(rows, 211, generator=torch.Generator().manual_seed(0))
    p, k = torch.full((rows,), 0.9), torch.zeros(rows, dtype=torch.long)
    seed, step = torch.arange(rows), torch.zeros(rows, dtype=torch.long)
    with caplog.at_level("WARNING", logger="lawtune"):
        for _ in range(2):
            assert torch.equal(sampler.sample(scaled, p, k, seed, step, fused=True), sorted_choice(scaled, p, k, seed,
                                                                                                   step))
    assert caplog.text.count("inductor cannot lower noisy_logits") == 1
    assert caplog.text.count("inductor cannot lower first_kept") == 1


def test_a_flat_rows_first_noisy_token_is_kept_but_about_one_time_in_1_over_1_minus_top_p():
    """Why sampling skips the bisection for most rows: the largest noisy logit over the whole vocabulary is a draw of
    the whole distribution, which top-p 0.95 cuts with probability about 0.05 (a random model's rows are flat)."""
    from lawtune.generation.engine.sampler import gumbel_first

    rows = 4000
    logits = torch.randn(rows, 613, generator=torch.Generator().manual_seed(0)) * 0.02
    _, kept, _, _ = gumbel_first(logits / 0.6, torch.full((rows,), 0.95), torch.zeros(rows, dtype=torch.long),
                                 torch.arange(rows), torch.zeros(rows, dtype=torch.long))
    assert 0.93 < kept.float().mean() < 0.97


def test_top_p_1_with_top_k_keeps_top_k_tokens_where_the_mass_rounds_above_1():
    """Peaked rows: the first few probabilities already sum above 1 in float32, which cut top-k 40 short before (to 5
    tokens in the first row), top-p 1 being read as a bound on that sum."""
    from lawtune.generation.engine.sampler import nucleus

    generator = torch.Generator().manual_seed(0)
    probs = (torch.randn(48, 613, generator=generator) * 20).softmax(-1)
    assert (probs.sort(-1, descending=True).values[:, :40].cumsum(-1) > 1).any()  # the case this is about
    keep = nucleus(probs, torch.ones(48), torch.full((48,), 40))
    assert keep.sum(-1).tolist() == [40] * 48


def test_the_layer_by_layer_step_gives_the_decoders_tokens(tiny, monkeypatch):
    """The fused step's path (each layer on its own view of the cache), here uncompiled on the CPU: the same tokens as
    the whole decoder's forward, greedy and sampled."""
    from lawtune.generation.engine import runner, sampler

    model, tok, prompts = tiny
    monkeypatch.setattr(runner, "compiled", lambda name, fn: fn)
    monkeypatch.setattr(sampler, "compiled_or_eager", lambda name, fn: fn)
    outputs = []
    for layered in (False, True):
        with GenerationEngine(model, tok.eos_token_id, slots=3, max_len=64, compile_step=layered,
                              attention_kernel=False) as engine:
            assert engine.runner.compile_step is layered
            for temperature in (0.0, 0.9):
                done = engine.generate([(p, SamplingParams(max_new_tokens=b, temperature=temperature, seed=1), str(i))
                                        for i, (p, b) in enumerate(zip(prompts, BUDGETS))])
                outputs.append([r.samples[0].tokens for r in done])
    assert outputs[:2] == outputs[2:]


def test_layers_that_training_compiled_leave_the_fused_step_compiled(tiny_model_dir, tiny, monkeypatch):
    """In-training evaluation (and GRPO's rollouts unfolded) run the engine on the live model, whose layers
    train.compile / grpo.compile compiled: the prefill runs them eagerly (their compilation is for training's
    shapes), the fused step still runs compiled (it traces through them), with the tokens of the uncompiled model. A
    compiler backend that counts the compiled step's runs shows which (a process-wide "force eager" stance ran it
    zero times)."""
    from transformers import AutoModelForCausalLM

    from lawtune.generation.engine import runner
    from lawtune.train.kernels import compile_layers

    _, tok, prompts = tiny
    runs = []

    def counting(gm, example_inputs):
        def run(*args):
            runs.append(1)
            return gm.forward(*args)
        return run

    monkeypatch.setattr(runner, "compiled", lambda name, fn: torch.compile(fn, dynamic=True, backend=counting))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    params = [(p, SamplingParams(max_new_tokens=b), str(i)) for i, (p, b) in enumerate(zip(prompts, BUDGETS))]
    with GenerationEngine(model, tok.eos_token_id, slots=3, max_len=64, compile_step=False) as engine:
        expected = [r.samples[0].tokens for r in engine.generate(params)]
    assert compile_layers(model) == len(model.model.layers)
    with GenerationEngine(model, tok.eos_token_id, slots=3, max_len=64, compile_step=True,
                          attention_kernel=False) as engine:
        assert [r.samples[0].tokens for r in engine.generate(params)] == expected
        steps = engine.steps
    assert len(runs) == steps * len(model.model.layers)  # every layer of every step through the compiled step


def test_a_step_whose_compilation_fails_runs_uncompiled_and_says_so(tiny, monkeypatch, caplog):
    from lawtune.generation.engine import runner

    model, tok, prompts = tiny

    def broken(name, fn):
        def fail(*args, **kwargs):
            raise RuntimeError("inductor: NYI for this GPU")
        return fail

    params = [(p, SamplingParams(max_new_tokens=b, temperature=0.9, seed=1), str(i))
              for i, (p, b) in enumerate(zip(prompts, BUDGETS))]
    with GenerationEngine(model, tok.eos_token_id, slots=3, max_len=64, compile_step=False) as engine:
        expected = [r.samples[0].tokens for r in engine.generate(params)]
    monkeypatch.setattr(runner, "compiled", broken)
    with GenerationEngine(model, tok.eos_token_id, slots=3, max_len=64, compile_step=True) as engine:
        assert [r.samples[0].tokens for r in engine.generate(params)] == expected
        assert engine.runner.compile_step is False
    assert [r.message for r in caplog.records].count(
        "generation engine: compiling the decoding step failed (inductor: NYI for this GPU); it runs uncompiled") == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernel runs on a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_on_a_gpu_the_decoding_kernel_equals_masked_sdpa(dtype):
    from lawtune.generation import decode_attention as da

    torch.manual_seed(0)
    rows, heads, kv_heads, dim, columns = 7, 12, 2, 128, 3000
    query = torch.randn(rows, 1, heads, dim, device="cuda", dtype=dtype).transpose(1, 2)[:, :, 0]  # strided
    keys = torch.randn(rows + 2, kv_heads, columns, dim, device="cuda", dtype=dtype)
    values = torch.randn_like(keys)
    lengths = torch.tensor([1, 2, 255, 256, 257, 1500, 3000], device="cuda")
    ref = da.reference_attention(query, keys, values, lengths, dim ** -0.5)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for rows in (1, 256):  # each tuning the engine uses
        out = da.decode_attention(query, keys, values, lengths, dim ** -0.5, *da.tuning(rows))
        assert (out.float() - ref.float()).abs().max() < tolerance


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused step runs on a GPU")
def test_on_a_gpu_the_fused_step_gives_the_plain_steps_tokens(tiny_tokenizer):
    """float32: the compiled layers and the length-aware kernel give the plain graphs' greedy and seeded tokens, in a
    batch whose rows differ in length and past one window of columns."""
    from lawtune.demo import build_tiny_model

    model = build_tiny_model(tiny_tokenizer).to("cuda").eval()
    prompts = [tiny_tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    outputs = []
    for options in (dict(compile_step=False, attention_kernel=False), dict(compile_step=True, attention_kernel=True)):
        with GenerationEngine(model, tiny_tokenizer.eos_token_id, slots=3, max_len=600, **options) as engine:
            assert engine.runner.compile_step == engine.runner.attention_kernel == options["compile_step"]
            for temperature in (0.0, 0.9):
                done = engine.generate([(p, SamplingParams(max_new_tokens=b + 280, temperature=temperature, seed=1,
                                                           ignore_eos=True), str(i))
                                        for i, (p, b) in enumerate(zip(prompts, BUDGETS))])
                outputs.append([r.samples[0].tokens for r in done])
    assert outputs[:2] == outputs[2:]


def test_a_kv_budget_in_gib_caps_the_rows_and_the_cache_stays_within_it(tiny):
    """generation.kv_cache: the rows are what the budget holds at the row length, never more than asked."""
    model, tok, prompts = tiny
    with EngineHolder(tok.eos_token_id, kv_cache="0.001GiB") as holder:
        engine = holder.get(model, 64, 200)  # rows of 256 tokens
        budget = 0.001 * 2**30
        row = engine.cache_gib * 2**30 / engine.slots
        assert 1 <= engine.slots < 64 and engine.cache_gib * 2**30 <= budget < (engine.slots + 1) * row
        assert holder.get(model, 2, 200) is engine  # fewer rows reuse it
        done = engine.generate([(prompts[i % len(prompts)], SamplingParams(max_new_tokens=4), f"q{i}")
                                for i in range(engine.slots + 3)])  # more requests than rows wait for one
        assert len(done) == engine.slots + 3 and all(r.samples[0].tokens for r in done)
    with EngineHolder(tok.eos_token_id, kv_cache="100GiB") as holder:
        assert holder.get(model, 3, 200).slots == 3  # a budget caps; it never adds rows
    with EngineHolder(tok.eos_token_id, kv_cache="0.000001GiB") as holder:
        with pytest.raises(UsageError, match=r"generation\.kv_cache: .* holds 0 rows of 256 tokens"):
            holder.get(model, 4, 200)
