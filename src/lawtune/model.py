"""Base model, tokenizer and LoRA adapters: loading, device and dtype choice."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .config import LoraSection, ModelConfig, looks_like_hub_id
from .errors import UsageError
from .rundir import MANIFEST_FILE, MERGE_INFO, adapter_sha256, merge_info

log = logging.getLogger("lawtune")


class ModelError(UsageError):
    """The model or adapter cannot be used as asked; the message says why in one line."""


def base_model(model):
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


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


HUB_PROBE_TIMEOUT_S = 5


@functools.cache
def model_source(path: str) -> str:
    """Where to load ``path`` from: the directory itself, or for a hub id ('org/name') the hub when it answers,
    else the copy in the Hugging Face cache. Offline, transformers would spend most of a minute on retries (and
    print dozens of warnings) before failing: the hub is asked once, with a short timeout, instead."""
    if Path(path).expanduser().exists():
        return path
    if not looks_like_hub_id(path):
        raise ModelError(f"{path}: model directory does not exist (pass a local model directory or a hub id)")
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    # What "the hub cannot give us this model now" raises: an HTTP answer (HfHubHTTPError: not found, gated,
    # rate-limited...), a network failure (the HTTP client's own error base, which HfHubHTTPError derives from:
    # requests', httpx's or httpx2's by huggingface_hub version; OSError for requests' and offline mode), or
    # a name the hub does not accept (HFValidationError).
    hub_errors: tuple[type[BaseException], ...] = (
        OSError, HFValidationError, *(b for b in HfHubHTTPError.__bases__ if issubclass(b, BaseException)))
    reason = "HF_HUB_OFFLINE is set"
    if not constants.HF_HUB_OFFLINE:
        try:
            huggingface_hub.HfApi().model_info(path, timeout=HUB_PROBE_TIMEOUT_S)
            return path
        except hub_errors as exc:
            reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
    try:
        cached = huggingface_hub.snapshot_download(path, local_files_only=True)
    except (OSError, HFValidationError):  # not in the cache either (LocalEntryNotFoundError is an OSError)
        cached = None
    if cached:
        log.info("%s: the hub cannot be reached (%s); using the cached copy in %s", path, reason, cached)
        return cached
    raise ModelError(f"{path}: neither a local model directory nor reachable on the Hugging Face Hub ({reason}); "
                     f"download it where there is network (hf download {path} --local-dir DIR) and pass the "
                     f"directory (--model DIR or model.path=DIR)")


def load_tokenizer(path: str, padding_side: str = "right"):
    source = model_source(str(path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
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
    source = model_source(str(path))
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
        model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot load the model ({str(exc).splitlines()[0]})") from None
    if "device_map" not in kwargs:
        model.to(device)
    return model


def lora_config(model, lcfg: LoraSection):
    """peft's LoraConfig of the lora section, its target modules checked against the model."""
    from peft import LoraConfig

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for key, names in (("target_modules", lcfg.target_modules), ("modules_to_save", lcfg.modules_to_save)):
        missing = [m for m in names if m not in present]
        if missing:
            raise ModelError(f"lora.{key}: {', '.join(missing)} not found in the model")
    if getattr(model.config, "tie_word_embeddings", False):
        # A trained copy of one of two tied matrices unties them in the adapter only: merge would save one of them.
        tied = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                if module is model.get_input_embeddings() or module is model.get_output_embeddings()}
        both = sorted(tied & set(lcfg.modules_to_save))
        if both:
            raise ModelError(f"lora.modules_to_save: {', '.join(both)}: this model ties its input and output "
                             f"embeddings (tie_word_embeddings), and a trained copy of one would part from the other; "
                             f"leave it out")
    return LoraConfig(r=lcfg.r, lora_alpha=lcfg.alpha, lora_dropout=lcfg.dropout,
                      target_modules=list(lcfg.target_modules), bias="none", task_type="CAUSAL_LM",
                      use_rslora=lcfg.use_rslora, use_dora=lcfg.use_dora,
                      init_lora_weights=True if lcfg.init == "default" else lcfg.init,
                      modules_to_save=list(lcfg.modules_to_save) or None)


