"""The folded inference copy of a LoRA model (generation/folded.py) and the engine holder that samples from it:
the copy computes what the adapted model computes, follows the adapter as it trains, shares what has no adapter, and
is left out where the adapter cannot be folded."""

import pytest
import torch

from lawtune.generation.engine import EngineHolder, SamplingParams
from lawtune.generation.folded import fold_adapter

from conftest import lora_tiny_model

IDS = torch.tensor([[5, 17, 42, 8, 99, 3, 250, 61]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


def nudge_adapter(model, scale: float = 0.05, seed: int = 1) -> None:
    """Change every LoRA matrix in place, as an optimizer step does."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g).to(p.device) * scale)


def test_the_folded_copy_computes_what_the_adapted_model_computes(tiny_tokenizer):
    model = lora_tiny_model(tiny_tokenizer).eval()
    folded = fold_adapter(model)
    assert folded is not None and folded.model is not model
    torch.testing.assert_close(logits(folded.model), logits(model), rtol=1e-4, atol=1e-4)
    with model.disable_adapter():  # the adapter changes the output, so the check above could fail
        assert (logits(model) - logits(folded.model)).abs().max() > 1e-3
    # nothing without an adapter is copied; each adapted projection is a plain Linear of its own
    base = model.get_base_model()
    assert folded.model.model.embed_tokens is base.model.embed_tokens and folded.model.lm_head is base.lm_head
    assert folded.model.model.layers[0].input_layernorm is base.model.layers[0].input_layernorm
    q = folded.model.model.layers[0].self_attn.q_proj
    assert type(q) is torch.nn.Linear and q.bias is base.model.layers[0].self_attn.q_proj.base_layer.bias
    assert not q.weight.requires_grad
    assert len(folded.pairs) == sum(1 for n, _ in base.named_modules() if n.endswith("q_proj")) * 7


def test_refresh_follows_the_adapter_and_leaves_the_base_weights_alone(tiny_tokenizer):
    model = lora_tiny_model(tiny_tokenizer).eval()
    folded = fold_adapter(model)
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    before = logits(folded.model)
    nudge_adapter(model)
    torch.testing.assert_close(logits(folded.model), before)  # not refreshed yet: the old adapter
    folded.refresh()
    torch.testing.assert_close(logits(folded.model), logits(model), rtol=1e-4, atol=1e-4)
    assert (logits(folded.model) - before).abs().max() > 1e-3
    for name, p in model.named_parameters():
        if "base_layer" in name:
            assert torch.equal(p, base_weights[name]), name


def test_a_copy_made_under_inference_mode_can_be_refreshed_outside_it(tiny_tokenizer):
    model = lora_tiny_model(tiny_tokenizer).eval()
    with torch.inference_mode():
        folded = fold_adapter(model)
    nudge_adapter(model)
    folded.refresh()  # an inference tensor would refuse this in-place write
    torch.testing.assert_close(logits(folded.model), logits(model), rtol=1e-4, atol=1e-4)


def test_dora_folds_to_what_its_forward_computes(tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    from lawtune.config import PROJECTIONS
    from lawtune.demo import build_tiny_model

    torch.manual_seed(0)
    model = get_peft_model(build_tiny_model(tiny_tokenizer),
                           LoraConfig(r=4, lora_alpha=8, target_modules=list(PROJECTIONS), use_dora=True)).eval()
    nudge_adapter(model, scale=0.1)  # B non-zero, and magnitudes off the base's row norms
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.rand(p.shape))
    folded = fold_adapter(model)
    assert folded is not None
    torch.testing.assert_close(logits(folded.model), logits(model), rtol=1e-4, atol=1e-4)
    with model.disable_adapter():
        assert (logits(model) - logits(folded.model)).abs().max() > 1e-3


def test_what_cannot_be_folded_is_sampled_as_it_is(tiny_tokenizer, caplog):
    from peft import LoraConfig, get_peft_model

    from lawtune.demo import build_tiny_model

    assert fold_adapter(build_tiny_model(tiny_tokenizer)) is None  # no adapter: nothing to fold
    embedded = get_peft_model(build_tiny_model(tiny_tokenizer), LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    with caplog.at_level("INFO", logger="lawtune"):
        assert fold_adapter(embedded) is None
    assert "unfolded (Embedding on Embedding)" in caplog.text
    merged = lora_tiny_model(tiny_tokenizer)
    merged.merge_adapter()
    assert fold_adapter(merged) is None


def _greedy(holder, model, prompt, n=8):
    engine = holder.get(model, 2, 64)
    return engine, engine.generate([(prompt, SamplingParams(max_new_tokens=n, ignore_eos=True), None)])[0].samples[0].tokens


def test_a_folding_holder_samples_the_adapter_as_it_is_at_each_call(tiny_tokenizer):
    model = lora_tiny_model(tiny_tokenizer).eval()
    prompt = tiny_tokenizer("物权问题：甲与乙的物权纠纷", add_special_tokens=False)["input_ids"]
    with EngineHolder(tiny_tokenizer.eos_token_id, fold=True) as folding, EngineHolder(tiny_tokenizer.eos_token_id) as live:
        engine, folded_tokens = _greedy(folding, model, prompt)
        assert engine.model is not model and engine.model is folding.folded[1].model
        assert folded_tokens == _greedy(live, model, prompt)[1]
        nudge_adapter(model, scale=0.5)
        again, after = _greedy(folding, model, prompt)
        assert again is engine  # the same engine (its graphs point at the copy's weights, refreshed in place)
        assert after == _greedy(live, model, prompt)[1] and after != folded_tokens
    assert folding.folded is None  # closing lets the copy go


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the engine's graphs, fused step and kernel need a GPU")
def test_on_a_gpu_the_folded_copy_samples_what_the_adapter_samples(tiny_tokenizer):
    """The GPU engine (graphs, the compiled step, the length-aware kernel) on the folded copy, in float32 where the
    fold is exact up to rounding: the tokens of the adapted model, before and after the adapter changes."""
    model = lora_tiny_model(tiny_tokenizer).to("cuda").eval()
    prompts = [tiny_tokenizer(t, add_special_tokens=False)["input_ids"]
               for t in ("物权问题：甲与乙的物权纠纷", "合同", "继承问题：甲死亡后", "法院认为当事人")]
    requests = [(p, SamplingParams(max_new_tokens=24, temperature=t, seed=3, ignore_eos=True), str(i))
                for i, p in enumerate(prompts) for t in (0.0, 0.8)]
    with EngineHolder(tiny_tokenizer.eos_token_id, fold=True) as folding, EngineHolder(tiny_tokenizer.eos_token_id) as live:
        for _ in range(2):
            folded = [r.samples[0].tokens for r in folding.get(model, 8, 64).generate(requests)]
            assert folding.engine is not None and folding.engine.model is not model
            assert folded == [r.samples[0].tokens for r in live.get(model, 8, 64).generate(requests)]
            nudge_adapter(model, scale=0.5)
