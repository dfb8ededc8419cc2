"""Typed run configuration: one dataclass per section, validated once in ``__post_init__``.

A YAML file holds the sections ``model``, ``lora``, ``data``, ``train`` and ``eval``; command-line
overrides are ``key=value`` with dotted keys for nested fields (``train.max_steps=10``). Two
shorthands exist because they are what a user types most: ``model=DIR`` sets ``model.path`` and
``data=FILE`` sets ``data.train``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


def _check_choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")


def _check_positive(key: str, value: Any, allow_zero: bool = False) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class ModelConfig:
    path: str = ""
    """Local model directory or hub id of the base model."""
    dtype: str = "auto"
    """auto = bf16 on a GPU that supports it, else fp16 on GPU, fp32 on CPU; or bfloat16/float16/float32."""
    attn_implementation: str = "sdpa"
    """Attention kernel passed to transformers (sdpa, eager, flash_attention_2, flex_attention)."""
    device_map: str | None = None
    """As in transformers' from_pretrained (e.g. auto); None places the model on the chosen device."""
    gpu: int | None = None
    """CUDA device index to use; None = the first visible GPU (or the CPU without one)."""
    quantization: str = "none"
    """none, or 4bit for QLoRA (NF4 base weights through bitsandbytes; needs a CUDA GPU)."""

    def __post_init__(self) -> None:
        _check_choice("model.dtype", self.dtype, ("auto", "bfloat16", "float16", "float32"))
        _check_choice(
            "model.attn_implementation",
            self.attn_implementation,
            ("sdpa", "eager", "flash_attention_2", "flex_attention"),
        )
        _check_choice("model.quantization", self.quantization, ("none", "4bit"))
        if self.gpu is not None and (not isinstance(self.gpu, int) or self.gpu < 0):
            raise ConfigError(f"model.gpu: expected a GPU index >= 0, got {self.gpu!r}")


@dataclass
class LoraSection:
    r: int = 16
    """LoRA rank (the original recipe's 16)."""
    alpha: int = 16
    """LoRA scaling numerator; the update is scaled by alpha / r."""
    dropout: float = 0.0
    """Dropout on the LoRA input."""
    target_modules: list[str] = field(default_factory=lambda: list(PROJECTIONS))
    """Module names that get adapters: all seven attention and MLP projections by default."""

    def __post_init__(self) -> None:
        _check_positive("lora.r", self.r)
        _check_positive("lora.alpha", self.alpha)
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout: must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules or not all(isinstance(m, str) for m in self.target_modules):
            raise ConfigError("lora.target_modules: expected a non-empty list of module names")


@dataclass
class DataConfig:
    train: str = ""
    """JEC-QA training file (JSON Lines or one JSON array)."""
    eval: str | None = None
    """Separate held-out file; None = split eval_fraction off the training file."""
    eval_fraction: float = 0.05
    """Share of the training file held out for evaluation (by statement, never splitting repeats)."""
    eval_max_samples: int | None = 200
    """Cap on held-out questions scored during training (keeps in-training evaluation cheap)."""
    max_samples: int | None = None
    """Load at most this many usable records from the training file (quick debugging runs)."""
    prompt_format: str = "chat"
    """chat = the tokenizer's own chat template; plain = the original recipe's single-string template."""
    max_length: int = 2048
    """Longest tokenized example; longer ones are cut inside the question, never in the answer."""
    seed: int = 42
    """Seed of the train/eval split."""

    def __post_init__(self) -> None:
        _check_choice("data.prompt_format", self.prompt_format, ("chat", "plain"))
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"data.eval_fraction: must be in [0, 1), got {self.eval_fraction!r}")
        _check_positive("data.max_length", self.max_length)
        if self.max_length < 32:
            raise ConfigError(f"data.max_length: {self.max_length} leaves no room for a question")
        for key in ("max_samples", "eval_max_samples"):
            value = getattr(self, key)
            if value is not None:
                _check_positive(f"data.{key}", value)


