"""Evaluation attention (lawtune/attention.py): exactly the attention of plain sdpa, on fewer kernels."""

import torch

from lawtune.compat import attn_implementation
from lawtune.demo import build_tiny_model
from lawtune.generation.attention import fast_attention, gqa_sdpa_attention


def test_gqa_decoding_attention_equals_repeated_heads():
    from transformers.integrations.sdpa_attention import repeat_kv

    torch.manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups = 3
    q, k, v = torch.randn(4, 6, 1, 16), torch.randn(4, 2, 9, 16), torch.randn(4, 2, 9, 16)
    mask = torch.ones(4, 1, 1, 9, dtype=torch.bool)
    mask[0, ..., :4] = False  # left padding
    out, _ = gqa_sdpa_attention(module, q, k, v, mask, scaling=0.25)
    ref = torch.nn.functional.scaled_dot_product_attention(q, repeat_kv(k, 3), repeat_kv(v, 3), attn_mask=mask, scale=0.25)
    torch.testing.assert_close(out, ref.transpose(1, 2), rtol=1e-5, atol=1e-6)


def test_fast_attention_generates_what_plain_sdpa_generates(tiny_tokenizer):
    model = build_tiny_model(tiny_tokenizer).eval()  # 4 query heads on 2 key/value heads
    tiny_tokenizer.padding_side = "left"
    batch = tiny_tokenizer(["甲乙丙丁的合同", "短"], return_tensors="pt", add_special_tokens=False, padding=True)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        plain = model.generate(**batch, **kwargs)
        with fast_attention(model):
            assert attn_implementation(model.config) == "lawtune_sdpa"
            fast = model.generate(**batch, **kwargs)
    assert attn_implementation(model.config) == "sdpa"
    assert torch.equal(plain, fast)


def test_evaluation_leaves_cudnn_attention_out_and_restores_the_backends(tiny_tokenizer):
    model = build_tiny_model(tiny_tokenizer).eval()
    before = torch.backends.cuda.cudnn_sdp_enabled()
    with fast_attention(model):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.mem_efficient_sdp_enabled() and torch.backends.cuda.flash_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