def add_lora(model, lcfg: LoraSection, quantized: bool = False, peft_class=None):
    """The model with fresh LoRA adapters; ``peft_class`` (a PeftModelForCausalLM subclass) wraps it instead of
    peft's own class."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    peft_config = lora_config(model, lcfg)
    with warnings.catch_warnings():
        # peft asks transformers 5 for its deprecated is_gradient_checkpointing: a notice for peft, not our users
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        return peft_class(model, peft_config) if peft_class is not None else get_peft_model(model, peft_config)


# ----------------------------------------------------------------------------- the base an adapter belongs to

# The embedding probe: the first values of the first rows of the input embedding, compared with a tolerance so
# that one checkpoint loaded in fp32, bf16 or fp16 still matches itself, while two different models never do.
PROBE_ROWS, PROBE_COLS, PROBE_RTOL = 4, 8, 2e-2


def tokenizer_digest(tokenizer) -> str:
    """sha256 of a tokenizer's vocabulary (token -> id): two tokenizers with one digest map text to the same ids."""
    items = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode("utf-8")).hexdigest()


def base_fingerprint(model, tokenizer=None) -> dict:
    """What identifies a base model: architecture, sizes, tokenizer (when given) and a probe of its embedding
    weights. Recorded in the data manifest of every adapter lawtune trains (``base_model``)."""
    config = model.config
    weight = model.get_input_embeddings().weight
    probe = weight[:PROBE_ROWS, :PROBE_COLS].detach().float().cpu()
    found = {"architecture": (getattr(config, "architectures", None) or [config.model_type])[0],
             "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
             "num_hidden_layers": config.num_hidden_layers,
             "embedding_probe": [round(v, 6) for v in probe.flatten().tolist()]}
    if tokenizer is not None:
        found.update(tokenizer_size=len(tokenizer), tokenizer_sha256=tokenizer_digest(tokenizer))
    return found


def base_differences(recorded: dict, current: dict) -> list[str]:
    """How the base an adapter was trained on (``recorded``) differs from ``current``; what either leaves out is
    not compared."""
    names = {"architecture": "architecture", "vocab_size": "vocabulary", "hidden_size": "hidden size",
             "num_hidden_layers": "layers", "tokenizer_size": "tokenizer size"}
    diffs = [f"{label} {recorded[key]} vs {current[key]}" for key, label in names.items()
             if None not in (recorded.get(key), current.get(key)) and recorded[key] != current[key]]
    if (recorded.get("tokenizer_sha256") and current.get("tokenizer_sha256")
            and recorded["tokenizer_sha256"] != current["tokenizer_sha256"]
            and not any(d.startswith("tokenizer size") for d in diffs)):
        diffs.append("another tokenizer vocabulary")
    probe = recorded.get("embedding_probe")
    if not diffs and probe and current.get("embedding_probe"):
        a, b = torch.tensor(probe), torch.tensor(current["embedding_probe"])
        if a.shape != b.shape or not torch.allclose(a, b, rtol=PROBE_RTOL, atol=1e-4):
            diffs.append("other embedding weights (same architecture and tokenizer, another checkpoint)")
    return diffs


def recorded_base(adapter_dir: str | Path) -> dict:
    """The base an adapter was trained on, as far as its directory says: the manifest's ``base_model`` (adapters
    trained since issue 15), else what its saved tokenizer tells (older ones)."""
    manifest = Path(adapter_dir) / MANIFEST_FILE
    if manifest.is_file():
        try:
            recorded = json.loads(manifest.read_text(encoding="utf-8")).get("base_model")
        except (json.JSONDecodeError, AttributeError):
            recorded = None
        if isinstance(recorded, dict):
            return recorded
    if (Path(adapter_dir) / "tokenizer_config.json").is_file():
        try:
            saved = AutoTokenizer.from_pretrained(adapter_dir)
        except (OSError, ValueError):
            return {}
        return {"tokenizer_size": len(saved), "tokenizer_sha256": tokenizer_digest(saved)}
    return {}


