"""Packing (padding-free batches) must train exactly the same function as the padded path."""

import pytest
import torch
from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

from lawtune.data import load_records
from lawtune.demo import demo_data_path
from lawtune.prompts import encode_records

from conftest import lora_tiny_model


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_and_padded_batches_give_the_same_loss_and_gradients(tiny_tokenizer, attn):
    records = load_records(demo_data_path()).records[:6]
    features, _ = encode_records(records, tiny_tokenizer, "chat", 512)
    assert len({len(f["input_ids"]) for f in features}) > 1  # different lengths, so padding matters
    model = lora_tiny_model(tiny_tokenizer, attn)
    n_target = sum(sum(1 for x in f["labels"] if x != -100) for f in features)

    def loss_and_grads(batch):
        model.zero_grad()
        out = model(**batch, use_cache=False)  # as in training: no KV cache, so packing is detected
        # transformers averages over the batch's label tokens; both batches hold the same label tokens
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    padded = DataCollatorForSeq2Seq(tiny_tokenizer, padding=True, label_pad_token_id=-100)(features)
    packed = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)(features)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    assert packed["input_ids"].shape[1] == sum(len(f["input_ids"]) for f in features) < padded["input_ids"].numel()
    assert int((packed["labels"] != -100).sum()) == n_target
    loss_pad, grads_pad = loss_and_grads(padded)
    loss_pack, grads_pack = loss_and_grads(packed)
    torch.testing.assert_close(loss_pack, loss_pad, rtol=1e-4, atol=1e-5)
    for name, g in grads_pad.items():
        torch.testing.assert_close(grads_pack[name], g, rtol=1e-3, atol=1e-6, msg=name)


def test_packing_config_trains(tiny_config):
    from lawtune.train import train

    result = train(tiny_config("train.packing=true", "train.max_steps=2"))
    assert result.steps == 2 and result.final_loss > 0
