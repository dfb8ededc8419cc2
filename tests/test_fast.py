"""Speed features (lawtune/train/: collate, loss, kernels, trainer): same loss and gradients as the plain path, and clean fallbacks."""

import gc
import logging
import re

import pytest
import torch
from transformers import DataCollatorForSeq2Seq

from lawtune.config import ConfigError, LoraSection, load_config
from lawtune.data import load_records
from lawtune.demo import build_tiny_model, demo_data_path
from lawtune.errors import UsageError
from lawtune.model import add_lora
from lawtune.prompts import encode_records
from lawtune.train.callbacks import GcPauses
from lawtune.train.collate import PlannedBatches, SparseLogitsCollator, TokenBudgetCollator, plan_batches, real_tokens
from lawtune.train.loss import sparse_logits_loss

from conftest import lora_tiny_model


@pytest.fixture(scope="module")
def features(tiny_tokenizer):
    records = load_records(demo_data_path()).records[:12]
    feats, _ = encode_records(records, tiny_tokenizer, "chat", 512)
    assert len({len(f["input_ids"]) for f in feats}) > 3
    return feats


def _loss_and_grads(model, batch, sparse=False):
    model.zero_grad()
    batch = dict(batch)
    if sparse:
        labels = batch.pop("labels")
        loss = sparse_logits_loss(model(**batch, use_cache=False), labels)
    else:
        loss = model(**batch, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=1e-4, atol=1e-5)
    for name, g in a[1].items():
        torch.testing.assert_close(b[1][name], g, rtol=1e-3, atol=1e-6, msg=name)