@dataclass
class TrainConfig:
    output_dir: str | None = None
    """Where checkpoints and the final adapter go; default outputs/<config file stem>."""
    per_device_batch_size: int = 2
    """Sequences per device per micro-step (the original recipe's 2)."""
    gradient_accumulation_steps: int = 4
    """Micro-steps per optimizer step (the original recipe's 4)."""
    learning_rate: float = 2e-4
    """Peak learning rate."""
    max_steps: int = 5000
    """Optimizer steps."""
    warmup_steps: int = 100
    """Linear warm-up steps."""
    lr_scheduler_type: str = "linear"
    """Any transformers scheduler name (linear, cosine, constant_with_warmup, ...)."""
    weight_decay: float = 0.0
    """AdamW weight decay on the LoRA parameters."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    optim: str = "adamw_bnb_8bit"
    """transformers optimizer name; adamw_bnb_8bit is the original recipe's 8-bit AdamW."""
    save_steps: int = 500
    """Checkpoint every this many steps (what --resume continues from)."""
    save_total_limit: int | None = 3
    """Keep at most this many checkpoints."""
    logging_steps: int = 10
    """Log loss, lr and tokens/s every this many steps."""
    eval_steps: int = 500
    """Score the held-out split every this many steps; 0 = only at the end."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    packing: bool = False
    """Padding-free batches: examples are concatenated with per-example position ids (use flex_attention)."""
    batch_tokens: int | None = None
    """Token budget of a micro-batch, padding included; per_device_batch_size is then unused. With packing,
    examples fill one row of exactly this many tokens; without, examples of similar length are grouped and
    right-padded. None = per_device_batch_size examples in random order (the original recipe)."""
    sparse_logits: bool = False
    """Compute the LM head and loss only at the label (answer) positions: the same loss and gradients,
    without the 151,936-wide logits of every prompt token."""
    liger: bool = False
    """Liger-kernel fused RMSNorm/SwiGLU (pip install 'lawtune[gpu]'); a warning and plain kernels on CPU.
    With compile it measured slower (bench/README.md), so the default config leaves it off."""
    compile: bool = False
    """torch.compile each decoder layer (one graph shared by all layers), on GPUs with inductor's C++ wrapper.
    Compiling makes the first step slow: ~150 s for the 1.5B model on an H100 (bench/README.md, fifth session).
    TORCHINDUCTOR_CPP_WRAPPER=0 in the environment keeps inductor's Python wrapper instead."""
    seed: int = 42
    """Seed of LoRA initialisation, data order and dropout."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """transformers logging integrations (tensorboard, wandb, none)."""
    dataloader_num_workers: int = 0
    """Worker processes of the data loader."""
    ddp_bucket_cap_mb: int | None = None
    """Several processes (DDP): MiB of gradients per bucket, each all-reduced as soon as the backward has
    filled it; None = PyTorch's 25. The r16 LoRA gradient of the 1.5B model is 70 MiB in fp32: 80 puts it
    in one bucket (besides DDP's 1 MiB first one), all-reduced after the backward (~0.3 ms over NVLink
    between 2 H100s) instead of NCCL kernels waiting for the other rank beside the backward's own: on two
    H100s at 8,192 tokens x accumulation 2, 1.6% and 1.7% more tokens/s than 25 in two pairs (bench/README.md)."""

    def __post_init__(self) -> None:
        for key in ("per_device_batch_size", "gradient_accumulation_steps", "max_steps", "save_steps", "logging_steps"):
            _check_positive(f"train.{key}", getattr(self, key))
            if not isinstance(getattr(self, key), int):
                raise ConfigError(f"train.{key}: expected an integer, got {getattr(self, key)!r}")
        for key in ("batch_tokens", "ddp_bucket_cap_mb"):
            value = getattr(self, key)
            if value is not None:
                _check_positive(f"train.{key}", value)
                if not isinstance(value, int):
                    raise ConfigError(f"train.{key}: expected an integer, got {value!r}")
        for key in ("warmup_steps", "eval_steps", "weight_decay", "dataloader_num_workers"):
            _check_positive(f"train.{key}", getattr(self, key), allow_zero=True)
        _check_positive("train.learning_rate", self.learning_rate)
        _check_positive("train.max_grad_norm", self.max_grad_norm)


@dataclass
class EvalConfig:
    mode: str = "direct"
    """direct = empty think block then read the letters; reasoning = think first; choice = score answers."""
    batch_size: int = 64
    """Questions per generation / scoring batch (on an 80 GB GPU 256-512 is fastest; see bench/README.md)."""
    max_new_tokens: int = 2048
    """Token budget of reasoning mode (R1-style thinking often runs past 1,000 tokens)."""
    direct_max_new_tokens: int = 8
    """Token budget of direct mode: '答案：ABCD' and the end token are 5 tokens of R1-Distill's tokenizer."""
    do_sample: bool = False
    """Greedy decoding by default; sampling uses temperature and top_p."""
    temperature: float = 0.6
    """Sampling temperature (the model card's 0.6)."""
    top_p: float = 0.95
    """Nucleus sampling mass (the model card's 0.95)."""
    static_cache: bool = True
    """Where transformers' generate runs (sampling, the CPU, cuda_graphs false): a preallocated (static) KV
    cache instead of one that grows by copying every token, for generations of 32 tokens or more (direct
    mode's 8 tokens measured faster without it). The CUDA-graph loop always uses a static cache."""
    cuda_graphs: bool = True
    """Greedy generation on a GPU replays each decoding step from a CUDA graph on a static cache
    (lawtune/decode.py); false = transformers' generate. Sampling always uses generate."""
    shuffle_options: bool = False
    """Re-letter options with a fixed seed (answers mapped back) to expose letter bias."""
    seed: int = 0
    """Seed of option shuffling and sampling."""

    def __post_init__(self) -> None:
        _check_choice("eval.mode", self.mode, ("direct", "reasoning", "choice"))
        for key in ("batch_size", "max_new_tokens", "direct_max_new_tokens", "temperature", "top_p"):
            _check_positive(f"eval.{key}", getattr(self, key))


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    source: str | None = None
    """The YAML file this config came from (sets the default output directory)."""


