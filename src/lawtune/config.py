"""Typed configuration: one dataclass per section, validated once in ``__post_init__``, and one config per
command holding exactly the sections that command reads (``COMMANDS``).

A key, section or override that a command does not read is an error naming it and the command's valid
keys. Overrides are ``key=value`` with dotted keys (``train.max_steps=10``); ``model=DIR`` and
``data=FILE`` are shorthands for ``model.path`` and ``data.train`` where the command has those keys. A
YAML given to a command other than ``train``/``demo`` with ``--config`` (a full run file, such as an
adapter's ``lawtune_config.yaml``) lends only the sections the command reads.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import logging
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

log = logging.getLogger("lawtune")


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
    format: str = "auto"
    """File format of data.train, data.eval and data.mix: jecqa, agieval or lawbench; auto = told by the first
    record's fields."""
    mix: str | None = None
    """A second JEC-QA file trained answer-only beside data.train (its reasoning, if any, left out): after
    `lawtune distill`, answer-only records keep direct mode working while the traces train reasoning."""
    mix_ratio: float = 0.5
    """Answer-only records drawn from data.mix (seeded) per training record of data.train."""

    def __post_init__(self) -> None:
        _check_choice("data.prompt_format", self.prompt_format, ("chat", "plain"))
        _check_choice("data.format", self.format, DATA_FORMATS)
        _check_positive("data.mix_ratio", self.mix_ratio)
        if self.mix is None and self.mix_ratio != 0.5:
            raise ConfigError("data.mix_ratio: set without data.mix (the file to draw answer-only records from)")
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
class OptimizationSection:
    """What `train` and `grpo` both set the same way: the optimizer, its schedule, logging and checkpoints. Each
    command's section (``train``, ``grpo``) adds its own fields and may change a default."""

    SECTION: ClassVar[str] = ""
    output_dir: str | None = None
    """Where checkpoints and the final adapter go; default outputs/<config file stem> (a run records the one
    it used)."""
    per_device_batch_size: int = 2
    """Examples per device per micro-step: sequences in `train` (the original recipe's 2), completions in `grpo`."""
    gradient_accumulation_steps: int = 4
    """Micro-steps per optimizer step (the original recipe's 4)."""
    learning_rate: float = 2e-4
    """Peak learning rate of the LoRA parameters."""
    max_steps: int = 5000
    """Optimizer steps."""
    warmup_steps: int = 100
    """Linear warm-up steps."""
    lr_scheduler_type: str = "linear"
    """Any transformers scheduler name (linear, cosine, constant, constant_with_warmup, ...)."""
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
    """Log every this many steps (loss, lr and tokens/s; grpo: rewards, lengths, clipping and KL)."""
    eval_steps: int = 500
    """Score the held-out split every this many steps; 0 = only at the end (grpo: also before the first step)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    seed: int = 42
    """Seed of LoRA initialisation, data order and dropout (grpo: also of the rollouts' samples, each drawn from
    this seed, the question, the step and the sample index)."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """transformers logging integrations (tensorboard, wandb, none)."""

    def __post_init__(self) -> None:
        section = self.SECTION
        for key in ("per_device_batch_size", "gradient_accumulation_steps", "max_steps", "save_steps", "logging_steps"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"{section}.{key}: expected an integer, got {value!r}")
            _check_positive(f"{section}.{key}", value)
        for key in ("warmup_steps", "eval_steps", "weight_decay"):
            _check_positive(f"{section}.{key}", getattr(self, key), allow_zero=True)
        _check_positive(f"{section}.learning_rate", self.learning_rate)
        _check_positive(f"{section}.max_grad_norm", self.max_grad_norm)


@dataclass
class TrainConfig(OptimizationSection):
    SECTION: ClassVar[str] = "train"
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
    dataloader_num_workers: int = 0
    """Worker processes of the data loader."""
    ddp_bucket_cap_mb: int | None = None
    """Several processes (DDP): MiB of gradients per bucket, each all-reduced as soon as the backward has
    filled it; None = PyTorch's 25. The r16 LoRA gradient of the 1.5B model is 70 MiB in fp32: 80 puts it
    in one bucket (besides DDP's 1 MiB first one), all-reduced after the backward (~0.3 ms over NVLink
    between 2 H100s) instead of NCCL kernels waiting for the other rank beside the backward's own: on two
    H100s at 8,192 tokens x accumulation 2, 1.6% and 1.7% more tokens/s than 25 in two pairs (bench/README.md)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("batch_tokens", "ddp_bucket_cap_mb"):
            value = getattr(self, key)
            if value is not None:
                _check_positive(f"train.{key}", value)
                if not isinstance(value, int):
                    raise ConfigError(f"train.{key}: expected an integer, got {value!r}")
        _check_positive("train.dataloader_num_workers", self.dataloader_num_workers, allow_zero=True)