def test_plan_batches_keeps_every_example_once_within_the_budget():
    lengths = [((i * 37) % 300) + 20 for i in range(500)]
    for packing in (True, False):
        plan = plan_batches(lengths, 1024, packing, seed=1)
        assert sorted(i for b in plan for i in b) == list(range(500))
        for b in plan:
            if packing:
                assert sum(lengths[i] for i in b) <= 1024
            else:
                assert len(b) * (-(-max(lengths[i] for i in b) // 8) * 8) <= 1024
        used = sum(lengths) / (len(plan) * 1024)
        assert used > 0.85, (packing, used)  # few half-empty micro-batches
    with pytest.raises(UsageError, match="batch_tokens"):
        plan_batches([10, 2000], 1024, True)


def test_packed_and_grouped_token_budget_batches_train_the_same_function(tiny_tokenizer, features):
    """One packed row of a fixed length, and mask-free right-padded rows, equal the padded batch with a mask."""
    n_real = sum(len(f["input_ids"]) for f in features)
    padded = DataCollatorForSeq2Seq(tiny_tokenizer, padding=True, label_pad_token_id=-100)(features)
    packed = TokenBudgetCollator(tiny_tokenizer.pad_token_id, packing=True, pack_length=n_real + 37)([features])
    grouped = TokenBudgetCollator(tiny_tokenizer.pad_token_id, packing=False)([features])
    assert packed["input_ids"].shape == (1, n_real + 37) and "attention_mask" not in packed
    assert "attention_mask" not in grouped and grouped["input_ids"].shape[1] % 8 == 0
    assert real_tokens([features]) == real_tokens(features) == n_real
    for attn in ("sdpa", "eager"):
        model = lora_tiny_model(tiny_tokenizer, attn)
        reference = _loss_and_grads(model, padded)
        _assert_same(reference, _loss_and_grads(model, packed))
        _assert_same(reference, _loss_and_grads(model, grouped))


@pytest.mark.parametrize("packing", [False, True])
def test_sparse_logits_give_the_same_loss_and_gradients(tiny_tokenizer, features, packing):
    inner = TokenBudgetCollator(tiny_tokenizer.pad_token_id, packing=packing)
    full, sparse = inner([features]), SparseLogitsCollator(inner)([features])
    n_labels = int((full["labels"] != -100).sum())
    assert int((sparse["labels"] != -100).sum()) == n_labels
    kept = sparse["logits_to_keep"].numel()
    if packing:  # one row: exactly the positions that predict a label
        assert kept == n_labels < full["input_ids"].shape[1] / 4
    else:  # rows share the kept positions: their union
        assert kept < full["input_ids"].shape[1]
    model = lora_tiny_model(tiny_tokenizer)
    _assert_same(_loss_and_grads(model, full), _loss_and_grads(model, sparse, sparse=True))


def test_planned_batches_dataset_yields_whole_micro_batches(features):
    plan = plan_batches([len(f["input_ids"]) for f in features], 600, packing=True)
    data = PlannedBatches(features, plan)
    assert len(data) == len(plan) and sum(len(data[i]) for i in range(len(data))) == len(features)


def test_batch_tokens_must_hold_the_longest_example():
    with pytest.raises(ConfigError, match="train.batch_tokens"):
        load_config(None, ["data.max_length=2048", "train.batch_tokens=1024"])
    with pytest.raises(ConfigError, match="train.batch_tokens"):
        load_config(None, ["train.batch_tokens=0"])


def test_the_trainer_counts_every_sparse_label_once(tiny_config):
    from lawtune.train import setup

    trainer = setup(tiny_config("train.batch_tokens=512", "train.packing=true", "train.sparse_logits=true")).trainer
    items = [trainer.train_dataset[0]]  # one planned micro-batch, as the DataLoader hands it over
    batch = trainer.data_collator(items)
    full = trainer.data_collator.inner.inner(items)  # counting -> sparse logits -> token budget
    assert torch.equal(batch["input_ids"], full["input_ids"])
    true_count = int((full["labels"][:, 1:] != -100).sum())
    assert true_count > 0
    assert int(trainer._get_num_items_in_batch([batch], torch.device("cpu"))) == true_count


def test_trimmed_step_overhead_keeps_flops_and_clears_every_lora_gradient(tiny_config):
    from transformers import Trainer

    from lawtune.train import setup

    parts = setup(tiny_config("train.batch_tokens=512", "train.packing=true", "train.sparse_logits=true"))
    trainer, model = parts.trainer, parts.model
    inputs = {"input_ids": torch.ones(1, 37, dtype=torch.long)}
    assert trainer.floating_point_ops(inputs) == Trainer.floating_point_ops(trainer, inputs) > 0
    batch = next(iter(trainer.get_train_dataloader()))
    batch.pop("labels", None)
    batch.pop("logits_to_keep", None)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    for _optimizer in (None, trainer.create_optimizer()):  # before and after the Trainer made its optimizer
        model(**batch).logits.float().pow(2).mean().backward()
        assert lora and all(p.grad is not None for p in lora)
        model.zero_grad()
        assert all(p.grad is None for p in model.parameters())
    # train() still changes the mode of every module, whether it was set from the top or further down
    model.eval()
    assert not any(m.training for m in model.modules())
    model.train()
    assert all(m.training for m in model.modules())
    dropout_like = [m for m in model.modules()][-1]
    dropout_like.eval()
    model.train()
    assert dropout_like.training

    # the Trainer's clipping step: the norm over all parameters, from the list of trainable ones, without a walk
    model(**batch).logits.float().pow(2).mean().backward()
    expected = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in lora]))
    before = [p.grad.clone() for p in lora]
    walked = []
    model.named_modules = lambda *a, **k: walked.append(1) or torch.nn.Module.named_modules(model, *a, **k)
    trainer.args.max_grad_norm = 1e-3
    norm = trainer._clip_grad_norm(model)
    model.zero_grad(set_to_none=False)  # zeroing the short way walks nothing either
    assert not walked and all(torch.count_nonzero(p.grad) == 0 for p in lora)
    del model.named_modules
    for p, g in zip(lora, before):
        p.grad = g.clone()
    norm = trainer._clip_grad_norm(model)
    assert torch.allclose(norm, expected) and norm > 1e-3
    assert all(torch.allclose(p.grad, g * 1e-3 / (norm + 1e-6), rtol=1e-4) for p, g in zip(lora, before))