SECTIONS = {"model": ModelConfig, "lora": LoraSection, "data": DataConfig, "train": TrainConfig, "eval": EvalConfig}
SHORTHANDS = {"model": "model.path", "data": "data.train"}


def _build_section(name: str, cls: type, values: Any) -> Any:
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{name}: expected a mapping of keys, got {values!r}")
    valid = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in valid:
            raise ConfigError(f"{name}.{key}: unknown key; valid keys: {', '.join(valid)}")
    values = dict(values)
    for f in dataclasses.fields(cls):
        # YAML 1.1 reads "2e-4" as a string; a float field takes it as the number it is.
        if "float" in str(f.type) and isinstance(values.get(f.name), str):
            try:
                values[f.name] = float(values[f.name])
            except ValueError:
                raise ConfigError(f"{name}.{f.name}: expected a number, got {values[f.name]!r}") from None
    try:
        return cls(**values)
    except TypeError as exc:  # wrong value types that __post_init__ did not catch
        raise ConfigError(f"{name}: {exc}") from None


def config_from_dict(raw: dict, source: str | None = None) -> Config:
    raw = dict(raw or {})
    for key in raw:
        if key not in SECTIONS:
            raise ConfigError(f"{key}: unknown section; valid sections: {', '.join(SECTIONS)}")
    sections = {name: _build_section(name, cls, raw.get(name)) for name, cls in SECTIONS.items()}
    tokens, longest = sections["train"].batch_tokens, sections["data"].max_length
    if tokens is not None and tokens < longest:
        raise ConfigError(f"train.batch_tokens: {tokens} cannot hold an example of data.max_length={longest} tokens")
    return Config(**sections, source=source)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``key=value`` overrides (values parsed as YAML scalars) to a raw config dict."""
    raw = {k: dict(v or {}) for k, v in (raw or {}).items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. train.max_steps=100)")
        key, _, text = item.partition("=")
        key = SHORTHANDS.get(key.strip(), key.strip())
        parts = key.split(".")
        if len(parts) != 2 or parts[0] not in SECTIONS:
            raise ConfigError(f"override {item!r}: key must be section.field with section one of {', '.join(SECTIONS)}")
        value = yaml.safe_load(text) if text.strip() else None
        # A bare number-like path such as "1_train.json" stays a string; YAML only turns true numbers into numbers.
        raw.setdefault(parts[0], {})[parts[1]] = value
    return raw


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise ConfigError(f"{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    raw = apply_overrides(raw, list(overrides))
    try:
        return config_from_dict(raw, source=str(path) if path else None)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path else str(exc)) from None


def config_to_dict(cfg: Config) -> dict:
    out = dataclasses.asdict(cfg)
    out.pop("source", None)
    return out


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), allow_unicode=True, sort_keys=False), encoding="utf-8")


def resolve_output_dir(cfg: Config) -> Path:
    if cfg.train.output_dir:
        return Path(cfg.train.output_dir)
    stem = Path(cfg.source).stem if cfg.source else "run"
    return Path("outputs") / stem
