"""lawtune merge: the merged model is a plain transformers model that says what base + adapter says."""

import json
import shutil

import torch

from conftest import synthetic_records
from lawtune import infer
from lawtune.rundir import resolve_prompt_format
from lawtune.cli import main
from lawtune.config import GenerationConfig, ModelConfig
from lawtune.generation import generate
from lawtune.model import load_for_inference
from lawtune.prompts import render_prompt


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
    assert main(["merge", "--model", str(tiny_model_dir), "--adapter", str(adapter_dir), "--output", str(out)]) == 2
    assert "--force" in capsys.readouterr().err


def test_qlora_adapter_is_merged_into_the_unquantised_base(tiny_model_dir, adapter_dir, tmp_path, capsys):
    from safetensors import safe_open

    qlora = tmp_path / "qlora"
    shutil.copytree(adapter_dir, qlora)
    (qlora / "lawtune_config.yaml").write_text("model:\n  quantization: 4bit\ndata:\n  prompt_format: plain\n")
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(tiny_model_dir), "--adapter", str(qlora), "--output", str(out),
                 "--dtype", "bfloat16"]) == 0
    said = capsys.readouterr().out
    assert "QLoRA" in said and "unquantised" in said
    with safe_open(str(next(out.glob("*.safetensors"))), framework="pt") as fh:
        assert {fh.get_tensor(k).dtype for k in fh.keys()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert resolve_prompt_format(str(out), None) == "plain"  # the merged model keeps the adapter's format


