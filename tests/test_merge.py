"""lawtune merge: the merged model is a plain transformers model that says what base + adapter says."""

import hashlib
import json
import os
import stat

import pytest
import torch

from lawtune import infer
from lawtune.cli import main
from lawtune.config import GenerationConfig, ModelConfig
from lawtune.demo import demo_data_path
from lawtune.generation import generate
from lawtune.model import load_for_inference
from lawtune.prompts import render_prompt
from lawtune.rundir import resolve_prompt_format

from conftest import synthetic_records


def _greedy(model, tokenizer, n_tokens=10):
    records = [infer.record_from_fields(r["statement"], r["option_list"]) for r in synthetic_records(3, seed=5)]
    prompts = [render_prompt(r, tokenizer, "chat", think=True) for r in records]
    return [out.text for out in generate(model, tokenizer, prompts, n_tokens, GenerationConfig())]


def test_merged_model_generates_what_base_plus_adapter_generates(tiny_model_dir, adapter_dir, tmp_path, capsys):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    assert main(["merge", "--model", str(tiny_model_dir), "--adapter", str(adapter_dir), "--output", str(out)]) == 0
    files = sorted(out.glob("*.safetensors"))
    assert files and (out / "config.json").is_file() and (out / "generation_config.json").is_file()
    assert (out / "tokenizer_config.json").is_file() and not (out / "adapter_config.json").exists()
    for file in files:
        with safe_open(str(file), framework="pt") as fh:
            keys = list(fh.keys())
            assert keys and not [k for k in keys if "lora" in k.lower() or "base_model.model" in k]
            assert {fh.get_tensor(k).dtype for k in keys} == {torch.float32}  # the base's dtype
    assert isinstance(AutoModelForCausalLM.from_pretrained(out), torch.nn.Module)

    mcfg = ModelConfig(path=str(tiny_model_dir), dtype="float32")
    with_adapter = _greedy(*load_for_inference(mcfg, str(adapter_dir)))
    merged = _greedy(*load_for_inference(ModelConfig(path=str(out), dtype="float32")))
    base = _greedy(*load_for_inference(mcfg))
    assert merged == with_adapter
    assert base != with_adapter  # the adapter matters, so equality above means the update was merged

    capsys.readouterr()
    again = ["merge", "--model", str(tiny_model_dir), "--adapter", str(adapter_dir), "--output", str(out)]
    assert main(again) == 2
    assert "pass --overwrite to replace it" in capsys.readouterr().err
    assert main([*again, "--force"]) == 2  # merge's old --force: now the base check's, with a hint
    assert "--force only skips the adapter/base check" in capsys.readouterr().err
    assert main([*again, "--overwrite"]) == 0


