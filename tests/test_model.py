"""An adapter is loaded only on the base model it was trained on (issue 15, item 7)."""

import json
import shutil
from pathlib import Path

import pytest

from lawtune.cli import main
from lawtune.demo import build_tiny_model, demo_data_path
from lawtune.train import train


@pytest.fixture
def trained_adapter(tiny_config, tmp_path):
    return train(tiny_config("train.max_steps=1", "train.save_steps=1")).final_model


def _eval(model_dir, adapter, tmp_path, *extra):
    return main(["eval", "--model", str(model_dir), "--adapter", str(adapter), "--data", str(demo_data_path()),
                 "--max-samples", "2", "--output", str(tmp_path / "r.json"), "model.dtype=float32", *extra])


def test_the_manifest_records_the_base_and_the_same_base_loads(trained_adapter, tiny_model_dir, tmp_path):
    base = json.loads((tmp_path / "run" / "final_model" / "data_manifest.json").read_text(encoding="utf-8"))["base_model"]
    assert base["architecture"] == "Qwen2ForCausalLM" and base["hidden_size"] == 64 and len(base["embedding_probe"]) == 32
    assert _eval(tiny_model_dir, trained_adapter, tmp_path) == 0


def test_another_checkpoint_of_the_same_architecture_and_tokenizer_is_refused_unless_forced(
        trained_adapter, tiny_tokenizer, tmp_path, capsys):
    other = tmp_path / "other_seed"
    build_tiny_model(tiny_tokenizer, hidden_size=64, layers=2, seed=1).save_pretrained(other)
    tiny_tokenizer.save_pretrained(other)
    capsys.readouterr()
    assert _eval(other, trained_adapter, tmp_path) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "another base model" in err and "embedding weights" in err and "--force" in err
    assert not (tmp_path / "r.json").exists()
    assert _eval(other, trained_adapter, tmp_path, "--force") == 0


def test_a_model_with_the_real_vocabulary_is_refused_although_the_shapes_fit(trained_adapter, real_tokenizer, tmp_path,
                                                                            capsys):
    """The issue's case: the demo-sized adapter (LoRA shapes depend on the hidden size only) on a model with the
    real 151,936-token vocabulary loaded with exit 0."""
    real = tmp_path / "real_vocab"
    build_tiny_model(real_tokenizer, hidden_size=64, layers=2).save_pretrained(real)
    real_tokenizer.save_pretrained(real)
    capsys.readouterr()
    assert _eval(real, trained_adapter, tmp_path) == 2
    err = capsys.readouterr().err.strip()
    assert "another base model" in err and "vocabulary" in err and len(err.splitlines()) == 1


def test_an_adapter_without_a_recorded_base_is_judged_by_its_tokenizer(trained_adapter, real_tokenizer, tiny_model_dir,
                                                                       tmp_path, capsys):
    """Adapters trained before the base was recorded still carry their tokenizer."""
    from pathlib import Path

    manifest = Path(trained_adapter) / "data_manifest.json"
    data = json.loads(manifest.read_text(encoding="utf-8"))
    del data["base_model"]
    manifest.write_text(json.dumps(data), encoding="utf-8")
    assert _eval(tiny_model_dir, trained_adapter, tmp_path) == 0
    real = tmp_path / "real_vocab"
    build_tiny_model(real_tokenizer, hidden_size=64, layers=2).save_pretrained(real)
    real_tokenizer.save_pretrained(real)
    capsys.readouterr()
    assert _eval(real, trained_adapter, tmp_path) == 2
    assert "tokenizer size" in capsys.readouterr().err


def test_merge_refuses_another_base_unless_told(trained_adapter, tiny_tokenizer, tmp_path, capsys):
    other = tmp_path / "other_seed"
    build_tiny_model(tiny_tokenizer, hidden_size=64, layers=2, seed=1).save_pretrained(other)
    tiny_tokenizer.save_pretrained(other)
    args = ["merge", "--model", str(other), "--adapter", str(trained_adapter), "--output", str(tmp_path / "m")]
    assert main(args) == 2 and "another base model" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
    assert main([*args, "--force-base"]) == 2  # the old name is refused with the new one named
    assert "--force-base is now --force" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0


