"""bench/static_decoder.py (the benchmarks' baseline decoder) must produce exactly what transformers' greedy generate
produces."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from lawtune.compat import set_attn_implementation
from lawtune.config import GenerationConfig
from lawtune.demo import build_tiny_model
from lawtune.generation import encode_batch, generate
from lawtune.generation.attention import fast_attention

from conftest import lora_tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from static_decoder import greedy_decode  # noqa: E402

PROMPTS = ["合同纠纷：甲与乙", "物权问题，房屋与车辆的证据期限。法院认为当事人", "侵权", "继承与婚姻的诉讼"]


def _model(tokenizer, device="cpu", lora=False):
    torch.manual_seed(0)
    model = lora_tiny_model(tokenizer) if lora else build_tiny_model(tokenizer, hidden_size=64, layers=2)
    set_attn_implementation(model.config, "sdpa")
    return model.to(device).eval()


def _both(model, tokenizer, new_tokens, eos, device="cpu", use_graph=False, prompts=PROMPTS):
    batch = encode_batch(tokenizer, prompts, device)
    with fast_attention(model), torch.inference_mode():
        ref = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None,
                             top_k=None, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
        got = greedy_decode(model, batch["input_ids"], batch["attention_mask"], new_tokens, eos,
                            tokenizer.pad_token_id, use_graph=use_graph, check_every=2)
    return ref[:, batch["input_ids"].shape[1]:], got


@pytest.mark.parametrize("lora", [False, True])
def test_matches_greedy_generate_on_left_padded_rows(tiny_tokenizer, lora):
    model = _model(tiny_tokenizer, lora=lora)
    ref, got = _both(model, tiny_tokenizer, 20, tiny_tokenizer.eos_token_id)
    assert ref.shape == got.shape == (len(PROMPTS), 20)
    assert torch.equal(ref, got)


def test_rows_stop_at_the_end_token_and_decoding_stops_when_all_have(tiny_tokenizer):
    model = _model(tiny_tokenizer)
    free, _ = _both(model, tiny_tokenizer, 12, tiny_tokenizer.eos_token_id)
    # Declare as end token the one row 0 writes at its 3rd step: row 0 stops there, others may go on.
    eos = int(free[0, 2])
    ref, got = _both(model, tiny_tokenizer, 12, eos)
    assert torch.equal(ref, got)
    assert (got[0, 3:] == tiny_tokenizer.pad_token_id).all()
    # Every row ending early (here the one row): the output is as short as generate's.
    ref, got = _both(model, tiny_tokenizer, 12, eos, prompts=PROMPTS[:1])
    assert ref.shape == got.shape == (1, 3)
    assert torch.equal(ref, got)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_replay_matches_generate(tiny_tokenizer):
    model = _model(tiny_tokenizer, device="cuda", lora=True)
    ref, got = _both(model, tiny_tokenizer, 24, tiny_tokenizer.eos_token_id, device="cuda", use_graph=True)
    assert torch.equal(ref, got)
    gcfg = GenerationConfig()
    graphed = generate(model, tiny_tokenizer, PROMPTS, 24, gcfg)
    plain = generate(model, tiny_tokenizer, PROMPTS, 24, GenerationConfig(cuda_graphs=False))
    assert graphed == plain