def _nf4_base(model_dir):
    """The tiny base loaded the way lawtune's QLoRA loads it (nf4, double quantisation), here on the CPU: bitsandbytes
    0.50 runs 4-bit layers there. load_base_model itself refuses 4-bit without CUDA, so the test loads it directly."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, device_map={"": "cpu"},
                                                 dtype=torch.float32)
    # On a CPU with AVX512-BF16, bitsandbytes (>= 0.49) repacks a 4-bit weight for its bf16 inference kernel at the
    # first forward in eval mode without grad, and keeps it that way: a later training forward then goes through that
    # kernel, which has no backward. The test trains after evaluating, so it keeps the fp32 path on every CPU.
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_qlora_adapter_is_merged_into_the_unquantised_base(tiny_model_dir, tmp_path, capsys):
    """A LoRA trained on a real nf4-quantised base (lawtune's add_lora(quantized=True): peft's
    prepare_model_for_kbit_training), merged by `lawtune merge` into the unquantised fp32 base: the merged model is
    exactly fp32 base + adapter, and it differs from what was trained (nf4 base + adapter) by no more than the
    base's own nf4 rounding does."""
    import bitsandbytes as bnb
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lawtune.config import PROJECTIONS, LoraSection
    from lawtune.model import add_lora, base_fingerprint

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    fp32_base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    nf4_base = _nf4_base(tiny_model_dir)
    quantised = {name for name, m in nf4_base.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert {name.rsplit(".", 1)[-1] for name in quantised} == set(PROJECTIONS)  # every LoRA target is 4-bit
    assert nf4_base.model.layers[0].mlp.down_proj.weight.quant_state.quant_type == "nf4"
    fingerprint = base_fingerprint(nf4_base, tokenizer)  # what a QLoRA run records (embeddings stay fp32)

    text = "".join(r["statement"] for r in synthetic_records(8, seed=7))
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"][:64]).view(4, 16)
    base_logits, nf4_logits = _logits(fp32_base, ids), _logits(nf4_base, ids)
    rounding = (nf4_logits - base_logits).norm()  # what nf4 alone changes in this model's logits
    assert rounding > 0

    # Train the LoRA on the 4-bit base (B starts non-zero, so the adapter matters from the first step).
    torch.manual_seed(0)
    qlora = add_lora(nf4_base, LoraSection(r=8, alpha=16), quantized=True)
    lora_layers = [qlora.get_base_model().get_submodule(name) for name in quantised]
    assert all(isinstance(layer.base_layer, bnb.nn.Linear4bit) for layer in lora_layers)
    for name, param in qlora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    optimizer = torch.optim.AdamW([p for p in qlora.parameters() if p.requires_grad], lr=1e-2)
    qlora.train()
    losses = []
    for _ in range(3):
        loss = qlora(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]  # gradients flowed through the 4-bit layers into the LoRA weights
    trained = _logits(qlora, ids)  # what the QLoRA run would serve: nf4 base + adapter
    adapter = tmp_path / "qlora"
    qlora.save_pretrained(adapter)
    (adapter / "lawtune_config.yaml").write_text("model:\n  quantization: 4bit\ndata:\n  prompt_format: plain\n")
    (adapter / "data_manifest.json").write_text(json.dumps({"base_model": fingerprint}))

    out = tmp_path / "merged"
    assert main(["merge", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--output", str(out)]) == 0
    said = capsys.readouterr().out
    assert "QLoRA" in said and "unquantised" in said
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in name.lower() or isinstance(m, bnb.nn.Linear4bit) for name, m in merged.named_modules())
    merged_logits = _logits(merged, ids)

    # Merged into the fp32 weights, not into dequantised nf4 ones: exactly fp32 base + adapter.
    fp32_again = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    unmerged = _logits(PeftModel.from_pretrained(fp32_again, adapter), ids)
    torch.testing.assert_close(merged_logits, unmerged, rtol=1e-4, atol=1e-4)
    # Against the trained QLoRA model the only difference left is the base's nf4 rounding...
    error = (merged_logits - trained).norm()
    assert error <= 1.5 * rounding, (float(error), float(rounding))
    # ...which is far smaller than what the adapter does, so a merge that lost the adapter could not pass.
    assert (base_logits - trained).norm() > 3 * rounding
    assert (nf4_logits - trained).norm() > 3 * rounding

    # The saved dtype and the prompt format: --dtype bfloat16 writes bf16 weights, the adapter's format is kept.
    bf16 = tmp_path / "merged_bf16"
    assert main(["merge", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--output", str(bf16),
                 "--dtype", "bfloat16"]) == 0
    with safe_open(str(next(bf16.glob("*.safetensors"))), framework="pt") as fh:
        assert {fh.get_tensor(k).dtype for k in fh.keys()} == {torch.bfloat16}
    assert json.loads((bf16 / "config.json").read_text())["dtype"] == "bfloat16"
    assert resolve_prompt_format(str(bf16), None) == "plain"  # the merged model keeps the adapter's format


@pytest.fixture(scope="module")
def merged_dir(tiny_model_dir, adapter_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged_home") / "merged"
    assert main(["merge", "--model", str(tiny_model_dir), "--adapter", str(adapter_dir), "--output", str(out)]) == 0
    return out


def test_the_merged_model_records_the_adapters_weights_and_writes_them_with_the_usual_mode(merged_dir, adapter_dir):
    info = json.loads((merged_dir / "lawtune_merge.json").read_text(encoding="utf-8"))
    weights = (adapter_dir / "adapter_model.safetensors").read_bytes()
    assert info["adapter_sha256"] == hashlib.sha256(weights).hexdigest()
    # every file as the other files lawtune writes (0644 under the usual umask), the weights included
    modes = {file.name: stat.S_IMODE(file.stat().st_mode) for file in merged_dir.iterdir()}
    assert len(set(modes.values())) == 1, modes
    assert any(name.endswith(".safetensors") for name in modes)
    assert modes["config.json"] == 0o666 & ~_umask()


def test_the_merged_model_gets_lawtunes_card_not_a_template(merged_dir, adapter_dir):
    from huggingface_hub import ModelCard

    card = ModelCard.load(merged_dir / "README.md")
    info = json.loads((merged_dir / "lawtune_merge.json").read_text(encoding="utf-8"))
    # a plain transformers model now, on a local base (no hub id to name)
    assert card.data.library_name == "transformers" and card.data.base_model is None
    assert "[More Information Needed]" not in card.content and info["adapter_sha256"] in card.text
    assert "merged-lora" in card.data.tags and card.data.model_name == merged_dir.name


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _args(command: str, model, adapter, tmp_path) -> list[str]:
    data, out = tmp_path / "two.jsonl", str(tmp_path / "out.json")
    data.write_text("".join(demo_data_path().read_text(encoding="utf-8").splitlines(keepends=True)[:2]), encoding="utf-8")
    return {"eval": ["eval", "--data", str(data), "--output", out],
            "predict": ["predict", "--data", str(data), "--output", out],
            "distill": ["distill", "--data", str(data), "--output", out, "--samples", "2", "--max-new-tokens", "8"],
            "ask": ["ask", "--question", "题干\nA. 甲\nB. 乙"]}[command] + [
        "--model", str(model), "--adapter", str(adapter), "model.dtype=float32"]


@pytest.mark.parametrize("command", ["eval", "predict", "distill", "ask"])
def test_an_adapter_is_refused_on_the_model_it_was_merged_into(command, merged_dir, adapter_dir, tmp_path, capsys):
    capsys.readouterr()
    assert main(_args(command, merged_dir, adapter_dir, tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already merged into" in err and "--force" in err, err
    assert not (tmp_path / "out.json").exists()


def test_merged_check_is_for_that_adapter_only_and_force_overrides_it(merged_dir, adapter_dir, tiny_model_dir,
                                                                      tmp_path):
    from transformers import AutoModelForCausalLM

    from conftest import make_adapter

    other = make_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "other", seed=1)
    assert main(_args("eval", merged_dir, other, tmp_path)) == 0  # another adapter on the merged model: its business
    assert main(_args("eval", tiny_model_dir, adapter_dir, tmp_path)) == 0  # the adapter on its base
    assert main([*_args("eval", merged_dir, adapter_dir, tmp_path), "--force"]) == 0


def test_grpo_refuses_to_continue_an_adapter_on_the_model_it_was_merged_into(merged_dir, adapter_dir):
    from lawtune.config import GrpoRun, load_config
    from lawtune.model import ModelError
    from lawtune.train.grpo import load_policy

    cfg = load_config(None, [f"model.path={merged_dir}", f"grpo.adapter={adapter_dir}", "model.dtype=float32"],
                      run_cls=GrpoRun)
    with pytest.raises(ModelError, match="already merged into"):
        load_policy(cfg, torch.device("cpu"))
    forced = load_config(None, [f"model.path={merged_dir}", f"grpo.adapter={adapter_dir}", "model.dtype=float32",
                                "grpo.force=true"], run_cls=GrpoRun)
    assert load_policy(forced, torch.device("cpu"))[0] is not None