def check_not_merged(adapter_dir: str | Path, base_path: str) -> None:
    """Refuse an adapter that `lawtune merge` already folded into ``base_path``: its lawtune_merge.json records the
    sha256 of the merged adapter's weights. Loaded again, the LoRA update would count twice."""
    info = merge_info(base_path)
    if info.get("adapter_sha256") and info["adapter_sha256"] == adapter_sha256(adapter_dir):
        base = info.get("base_model")
        raise ModelError(f"{adapter_dir}: adapter is already merged into {base_path} (its {MERGE_INFO} records these "
                         f"weights' sha256), so it would count twice; use {base_path} alone, or --model "
                         f"{base or 'BASE'} with the adapter; pass --force to load it anyway")


def check_adapter_base(adapter_dir: str | Path, model, base_path: str) -> None:
    """Refuse an adapter trained on another base model whose tensor shapes happen to fit this one (a model with
    another vocabulary or tokenizer, or another checkpoint of the same architecture), or one already merged into
    this model."""
    check_not_merged(adapter_dir, base_path)
    recorded = recorded_base(adapter_dir)
    if not recorded:
        return
    try:
        base_tokenizer = AutoTokenizer.from_pretrained(model_source(base_path))
    except (OSError, ValueError):
        base_tokenizer = None
    diffs = base_differences(recorded, base_fingerprint(model, base_tokenizer))
    if diffs:
        raise ModelError(f"{adapter_dir}: adapter was trained for another base model than {base_path} "
                         f"({'; '.join(diffs)}); pass --force to load it anyway")


def check_adapter(adapter_dir: str | Path, model) -> None:
    """Refuse an adapter that was trained for another architecture, before peft fails obscurely."""
    config_path = Path(adapter_dir) / "adapter_config.json"
    if not Path(adapter_dir).is_dir():
        raise ModelError(f"{adapter_dir}: adapter directory does not exist (pass --adapter DIR, e.g. outputs/RUN/final_model)")
    if not config_path.is_file():
        raise ModelError(f"{adapter_dir}: no adapter_config.json (not a PEFT adapter directory)")
    adapter_config = json.loads(config_path.read_text(encoding="utf-8"))
    targets = adapter_config.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in [*targets, *(adapter_config.get("modules_to_save") or [])] if t not in present]
    if missing:
        raise ModelError(f"{adapter_dir}: adapter targets {', '.join(missing)}, which the base model does not have")
    weights = Path(adapter_dir) / "adapter_model.safetensors"
    if weights.is_file():
        from safetensors import safe_open

        base_shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
        with safe_open(str(weights), framework="pt") as fh:
            for key in fh.keys():
                if "lora_" not in key:
                    # a module trained in full (lora.modules_to_save) replaces the base's: the same shape or none
                    base_key = key.replace("base_model.model.", "")
                    shape, saved = base_shapes.get(base_key), tuple(fh.get_slice(key).get_shape())
                    if shape is not None and shape != saved:
                        raise ModelError(f"{adapter_dir}: adapter was trained for another base model (its "
                                         f"{base_key} is {list(saved)}, the base model's {list(shape)})")
                    continue
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


def load_for_inference(mcfg: ModelConfig, adapter: str | None = None, device: torch.device | None = None,
                       force: bool = False, fold: bool = False):
    """(model, tokenizer) ready for generation: base once, plus the adapter when given (``fold``: folded into the
    base weights, see ``adapter.fold``). An adapter whose recorded base differs from this model is refused unless
    ``force``."""
    if not mcfg.path:
        raise ModelError("model.path: no base model given (pass --model DIR or model.path=DIR)")
    tokenizer_source = adapter if adapter and (Path(adapter) / "tokenizer_config.json").is_file() else mcfg.path
    tokenizer = load_tokenizer(tokenizer_source, padding_side="left")
    model = load_base_model(mcfg, device=device)
    if adapter:
        from peft import PeftModel

        check_adapter(adapter, model)
        if force:
            log.warning("%s: --force: the adapter's base model is not checked", adapter)
        else:
            check_adapter_base(adapter, model, mcfg.path)
        model = PeftModel.from_pretrained(model, adapter)
        if fold:
            model.merge_adapter()
    model.eval()
    return model, tokenizer


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