PROMPT_FORMATS = ("chat", "plain")
# Evaluation may also ask a LawBench file in its own words (its instruction and question).
EVAL_PROMPT_FORMATS = PROMPT_FORMATS + ("native",)
DATA_FORMATS = ("auto", "jecqa", "agieval", "lawbench")


@dataclass
class AdapterConfig:
    path: str | None = None
    """LoRA adapter directory (e.g. outputs/run/final_model); None = the base model alone."""
    prompt_format: str | None = None
    """chat, plain, or native (a LawBench file's own instruction and question, LawBench's protocol); None = the
    adapter's own (its lawtune_config.yaml), a merged model's, else chat."""
    force: bool = False
    """Load the adapter even where the base model it records (architecture, vocabulary, tokenizer, embedding
    weights) differs from this one."""

    def __post_init__(self) -> None:
        if self.prompt_format is not None:
            _check_choice("adapter.prompt_format", self.prompt_format, EVAL_PROMPT_FORMATS)


@dataclass
class GenerationConfig:
    max_new_tokens: int | None = None
    """Token budget of the selected mode and a hard cap on generated tokens, a forced answer included;
    None = the mode's default: 8 in direct mode, 2048 in reasoning mode."""
    do_sample: bool = False
    """Greedy decoding by default; sampling uses temperature and top_p."""
    temperature: float = 0.6
    """Sampling temperature (the model card's 0.6)."""
    top_p: float = 0.95
    """Nucleus sampling mass (the model card's 0.95)."""
    top_k: int = 0
    """Sample among the k likeliest tokens only; 0 = no limit."""
    seed: int = 0
    """Sampling seed; each question's samples come from (seed, the question, the sample index), whatever else is
    generated beside it."""
    engine: bool = True
    """Generate with lawtune's engine (continuous batching on a static KV cache, lawtune/generation/engine.py);
    false = transformers' generate. Models the engine cannot run use generate anyway."""
    static_cache: bool = True
    """Where transformers' generate runs: a preallocated (static) KV cache instead of one that grows by copying
    every token, for generations of 32 tokens or more (direct mode's 8 tokens measured faster without it)."""
    cuda_graphs: bool = True
    """On a GPU the engine replays each decoding step from a CUDA graph; false = every step eagerly."""

    def __post_init__(self) -> None:
        if self.max_new_tokens is not None:
            _check_positive("generation.max_new_tokens", self.max_new_tokens)
            if not isinstance(self.max_new_tokens, int):
                raise ConfigError(f"generation.max_new_tokens: expected an integer, got {self.max_new_tokens!r}")
        for key in ("temperature", "top_p"):
            _check_positive(f"generation.{key}", getattr(self, key))
        if self.top_p > 1:
            raise ConfigError(f"generation.top_p: must be at most 1, got {self.top_p}")
        _check_positive("generation.top_k", self.top_k, allow_zero=True)


@dataclass
class EvalConfig:
    mode: str = "direct"
    """direct = empty think block then read the letters; reasoning = think first; choice = score answers.
    During training, reasoning is evaluated as direct (thousands of tokens a question)."""
    batch_size: int = 64
    """Questions per generation / scoring batch (on an 80 GB GPU 256-512 is fastest; see bench/README.md)."""
    shuffle_options: bool = False
    """Re-letter options with a fixed seed (answers mapped back) to expose letter bias."""
    seed: int = 0
    """Seed of option shuffling."""

    def __post_init__(self) -> None:
        _check_choice("eval.mode", self.mode, ("direct", "reasoning", "choice"))
        _check_positive("eval.batch_size", self.batch_size)


