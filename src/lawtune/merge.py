"""`lawtune merge`: fold a LoRA adapter into its base weights for serving engines (vLLM etc.).

The result is a plain transformers model directory (safetensors, tokenizer, generation config) with no
PEFT keys left; it is reloaded with ``AutoModelForCausalLM`` before it replaces the output directory.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import cast

import torch

from .card import write_card
from .config import MergeRun, ModelConfig
from .model import ModelError, load_for_inference, model_source, quiet_loading
from .rundir import MERGE_INFO, adapter_prompt_format, adapter_quantization, adapter_sha256, give_weights_default_mode


def _checkpoint_dtype(path: str) -> torch.dtype:
    from transformers import AutoConfig

    source = model_source(path)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot read the model config ({str(exc).splitlines()[0]})") from None
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _safetensors_keys(directory: Path) -> list[str]:
    from safetensors import safe_open

    keys: list[str] = []
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            keys += list(fh.keys())
    return keys


def merge_adapter(cfg: MergeRun, overwrite: bool = False, say=print) -> dict:
    """`lawtune merge`: fold the LoRA update into the base weights and save a plain HF model directory.

    The merge runs in float32 on the CPU and the result is saved in the base checkpoint's dtype (or
    ``dtype``). A QLoRA adapter is merged into the unquantised base, never into 4-bit weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, adapter, dtype, force_base = cfg.model.path, cfg.adapter.path, cfg.merge.dtype, cfg.adapter.force
    if not base or not cfg.merge.output:
        raise ModelError(f"{'model.path' if not base else 'merge.output'}: required (pass --model, --adapter and --output)")
    out = Path(cfg.merge.output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        hint = " (--force only skips the adapter/base check)" if force_base else ""
        raise ModelError(f"{out}: already exists and is not empty (pass --overwrite to replace it{hint})")
    if not adapter:
        raise ModelError("adapter.path: required (pass --adapter)")
    quantization = adapter_quantization(adapter)
    if quantization == "4bit":
        say(f"note: {adapter} is a QLoRA adapter (trained on a 4-bit base); merging it into the unquantised "
            f"base weights, not into 4-bit ones (outputs can differ slightly from base-4bit + adapter)")
    save_dtype = getattr(torch, dtype) if dtype else _checkpoint_dtype(base)
    quiet_loading()
    model, _ = load_for_inference(ModelConfig(path=base, dtype="float32", quantization="none"), adapter,
                                  device=torch.device("cpu"), force=force_base)
    merged = model.merge_and_unload()
    merged.to(save_dtype)
    merged.config.dtype = save_dtype
    tokenizer_source = adapter if (Path(adapter) / "tokenizer_config.json").is_file() else base
    tokenizer = AutoTokenizer.from_pretrained(model_source(tokenizer_source))

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    give_weights_default_mode(tmp)
    keys = _safetensors_keys(tmp)
    bad = [k for k in keys if "lora" in k.lower() or "base_model.model" in k]
    if not keys or bad:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelError(f"{out}: merged weights still hold PEFT keys ({', '.join(bad[:3])})" if bad
                         else f"{out}: no safetensors weights were written")
    # Reload as a plain transformers model: every weight must come back exactly as merged.
    # output_loading_info=True makes from_pretrained return (model, loading info); its annotation says model only.
    reloaded, info = cast(tuple[torch.nn.Module, dict],
                          AutoModelForCausalLM.from_pretrained(tmp, dtype=save_dtype, output_loading_info=True))
    problems = [f"missing {k}" for k in info.get("missing_keys") or []]
    problems += [f"unexpected {k}" for k in info.get("unexpected_keys") or []]
    expected = merged.state_dict()
    problems += [f"changed {k}" for k, v in reloaded.state_dict().items() if k in expected and not torch.equal(v, expected[k])]
    if problems:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelError(f"{out}: the saved model does not reload as merged ({', '.join(problems[:3])})")
    del reloaded
    # adapter_sha256: what `eval`, `serve`... compare an adapter given with this model against (it is merged already)
    info_out = {"base_model": str(base), "adapter": str(adapter), "adapter_sha256": adapter_sha256(adapter),
                "working_dir": os.getcwd(), "prompt_format": adapter_prompt_format(adapter) or "chat",
                "adapter_quantization": quantization, "dtype": str(save_dtype).replace("torch.", "")}
    (tmp / MERGE_INFO).write_text(json.dumps(info_out, ensure_ascii=False, indent=1), encoding="utf-8")
    write_card(tmp, name=out.name)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return {**info_out, "output": str(out), "tensors": len(keys)}
