"""Base model, tokenizer and LoRA adapters: loading, device and dtype choice."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .config import LoraSection, ModelConfig

log = logging.getLogger("lawtune")


class ModelError(ValueError):
    """The model or adapter cannot be used as asked; the message says why in one line."""


def resolve_device(mcfg: ModelConfig) -> torch.device:
    if torch.cuda.is_available():
        index = mcfg.gpu if mcfg.gpu is not None else 0
        if index >= torch.cuda.device_count():
            raise ModelError(f"model.gpu: GPU {index} requested but only {torch.cuda.device_count()} visible")
        return torch.device("cuda", index)
    if mcfg.gpu is not None:
        raise ModelError(f"model.gpu: GPU {mcfg.gpu} requested but no CUDA GPU is visible")
    return torch.device("cpu")


def resolve_dtype(mcfg: ModelConfig, device: torch.device) -> torch.dtype:
    if mcfg.dtype != "auto":
        return getattr(torch, mcfg.dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # bf16 matmuls on this class of CPU run ~30x slower than fp32.
    return torch.float32


def check_model_path(path: str) -> None:
    """A hub id is 'org/name'; anything that looks like a filesystem path must exist."""
    looks_local = path.startswith(("/", ".", "~")) or path.count("/") > 1 or "\\" in path
    if looks_local and not Path(path).expanduser().exists():
        raise ModelError(f"{path}: model directory does not exist (pass a local model directory or a hub id)")


def load_tokenizer(path: str, padding_side: str = "right"):
    check_model_path(str(path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot load a tokenizer ({str(exc).splitlines()[0]})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def quiet_loading() -> None:
    """No weight-loading progress bars: a refusal must stay one line on stderr."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def load_base_model(mcfg: ModelConfig, path: str | None = None, device: torch.device | None = None,
                    use_cache: bool | None = None):
    """The frozen base model on its device (or spread by device_map), in the resolved dtype.

    ``use_cache`` False builds the model without a KV cache (training); None keeps the checkpoint's setting."""
    path = path or mcfg.path
    if not path:
        raise ModelError("model.path: no base model given (pass --model DIR or model=DIR)")
    check_model_path(str(path))
    device = device or resolve_device(mcfg)
    dtype = resolve_dtype(mcfg, device)
    kwargs: dict = {"dtype": dtype, "attn_implementation": mcfg.attn_implementation}
    if use_cache is not None:
        kwargs["use_cache"] = use_cache
    if mcfg.quantization == "4bit":
        if device.type != "cuda":
            raise ModelError("model.quantization: 4bit (QLoRA) needs a CUDA GPU")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        kwargs["device_map"] = mcfg.device_map or {"": device.index or 0}
    elif mcfg.device_map:
        kwargs["device_map"] = mcfg.device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot load the model ({str(exc).splitlines()[0]})") from None
    if "device_map" not in kwargs:
        model.to(device)
    return model


def add_lora(model, lcfg: LoraSection, quantized: bool = False, peft_class=None):
    """The model with fresh LoRA adapters; ``peft_class`` (a PeftModelForCausalLM subclass) wraps it instead of
    peft's own class."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in lcfg.target_modules if m not in present]
    if missing:
        raise ModelError(f"lora.target_modules: {', '.join(missing)} not found in the model")
    peft_config = LoraConfig(
        r=lcfg.r,
        lora_alpha=lcfg.alpha,
        lora_dropout=lcfg.dropout,
        target_modules=list(lcfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    if peft_class is not None:
        return peft_class(model, peft_config)
    return get_peft_model(model, peft_config)


def check_adapter(adapter_dir: str | Path, model) -> None:
    """Refuse an adapter that was trained for another architecture, before peft fails obscurely."""
    config_path = Path(adapter_dir) / "adapter_config.json"
    if not config_path.is_file():
        raise ModelError(f"{adapter_dir}: no adapter_config.json (not a PEFT adapter directory)")
    adapter_config = json.loads(config_path.read_text(encoding="utf-8"))
    targets = adapter_config.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in present]
    if missing:
        raise ModelError(f"{adapter_dir}: adapter targets {', '.join(missing)}, which the base model does not have")
    weights = Path(adapter_dir) / "adapter_model.safetensors"
    if weights.is_file():
        from safetensors import safe_open

        base_shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
        with safe_open(str(weights), framework="pt") as fh:
            for key in fh.keys():
                if "lora_A" not in key:
                    continue
                # lora_A of a Linear(in, out) is (r, in): its input size must match the base layer.
                base_key = key.replace("base_model.model.", "").replace(".lora_A.weight", ".weight")
                shape = base_shapes.get(base_key)
                in_features = fh.get_slice(key).get_shape()[1]
                if shape is not None and shape[-1] != in_features:
                    raise ModelError(
                        f"{adapter_dir}: adapter was trained for another base model ({base_key} expects "
                        f"input size {in_features}, the base model has {shape[-1]})"
                    )


def load_for_inference(mcfg: ModelConfig, adapter: str | None = None, device: torch.device | None = None):
    """(model, tokenizer) ready for generation: base once, plus the adapter when given."""
    if not mcfg.path:
        raise ModelError("model.path: no base model given (pass --model DIR or model.path=DIR)")
    tokenizer_source = adapter if adapter and (Path(adapter) / "tokenizer_config.json").is_file() else mcfg.path
    tokenizer = load_tokenizer(tokenizer_source, padding_side="left")
    model = load_base_model(mcfg, device=device)
    if adapter:
        from peft import PeftModel

        check_adapter(adapter, model)
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    return model, tokenizer


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