@dataclass
class EvalFileConfig(EvalConfig):
    data: str = ""
    """JEC-QA file with answers to score."""
    output: str = "report.json"
    """Report file (one JSON file: summary and every question's output)."""
    max_samples: int | None = None
    """Score only the first N questions."""
    format: str = "auto"
    """File format of eval.data: jecqa, agieval or lawbench; auto = told by the first record's fields."""
    suite: str | None = None
    """A suite YAML (model, adapter, runs: name, data, mode, prompt_format, samples, max_new_tokens, format): every
    run is scored and eval.output is one HTML page, each run's report beside it as <page>.<name>.json."""
    samples: int = 1
    """K sampled answers per question (generation.temperature and top_p, the model card's 0.6 and 0.95): the report
    gets avg@K, maj@K and pass@K; 1 = one answer, greedy unless generation.do_sample."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive("eval.samples", self.samples)
        if self.suite and self.data:
            raise ConfigError("eval.data: a suite names its own files (its runs' data); give --suite or --data")
        if self.samples > 1 and self.mode == "choice":
            raise ConfigError("eval.samples: choice mode scores every answer set, nothing is sampled; use direct or "
                              "reasoning")
        _check_choice("eval.format", self.format, DATA_FORMATS)
        if self.max_samples is not None:
            _check_positive("eval.max_samples", self.max_samples)


INFER_MODES = ("direct", "reasoning")


@dataclass
class PredictConfig:
    data: str = ""
    """JEC-QA file (answers not needed, e.g. 0_test.json)."""
    output: str = ""
    """Predictions file (JSON Lines); a rerun skips the ids already in it."""
    mode: str = "direct"
    """direct or reasoning."""
    batch_size: int = 64
    """Questions per batch."""

    def __post_init__(self) -> None:
        _check_choice("predict.mode", self.mode, INFER_MODES)
        _check_positive("predict.batch_size", self.batch_size)


@dataclass
class AskConfig:
    question: str | None = None
    """The question; trailing lines 'A. …' are read as its options. None = interactive (stdin)."""
    option: list[str] = field(default_factory=list)
    """Options as A=TEXT, one entry each."""
    record: str | None = None
    """One JEC-QA record as JSON (statement, option_list)."""
    mode: str = "direct"
    """direct or reasoning."""

    def __post_init__(self) -> None:
        _check_choice("ask.mode", self.mode, INFER_MODES)
        if not isinstance(self.option, list):
            raise ConfigError(f"ask.option: expected a list of A=TEXT entries, got {self.option!r}")


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    """Address to listen on."""
    port: int = 8000
    """Port (0 = any free port)."""
    max_prompt_tokens: int | None = None
    """Longest prompt a request may send, in tokens; None = the model's context. A prompt longer than this, or one
    that leaves no room in the context for the request's token budget, is refused at once (400)."""
    slots: int = 32
    """Requests generated at once (rows of the engine's KV cache); more wait for a free row."""
    max_len: int = 8192
    """Tokens of one request, prompt and answer together (the engine's row length; at most the model's context).
    The cache takes slots x max_len tokens: 32 x 8,192 is 7 GiB for the 1.5B model in bf16 (28 layers x 2 x 2 heads
    x 128 x 2 bytes a token; arithmetic)."""

    def __post_init__(self) -> None:
        _check_positive("serve.slots", self.slots)
        _check_positive("serve.max_len", self.max_len)
        if self.max_prompt_tokens is not None:
            _check_positive("serve.max_prompt_tokens", self.max_prompt_tokens)
        if not isinstance(self.port, int) or isinstance(self.port, bool) or not 0 <= self.port <= 65535:
            raise ConfigError(f"serve.port: expected a port number from 0 to 65535, got {self.port!r}")


@dataclass
class MergeConfig:
    model: str = ""
    """Base model directory or hub id."""
    adapter: str = ""
    """LoRA adapter directory."""
    output: str = ""
    """Directory for the merged model."""
    dtype: str | None = None
    """Saved dtype: bfloat16, float16 or float32; None = the base checkpoint's."""
    force: bool = False
    """Replace a non-empty output directory."""
    force_base: bool = False
    """Merge even where the base model the adapter records differs from this one."""

    def __post_init__(self) -> None:
        if self.dtype is not None:
            _check_choice("merge.dtype", self.dtype, ("bfloat16", "float16", "float32"))