def test_ddp_bucket_report_reads_the_wrapper(tiny_config, tmp_path, caplog):
    """When training starts under DDP, rank 0 says how the gradients are bucketed (train.ddp_bucket_cap_mb)."""
    import torch.distributed as dist
    from transformers import TrainerControl, TrainerState

    from lawtune.train import setup

    parts = setup(tiny_config("train.batch_tokens=512", "train.packing=true"))
    trainer, model = parts.trainer, parts.model
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        trainer.model_wrapped = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=3)
        with caplog.at_level("INFO", logger="lawtune"):
            trainer.callback_handler.on_train_begin(trainer.args, TrainerState(), TrainerControl())
        assert "all-reduced in buckets of 3 MiB" in caplog.text
    finally:
        for cb in trainer.callback_handler.callbacks:  # training never ends here: undo what its start froze
            if isinstance(cb, GcPauses):
                cb.on_train_end(trainer.args, TrainerState(), TrainerControl())
        dist.destroy_process_group()


def test_gc_pauses_freezes_what_lives_through_training_and_times_the_full_collections_left(caplog):
    from transformers import TrainerState

    state = TrainerState()
    alive = [[i] for i in range(2000)]  # stands in for the tokenized data set
    cb = GcPauses()
    cb.on_train_begin(None, state, None)
    frozen_at_start = gc.get_freeze_count()
    assert frozen_at_start >= len(alive)  # out of every later collection
    made_in_step_0 = [[i] for i in range(2000)]  # stands in for compiled graphs and optimizer state
    state.global_step = 1
    cb.on_step_end(None, state, None)
    assert gc.get_freeze_count() >= frozen_at_start + len(made_in_step_0)
    state.global_step = 2
    cb.on_step_end(None, state, None)
    gc.collect()  # a full collection during step 3, as Python runs one when enough objects have piled up
    with caplog.at_level(logging.INFO, logger="lawtune"):
        cb.on_train_end(None, state, None)
    assert gc.get_freeze_count() == 0  # unfrozen once training is over
    assert cb.pauses[-1][0] == 2 and not any(step == 1 for step, _ in cb.pauses)  # its own collections not timed
    line = next(r.getMessage() for r in caplog.records if "garbage collections" in r.getMessage())
    assert re.fullmatch(r"\d+ full Python garbage collections during training \(longest: .*\d+ ms at step 2.*\)", line)


def test_liger_falls_back_cleanly_without_a_gpu(tiny_config, caplog):
    from lawtune.train import train

    if torch.cuda.is_available():
        pytest.skip("the fallback is for machines without CUDA")
    with caplog.at_level(logging.WARNING, logger="lawtune"):
        result = train(tiny_config("train.liger=true", "train.packing=true", "train.batch_tokens=1024",
                                   "train.sparse_logits=true", "train.optim=adamw_torch_fused", "train.max_steps=2"))
    assert "train.liger" in caplog.text
    assert result.steps == 2 and result.final_loss > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger's Triton kernels need a CUDA GPU")
def test_liger_kernels_give_the_same_loss_and_gradients_on_gpu(tiny_tokenizer, features):
    pytest.importorskip("liger_kernel")
    from lawtune.train.kernels import apply_liger

    def run(liger: bool):
        torch.manual_seed(0)
        base = build_tiny_model(tiny_tokenizer, hidden_size=128).to("cuda")
        if liger:
            assert apply_liger(base, torch.device("cuda"), fused_cross_entropy=True)
        model = add_lora(base, LoraSection(r=8, alpha=16))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02, generator=torch.Generator("cuda").manual_seed(1))
        batch = {k: v.cuda() for k, v in TokenBudgetCollator(tiny_tokenizer.pad_token_id, packing=False)([features]).items()}
        return _loss_and_grads(model, batch)

    plain, fused = run(False), run(True)
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-4, atol=1e-4)
    for name, g in plain[1].items():
        torch.testing.assert_close(fused[1][name], g, rtol=1e-2, atol=1e-4, msg=name)