@pytest.fixture
def no_hub(monkeypatch):
    """A hub that refuses connections at once (a closed port on loopback), and an empty cache."""
    from huggingface_hub import constants

    from lawtune.model import model_source

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(Path(__file__).parent / "no-such-cache"))
    model_source.cache_clear()
    yield
    model_source.cache_clear()


@pytest.mark.parametrize("command", [["eval", "--data", str(demo_data_path())], ["merge", "--adapter", "a", "--output", "o"]])
def test_an_unreachable_hub_id_fails_at_once_in_one_line(command, no_hub, capsys):
    rc = main([command[0], "--model", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", *command[1:]])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "neither a local model directory nor reachable" in err and "--model DIR" in err


def test_offline_a_hub_id_in_the_cache_loads_from_it(no_hub, tiny_model_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from lawtune.model import model_source

    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / "0123abc"
    shutil.copytree(tiny_model_dir, snapshot)
    (tmp_path / "hub" / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--tiny" / "refs" / "main").write_text("0123abc")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert Path(model_source("org/tiny")) == snapshot


def test_merge_names_the_missing_folder(tiny_model_dir, tmp_path, capsys):
    assert main(["merge", "--model", str(tmp_path / "nope"), "--adapter", "a", "--output", str(tmp_path / "o")]) == 2
    assert "nope: model directory does not exist" in capsys.readouterr().err
    assert main(["merge", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "gone"),
                 "--output", str(tmp_path / "o")]) == 2
    assert "gone: adapter directory does not exist" in capsys.readouterr().err


def test_a_folded_adapter_gives_the_unfolded_adapters_logits_without_its_modules(adapter_dir, tiny_model_dir):
    """adapter.fold: the LoRA update folded into the base weights at load (float32: the same logits), so no step runs
    the adapter's own matrices; the adapter still changes the output."""
    import torch

    from lawtune.config import ModelConfig
    from lawtune.model import load_for_inference

    mcfg = ModelConfig(path=str(tiny_model_dir), dtype="float32")
    ids = torch.tensor([[3, 9, 27, 81, 50]])
    logits = {}
    for fold in (False, True):
        model, _ = load_for_inference(mcfg, str(adapter_dir), force=True, fold=fold)
        lora = [m for m in model.modules() if hasattr(m, "merged") and hasattr(m, "lora_A")]
        assert lora and all(m.merged is fold for m in lora)
        with torch.no_grad():
            logits[fold] = model(ids).logits
    base, _ = load_for_inference(mcfg)
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, logits[True], atol=1e-3)
    assert torch.allclose(logits[True], logits[False], atol=1e-5)


def test_an_adapter_whose_module_trained_in_full_does_not_fit_the_base_is_refused(tiny_model_dir, tmp_path):
    """lora.modules_to_save: the saved lm_head replaces the base's, so its shape is checked too (the LoRA matrices of
    an adapter for a model with a larger vocabulary fit this one)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lawtune.model import ModelError, check_adapter

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    other = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    other.resize_token_embeddings(other.config.vocab_size + 8)
    for model, name in ((base, "fits"), (other, "larger")):
        get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])).save_pretrained(
            tmp_path / name)
    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    check_adapter(tmp_path / "fits", fresh)
    vocab = fresh.config.vocab_size
    with pytest.raises(ModelError, match=rf"its lm_head.weight is \[{vocab + 8}, 64\], the base model's \[{vocab}, 64\]"):
        check_adapter(tmp_path / "larger", fresh)
    config = json.loads((tmp_path / "fits" / "adapter_config.json").read_text(encoding="utf-8"))
    (tmp_path / "fits" / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["score"]}))
    with pytest.raises(ModelError, match="adapter targets score, which the base model does not have"):
        check_adapter(tmp_path / "fits", fresh)