DISTILL_PICKS = ("shortest", "random", "all")


@dataclass
class DistillConfig:
    data: str = ""
    """JEC-QA file with answers (a training split) to sample reasoning for."""
    output: str = ""
    """Traces file (JSON Lines: the records with a ``reasoning`` field); beside it ``.rejected.jsonl`` and
    ``.report.json``. A rerun skips the ids already in either file."""
    samples: int = 4
    """Reasoning completions sampled per question."""
    pick: str = "shortest"
    """Which kept completion a question gets: shortest, random (seeded), or all (one record each)."""
    batch_size: int = 64
    """Questions sampled at once (their samples share the engine's rows)."""
    teacher_url: str | None = None
    """An OpenAI-compatible endpoint (e.g. http://host:8000/v1, a larger R1 or `lawtune serve`) to sample from
    instead of the local model."""
    teacher_model: str | None = None
    """The model name the endpoint serves (needed with teacher_url)."""
    retry_rejected: bool = False
    """Sample the questions of the rejected file again."""
    timeout_s: float = 600.0
    """Seconds one request to the teacher may take."""

    def __post_init__(self) -> None:
        _check_positive("distill.samples", self.samples)
        _check_positive("distill.batch_size", self.batch_size)
        _check_positive("distill.timeout_s", self.timeout_s)
        _check_choice("distill.pick", self.pick, DISTILL_PICKS)
        if self.teacher_url and not self.teacher_model:
            raise ConfigError("distill.teacher_model: required with distill.teacher_url (the endpoint's model name)")
        if self.teacher_model and not self.teacher_url:
            raise ConfigError("distill.teacher_url: required with distill.teacher_model")


@dataclass
class CheckConfig:
    file: str = ""
    """JEC-QA file to validate."""
    tokenizer: str | None = None
    """Tokenizer directory: also report token lengths of training examples."""
    prompt_format: str = "chat"
    """Prompt format of those token lengths (chat, plain, or native for LawBench files)."""
    json: bool = False
    """Print one JSON object."""
    format: str = "auto"
    """File format: jecqa, agieval or lawbench; auto = told by the first record's fields."""

    def __post_init__(self) -> None:
        _check_choice("check.prompt_format", self.prompt_format, EVAL_PROMPT_FORMATS)
        _check_choice("check.format", self.format, DATA_FORMATS)


@dataclass
class OverlapConfig:
    a: str = ""
    """The file that may hold the questions (e.g. a training file)."""
    b: str = ""
    """The file whose questions are looked for in A (e.g. a benchmark)."""
    json: bool = False
    """Print one JSON object: {"b_records", "overlap", "examples"}."""


@dataclass
class CompareConfig:
    report_a: str = ""
    """First eval report (e.g. the base model's)."""
    report_b: str = ""
    """Second eval report (e.g. the fine-tuned model's)."""
    html: str = "compare.html"
    """HTML report path."""


GRPO_ROLLOUTS = ("engine", "trl")
GRPO_LOSSES = ("dapo", "grpo", "dr_grpo", "bnpo")
GRPO_SCALINGS = ("group", "batch", "none")