def test_static_cache_generates_what_the_dynamic_cache_generates(tiny_model_dir):
    from lawtune.config import GenerationConfig, ModelConfig
    from lawtune.generation import STATIC_CACHE_MIN_TOKENS, generate
    from lawtune.model import load_for_inference

    model, tok = load_for_inference(ModelConfig(path=str(tiny_model_dir), dtype="float32"))

    prompts = ["甲乙丙丁的合同纠纷", "短", "法院认定的证据"]
    seen = []
    hf_generate = model.generate
    model.generate = lambda **kw: seen.append(kw.get("cache_implementation")) or hf_generate(**kw)
    n = STATIC_CACHE_MIN_TOKENS
    # engine off: transformers' generate is what models the engine cannot run go through
    dynamic = generate(model, tok, prompts, n, GenerationConfig(static_cache=False, engine=False))
    static = generate(model, tok, prompts, n, GenerationConfig(static_cache=True, engine=False))
    generate(model, tok, prompts, 8, GenerationConfig(static_cache=True, engine=False))  # short: growing cache
    assert static == dynamic and max(len(out.text) for out in static) > 0
    assert seen == [None, "static", None]
    engine = generate(model, tok, prompts, n, GenerationConfig())  # and the engine writes the same text
    assert [out.text for out in engine] == [out.text for out in static] and seen == [None, "static", None]


def test_packed_block_mask_is_causal_within_each_example(tiny_tokenizer, features):
    """The flex mask lawtune builds from position ids (no GPU sync) is the packed-sequence mask."""
    from torch.nn.attention.flex_attention import create_mask

    from lawtune.train.kernels import install_packed_block_mask, packed_block_mask

    n = sum(len(f["input_ids"]) for f in features[:5]) + 50
    batch = TokenBudgetCollator(tiny_tokenizer.pad_token_id, packing=True, pack_length=n)([features[:5]])
    positions = batch["position_ids"]
    block = packed_block_mask(positions)
    dense = create_mask(block.mask_mod, 1, 1, n, n, device="cpu")[0, 0]
    doc = (positions[0] == 0).cumsum(0)
    expected = (doc[:, None] == doc[None, :]) & torch.ones(n, n, dtype=torch.bool).tril()
    assert doc[-1] == 6  # five examples and the padding tail
    assert torch.equal(dense, expected)

    seen = {}
    model = torch.nn.Module()
    model.forward = lambda **kw: seen.update(kw)
    install_packed_block_mask(model)
    model.train()
    model(input_ids=batch["input_ids"], position_ids=positions)
    assert type(seen["attention_mask"]).__name__ == "BlockMask"
    model.eval()  # evaluation (generation) keeps transformers' own masks
    seen.clear()
    model(input_ids=batch["input_ids"], position_ids=positions)
    assert "attention_mask" not in seen


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex attention trains only on a GPU")
def test_flex_packed_training_equals_padded_sdpa_on_gpu(tiny_tokenizer, features):
    from lawtune.train.kernels import install_packed_block_mask

    n_real = sum(len(f["input_ids"]) for f in features)
    padded = DataCollatorForSeq2Seq(tiny_tokenizer, padding=True, label_pad_token_id=-100)(features)
    packed = TokenBudgetCollator(tiny_tokenizer.pad_token_id, packing=True, pack_length=n_real + 100)([features])
    reference = _loss_and_grads(lora_tiny_model(tiny_tokenizer).cuda(), {k: v.cuda() for k, v in padded.items()})
    model = lora_tiny_model(tiny_tokenizer, "flex_attention").cuda()
    install_packed_block_mask(model)
    model.train()
    _assert_same(reference, _loss_and_grads(model, {k: v.cuda() for k, v in packed.items()}))


def test_liger_changes_only_the_given_model_not_the_transformers_module(tiny_tokenizer, monkeypatch):
    """Liger's patch functions also replace classes module-wide; apply_liger puts those back."""
    import sys
    import types

    from lawtune.demo import build_tiny_model
    from lawtune.train.kernels import apply_liger

    model = build_tiny_model(tiny_tokenizer)
    module = sys.modules[type(model).__module__]
    original_mlp = module.Qwen2MLP

    def fake_apply(model, **kwargs):  # what liger does: a module-wide swap plus the instance's own modules
        module.Qwen2MLP = type("LigerLikeMLP", (torch.nn.Module,), {})
        model.model.norm.patched = True

    fake = types.ModuleType("liger_kernel.transformers")
    fake._apply_liger_kernel_to_instance = fake_apply
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    assert apply_liger(model, torch.device("cuda"), fused_cross_entropy=False)
    assert module.Qwen2MLP is original_mlp
    assert model.model.norm.patched