@dataclass
class GrpoConfig(OptimizationSection):
    SECTION: ClassVar[str] = "grpo"
    # Defaults of the shared fields for GRPO with a LoRA (configs/..._grpo.yaml says where each comes from).
    per_device_batch_size: int = 16
    learning_rate: float = 1e-5
    max_steps: int = 500
    warmup_steps: int = 0
    lr_scheduler_type: str = "constant"
    optim: str = "adamw_torch"
    save_steps: int = 50
    logging_steps: int = 1
    eval_steps: int = 50
    gradient_checkpointing: bool = True
    adapter: str | None = None
    """LoRA adapter to continue (e.g. outputs/RUN/final_model of `lawtune train`), loaded trainable; None = a fresh
    LoRA from the lora section."""
    force: bool = False
    """Continue grpo.adapter even where the base model it records differs from model.path."""
    num_generations: int = 8
    """Group size: completions sampled per question; advantages compare each with its group's mean."""
    temperature: float = 0.6
    """Sampling temperature of the rollouts."""
    top_p: float = 0.95
    """Nucleus sampling mass of the rollouts."""
    max_completion_length: int = 1024
    """Token budget of a completion (think text, </think> and the answer); a completion cut there has no answer."""
    beta: float = 0.0
    """KL coefficient against the starting policy (the continued adapter, else the base model); 0 = no reference
    pass."""
    epsilon: float = 0.2
    """Lower clipping range of the probability ratio (PPO's epsilon)."""
    epsilon_high: float | None = 0.28
    """Upper clipping range; None = epsilon."""
    loss_type: str = "dapo"
    """How token losses are averaged, as TRL names it: dapo (over all tokens of the batch), grpo (per sequence),
    dr_grpo (a constant), bnpo."""
    scale_rewards: str = "group"
    """Advantages divided by the std of the group (group), of the batch (batch), or not at all (none)."""
    reward_f1_weight: float = 0.0
    """Weight of the partial-credit reward (per-option F1) beside the exact-set reward (weight 1)."""
    reward_format_weight: float = 0.0
    """Weight of the format reward (the think block closed by the model, then one 答案： line); logged at any weight.
    The exact-set reward already needs a closed think block and a readable answer; a format bonus in a group where no
    completion is right is scaled up by the group's tiny std into whole advantages for well-formed wrong answers."""
    length_budget: int | None = None
    """Completion tokens past which the length penalty applies; None = no length penalty."""
    length_penalty: float = 1.0
    """Reward lost per further length_budget tokens (with length_budget)."""
    rollout: str = "engine"
    """Who samples the completions: engine = lawtune's generation engine on the live weights (TRL's experimental
    rollout_func); trl = TRL's own generation (transformers' generate)."""
    eval_batch_size: int = 64
    """Held-out questions generated at once."""
    eval_max_new_tokens: int | None = None
    """Token budget of the held-out reasoning evaluation; None = max_completion_length."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("num_generations", "max_completion_length", "eval_batch_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"grpo.{key}: expected an integer, got {value!r}")
            _check_positive(f"grpo.{key}", value)
        if self.num_generations < 2:
            raise ConfigError(f"grpo.num_generations: a group needs at least 2 completions, got {self.num_generations}")
        for key in ("temperature", "top_p", "epsilon", "length_penalty"):
            _check_positive(f"grpo.{key}", getattr(self, key))
        if self.top_p > 1:
            raise ConfigError(f"grpo.top_p: must be at most 1, got {self.top_p}")
        for key in ("beta", "reward_f1_weight", "reward_format_weight"):
            _check_positive(f"grpo.{key}", getattr(self, key), allow_zero=True)
        for key in ("epsilon_high", "length_budget", "eval_max_new_tokens"):
            if getattr(self, key) is not None:
                _check_positive(f"grpo.{key}", getattr(self, key))
        if self.length_budget is None and self.length_penalty != 1.0:
            raise ConfigError("grpo.length_penalty: set without grpo.length_budget (the tokens it applies past)")
        _check_choice("grpo.rollout", self.rollout, GRPO_ROLLOUTS)
        _check_choice("grpo.loss_type", self.loss_type, GRPO_LOSSES)
        _check_choice("grpo.scale_rewards", self.scale_rewards, GRPO_SCALINGS)


# ----------------------------------------------------------------------------- one config per command


@dataclass
class TrainRun:
    """`lawtune train` and `lawtune demo`: everything a training run reads; saved as lawtune_config.yaml."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    source: str | None = None

    def __post_init__(self) -> None:
        tokens, longest = self.train.batch_tokens, self.data.max_length
        if tokens is not None and tokens < longest:
            raise ConfigError(f"train.batch_tokens: {tokens} cannot hold an example of data.max_length={longest} tokens")


@dataclass
class GrpoRun:
    """`lawtune grpo`: everything a GRPO run reads; saved as lawtune_config.yaml beside its adapters."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataConfig = field(default_factory=DataConfig)
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    source: str | None = None

    def __post_init__(self) -> None:
        # data.mix belongs to SFT; a continued adapter keeps its own LoRA shape.
        if self.data.mix is not None:
            raise ConfigError("data.mix: grpo samples its own completions; answer-only mixing is for `lawtune train`")
        if self.grpo.adapter and self.lora != LoraSection():
            raise ConfigError("lora: grpo.adapter is continued with its own LoRA; the lora section shapes a fresh one "
                              "(leave it out, or leave out grpo.adapter)")
        g = self.grpo
        if self.data.max_length <= g.max_completion_length:
            raise ConfigError(f"data.max_length: {self.data.max_length} (prompt and completion) leaves no room for a "
                              f"prompt beside grpo.max_completion_length={g.max_completion_length}")
        if (g.per_device_batch_size * g.gradient_accumulation_steps) % g.num_generations:
            raise ConfigError(f"grpo.per_device_batch_size: {g.per_device_batch_size} x "
                              f"grpo.gradient_accumulation_steps {g.gradient_accumulation_steps} completions a step "
                              f"are not whole groups of grpo.num_generations={g.num_generations}")


@dataclass
class EvalRun:
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    eval: EvalFileConfig = field(default_factory=EvalFileConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    source: str | None = None


@dataclass
class PredictRun:
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    source: str | None = None


@dataclass
class AskRun:
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    ask: AskConfig = field(default_factory=AskConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    source: str | None = None


@dataclass
class ServeRun:
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    source: str | None = None


@dataclass
class DistillRun:
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    source: str | None = None


@dataclass
class MergeRun:
    merge: MergeConfig = field(default_factory=MergeConfig)
    source: str | None = None


@dataclass
class CheckRun:
    check: CheckConfig = field(default_factory=CheckConfig)
    source: str | None = None


@dataclass
class OverlapRun:
    overlap: OverlapConfig = field(default_factory=OverlapConfig)
    source: str | None = None


@dataclass
class CompareRun:
    compare: CompareConfig = field(default_factory=CompareConfig)
    source: str | None = None


COMMANDS: dict[str, type] = {"train": TrainRun, "demo": TrainRun, "eval": EvalRun, "predict": PredictRun,
                             "ask": AskRun, "serve": ServeRun, "merge": MergeRun, "data check": CheckRun,
                             "compare": CompareRun, "distill": DistillRun,
                             "data overlap": OverlapRun, "grpo": GrpoRun}
# Every section any command reads: a lent run file may hold any of them; anything else is a mistake.
KNOWN_SECTIONS = {f.name for cls in COMMANDS.values() for f in dataclasses.fields(cls) if f.name != "source"}
SHORTHANDS = {"model": "model.path", "data": "data.train"}


def sections_of(run_cls: type) -> dict[str, type]:
    """Section name -> section dataclass of a command's config."""
    return {f.name: f.default_factory().__class__ for f in dataclasses.fields(run_cls) if f.name != "source"}


def valid_keys(run_cls: type) -> list[str]:
    return [f"{name}.{f.name}" for name, cls in sections_of(run_cls).items() for f in dataclasses.fields(cls)]


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a section dataclass (its one documentation), base classes included."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        except (OSError, TypeError):
            continue
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def command_name(run_cls: type) -> str:
    return next(name for name, cls in COMMANDS.items() if cls is run_cls)


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


def config_from_dict(raw: dict, source: str | None = None, run_cls: type = TrainRun):
    """A command's config from a mapping of sections; a section the command does not read is an error."""
    raw = dict(raw or {})
    sections = sections_of(run_cls)
    for key in raw:
        if key not in sections:
            raise ConfigError(f"{key}: not a section of `lawtune {command_name(run_cls)}`; "
                              f"valid sections: {', '.join(sections)}")
    built = {name: _build_section(name, cls, raw.get(name)) for name, cls in sections.items()}
    return run_cls(**built, source=source)


# Run files written before the generation section existed kept its keys under eval, with one budget per mode.
_GENERATION_KEYS = ("max_new_tokens", "direct_max_new_tokens", "do_sample", "temperature", "top_p", "static_cache",
                    "cuda_graphs")
_OLD_BUDGETS = {"max_new_tokens": 2048, "direct_max_new_tokens": 8}


def upgrade_run_file(raw: dict) -> dict:
    """Move an older run file's generation keys from ``eval`` to ``generation``. Its two budgets become the one
    budget of the mode the file selects; the old defaults (2048 reasoning, 8 direct) are today's mode defaults."""
    old = raw.get("eval")
    if not isinstance(old, dict) or not any(k in old for k in _GENERATION_KEYS):
        return raw
    raw = {**raw, "eval": {k: v for k, v in old.items() if k not in _GENERATION_KEYS}}
    gen = dict(raw.get("generation") or {})
    gen.update({k: old[k] for k in _GENERATION_KEYS if k in old and k not in _OLD_BUDGETS})
    budgets = {k: old.get(k, default) for k, default in _OLD_BUDGETS.items()}
    if budgets != _OLD_BUDGETS:
        key = "direct_max_new_tokens" if old.get("mode", "direct") == "direct" else "max_new_tokens"
        gen["max_new_tokens"] = budgets[key]
    raw["generation"] = gen
    return raw


def read_yaml(path: str | Path) -> dict:
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
    return upgrade_run_file(raw)


def apply_overrides(raw: dict, overrides: list[str], run_cls: type = TrainRun) -> dict:
    """Apply ``key=value`` overrides (values parsed as YAML scalars) to a raw config dict."""
    raw = {k: dict(v or {}) if isinstance(v, dict) or v is None else v for k, v in (raw or {}).items()}
    keys = valid_keys(run_cls)
    command = command_name(run_cls)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. train.max_steps=100)")
        key, _, text = item.partition("=")
        key = key.strip()
        if SHORTHANDS.get(key) in keys:
            key = SHORTHANDS[key]
        if key not in keys:
            raise ConfigError(f"{key}: not a key of `lawtune {command}`; valid keys: {', '.join(keys)}")
        section, name = key.split(".")
        # A bare number-like path such as "1_train.json" stays a string; YAML only turns true numbers into numbers.
        raw.setdefault(section, {})[name] = yaml.safe_load(text) if text.strip() else None
    return raw


def load_config(path: str | Path | None, overrides: list[str] = (), run_cls: type = TrainRun, lend: bool = False,
                settings: dict[str, Any] | None = None):
    """A command's config: the YAML file (if any), then ``key=value`` overrides, then ``settings`` (typed values by
    dotted key, from command-line flags).

    ``lend``: the file is a full run file lending the sections the command reads; its other known sections are
    left out. Otherwise every section in the file must be one the command reads."""
    raw: dict = read_yaml(path) if path is not None else {}
    if lend:
        unknown = [k for k in raw if k not in KNOWN_SECTIONS]
        if unknown:
            raise ConfigError(f"{path}: {unknown[0]}: unknown section; valid sections: {', '.join(sorted(KNOWN_SECTIONS))}")
        raw = {k: v for k, v in raw.items() if k in sections_of(run_cls)}
    try:
        raw = apply_overrides(raw, list(overrides), run_cls)
        for key, value in (settings or {}).items():
            section, name = key.split(".")
            if not isinstance(raw.get(section), dict):
                raw[section] = {}
            raw[section][name] = value
        return config_from_dict(raw, source=str(path) if path else None, run_cls=run_cls)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path else str(exc)) from None


def config_to_dict(cfg) -> dict:
    out = dataclasses.asdict(cfg)
    out.pop("source", None)
    return out


def config_to_yaml(cfg) -> str:
    return yaml.safe_dump(config_to_dict(cfg), allow_unicode=True, sort_keys=False)


def save_config(cfg, path: str | Path) -> None:
    Path(path).write_text(config_to_yaml(cfg), encoding="utf-8")


def resolve_output_dir(cfg) -> Path:
    """A training run's output folder (``train.output_dir``, or ``grpo.output_dir`` for `lawtune grpo`)."""
    chosen = cfg.grpo.output_dir if isinstance(cfg, GrpoRun) else cfg.train.output_dir
    if chosen:
        return Path(chosen)
    stem = Path(cfg.source).stem if cfg.source else "run"
    return Path("outputs") / stem
