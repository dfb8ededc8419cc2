"""Typed configuration: one pydantic model per section, one config per command holding exactly the sections that
command reads. Each field is typed, bounded and documented once (its attribute docstring is its ``--help``).

A key, section or override that a command does not read is an error naming it and the command's valid keys.
Overrides are ``key=value`` with dotted keys (``train.max_steps=10``); ``model=DIR`` and ``data=FILE`` are shorthands
for ``model.path`` and ``data.train`` where the command has those keys. A YAML given to an inference command with
``--config`` (a full run file, such as an adapter's ``lawtune_config.yaml``) lends only the sections it reads.

A run file lawtune writes records the working directory of the run (``working_dir``): a relative path in it (a field
marked ``NamesPath``: the base model, data files, an adapter, the output folder) is read from there, and one that does
not exist is an error naming the file. A YAML without ``working_dir`` is read from the current directory.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic.types import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, SecretStr

from .errors import UsageError


class ConfigError(UsageError):
    """A configuration problem; the message names the offending key."""


@dataclass(frozen=True)
class DecidesWeights:
    """Marks a field that decides a training run's weights: ``run_fingerprint`` records it, so ``--resume`` continues
    only the run it came from. ``content``: the field names a file (or, if given, this file inside the named
    directory) that is compared by sha256; ``value``: the field's value itself is recorded too."""

    value: bool = True
    content: str | None = None


WEIGHTS = DecidesWeights()
FILE_CONTENT = DecidesWeights(value=False, content="")


@dataclass(frozen=True)
class NamesPath:
    """Marks a field that names a file or folder. A run file lawtune writes records the working directory of the run
    that wrote it (``working_dir``), and a relative path in it is read from there, whatever the current directory.
    ``missing``: what a path that does not exist is called in the error (None: it need not exist yet, an output
    folder); ``hub``: a Hugging Face hub id (``org/name``) is accepted in its place."""

    missing: str | None
    hub: bool = False


MODEL_DIR = NamesPath("model directory does not exist", hub=True)
TOKENIZER_DIR = NamesPath("tokenizer directory does not exist", hub=True)
ADAPTER_DIR = NamesPath("adapter directory does not exist")
DATA_FILE = NamesPath("file not found")
OUTPUT = NamesPath(None)
# The top-level key of a run file that records the working directory of the run that wrote it.
WORKING_DIR = "working_dir"

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DataFormat = Literal["auto", "jecqa", "agieval", "lawbench"]
# KD (knowledge-driven) or CA (case analysis); auto = what the file says (JEC-QA's type field, else the file name).
QuestionType = Literal["auto", "KD", "CA"]
# Evaluation may also ask a LawBench file in its own words (its instruction and question).
EvalPromptFormat = Literal["chat", "plain", "native"]
InferMode = Literal["direct", "reasoning"]
INFER_MODES: tuple[str, ...] = get_args(InferMode)
# Samples a voted answer (predict, ask) may draw per question: one engine request, K rows of the cache.
MAX_VOTE_SAMPLES = 64
VoteSamples = Annotated[int, Field(ge=1, le=MAX_VOTE_SAMPLES)]
M = TypeVar("M", bound=BaseModel)
# How LoRA adapters start (peft's init_lora_weights): pissa and olora take their start out of the base weights.
LoraInit = Literal["default", "gaussian", "pissa", "olora"]
MUTATING_INITS = ("pissa", "olora")


class Section(BaseModel):
    # Numbers given to a text field (a file called 1_train.json is fine, so is a model called 7) stay text.
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, coerce_numbers_to_str=True)

    def problems(self) -> Iterator[str]:
        """Rules across fields: a model with such rules yields a message naming the key for each one broken (the
        first is the validation error)."""
        return iter(())

    @model_validator(mode="after")
    def _no_problems(self) -> Section:
        for problem in self.problems():
            raise ValueError(problem)
        return self


class ModelPath(Section):
    path: Annotated[str, WEIGHTS, MODEL_DIR] = ""
    """Local model directory or hub id of the base model (eval: none with --adapter = the base the adapter
    records)."""


class ModelConfig(ModelPath):
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """auto = bf16 on a GPU that supports it, else fp16 on GPU, fp32 on CPU; or bfloat16/float16/float32."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] = "sdpa"
    """Attention kernel passed to transformers (sdpa, eager, flash_attention_2, flex_attention)."""
    device_map: str | None = None
    """As in transformers' from_pretrained (e.g. auto); None places the model on the chosen device."""
    gpu: NonNegativeInt | None = None
    """CUDA device index to use; None = the first visible GPU (or the CPU without one)."""
    quantization: Annotated[Literal["none", "4bit"], WEIGHTS] = "none"
    """none, or 4bit for QLoRA (NF4 base weights through bitsandbytes; needs a CUDA GPU)."""


class LoraSection(Section):
    r: Annotated[PositiveInt, WEIGHTS] = 16
    """LoRA rank (the original recipe's 16)."""
    alpha: Annotated[PositiveInt, WEIGHTS] = 16
    """LoRA scaling numerator; the update is scaled by alpha / r (with lora.use_rslora by alpha / sqrt(r), so a
    higher rank no longer shrinks the update: keep alpha, raise r)."""
    dropout: Annotated[float, Field(ge=0, lt=1), WEIGHTS] = 0.0
    """Dropout on the LoRA input."""
    target_modules: Annotated[list[str], Field(min_length=1), WEIGHTS] = Field(default_factory=PROJECTIONS.copy)
    """Module names that get adapters: all seven attention and MLP projections by default."""
    use_rslora: Annotated[bool, WEIGHTS] = False
    """rsLoRA: scale the update by alpha / sqrt(r) instead of alpha / r (rank-stabilised; better at high ranks)."""
    use_dora: Annotated[bool, WEIGHTS] = False
    """DoRA: learn each adapted weight's column norms (magnitude) apart from its LoRA direction update. Slower per
    step than plain LoRA; merges into the base like LoRA."""
    init: Annotated[LoraInit, WEIGHTS] = "default"
    """How the adapters start: default (A random, B zero: the model starts as the base), gaussian (A from a
    normal), pissa (A, B from the top singular vectors of each weight, taken out of the base) or olora (from a
    QR decomposition, likewise). pissa and olora change the base weights while training; the saved adapter is
    converted to a plain LoRA of the original base (twice the rank), so eval, merge and serve use that base."""
    modules_to_save: Annotated[list[str], WEIGHTS] = Field(default_factory=list)
    """Modules trained in full and saved with the adapter (e.g. lm_head, embed_tokens), beside the LoRA ones."""

    def problems(self) -> Iterator[str]:
        if self.init in MUTATING_INITS and self.use_dora:
            yield (f"lora.init: {self.init} with lora.use_dora cannot be saved as a LoRA of the original base "
                   f"(peft converts the LoRA matrices only); use one of them")
        if self.init in MUTATING_INITS and self.modules_to_save:
            yield (f"lora.init: {self.init} with lora.modules_to_save cannot be saved as a LoRA of the original base "
                   f"(peft's conversion keeps the LoRA matrices only); use one of them")
        overlap = sorted(set(self.modules_to_save) & set(self.target_modules))
        if overlap:
            yield f"lora.modules_to_save: {', '.join(overlap)} also in lora.target_modules (train it one way)"


class DataConfig(Section):
    train: Annotated[str, FILE_CONTENT, DATA_FILE] = ""
    """JEC-QA training file (JSON Lines or one JSON array)."""
    eval: Annotated[str | None, FILE_CONTENT, DATA_FILE] = None
    """Separate held-out file; None = split eval_fraction off the training file."""
    eval_fraction: Annotated[float, Field(ge=0, lt=1), WEIGHTS] = 0.05
    """Share of the training file held out for evaluation (by statement, never splitting repeats)."""
    eval_max_samples: PositiveInt | None = 200
    """Cap on held-out questions scored during training (keeps in-training evaluation cheap)."""
    max_samples: Annotated[PositiveInt | None, WEIGHTS] = None
    """Load at most this many usable records from the training file (quick debugging runs)."""
    prompt_format: Annotated[Literal["chat", "plain"], WEIGHTS] = "chat"
    """chat = the tokenizer's own chat template; plain = the original recipe's single-string template."""
    max_length: Annotated[int, Field(ge=32), WEIGHTS] = 2048
    """Longest tokenized example (at least 32); longer ones are cut inside the question, never in the answer."""
    seed: Annotated[int, WEIGHTS] = 42
    """Seed of the train/eval split."""
    format: Annotated[DataFormat, WEIGHTS] = "auto"
    """File format of data.train, data.eval and data.mix: jecqa, agieval or lawbench; auto = told by the first
    record's fields."""
    type: QuestionType = "auto"
    """KD (knowledge-driven) or CA (case analysis) for every record of data.train, data.eval and data.mix; auto =
    what the file says: JEC-QA's type field, AGIEval's file name (kd or ca in it), LawBench's (1-2 KD, 3-6 CA), else
    unknown. Set it for a renamed copy of an AGIEval or LawBench file."""
    mix: Annotated[str | None, FILE_CONTENT, DATA_FILE] = None
    """A second JEC-QA file trained answer-only beside data.train (its reasoning, if any, left out): after
    `lawtune distill`, answer-only records keep direct mode working while the traces train reasoning."""
    mix_ratio: Annotated[PositiveFloat, WEIGHTS] = 0.5
    """Answer-only records drawn from data.mix (seeded) per training record of data.train."""

    def problems(self) -> Iterator[str]:
        if self.mix is None and self.mix_ratio != 0.5:
            yield "data.mix_ratio: set without data.mix (the file to draw answer-only records from)"


class OptimizationSection(Section):
    """What `train` and `grpo` both set the same way: the optimizer, its schedule, logging and checkpoints. Each
    command's section (``train``, ``grpo``) adds its own fields and may change a default."""

    output_dir: Annotated[str | None, OUTPUT] = None
    """Where checkpoints and the final adapter go; default outputs/<config file stem> (a run records the one
    it used)."""
    per_device_batch_size: PositiveInt = 2
    """Examples per device per micro-step: sequences in `train` (the original recipe's 2), completions in `grpo`."""
    gradient_accumulation_steps: PositiveInt = 4
    """Micro-steps per optimizer step (the original recipe's 4)."""
    learning_rate: PositiveFloat = 2e-4
    """Peak learning rate of the LoRA parameters."""
    max_steps: PositiveInt = 5000
    """Optimizer steps."""
    warmup_steps: NonNegativeInt = 100
    """Linear warm-up steps."""
    lr_scheduler_type: str = "linear"
    """Any transformers scheduler name (linear, cosine, constant, constant_with_warmup, ...)."""
    weight_decay: NonNegativeFloat = 0.0
    """AdamW weight decay on the LoRA parameters."""
    max_grad_norm: PositiveFloat = 1.0
    """Gradient clipping norm."""
    optim: str = "adamw_bnb_8bit"
    """transformers optimizer name; adamw_bnb_8bit is the original recipe's 8-bit AdamW."""
    save_steps: PositiveInt = 500
    """Checkpoint every this many steps (what --resume continues from)."""
    save_total_limit: PositiveInt | None = 3
    """Keep at most this many checkpoints."""
    logging_steps: PositiveInt = 10
    """Log every this many steps (loss, lr and tokens/s; grpo: rewards, lengths, clipping and KL)."""
    eval_steps: NonNegativeInt = 500
    """Score the held-out split every this many steps; 0 = only at the end (grpo: also before the first step)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    seed: int = 42
    """Seed of LoRA initialisation, data order and dropout (grpo: also of the rollouts' samples, each drawn from
    this seed, the question, the step and the sample index)."""
    report_to: list[str] = Field(default_factory=lambda: ["tensorboard"])
    """transformers logging integrations (tensorboard, wandb, none)."""


class TrainConfig(OptimizationSection):
    packing: bool = False
    """Padding-free batches: examples are concatenated with per-example position ids (use flex_attention)."""
    batch_tokens: PositiveInt | None = None
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
    dataloader_num_workers: NonNegativeInt = 0
    """Worker processes of the data loader."""
    ddp_bucket_cap_mb: PositiveInt | None = None
    """Several processes (DDP): MiB of gradients per bucket, each all-reduced as soon as the backward has
    filled it; None = PyTorch's 25. The r16 LoRA gradient of the 1.5B model is 70 MiB in fp32: 80 puts it
    in one bucket (besides DDP's 1 MiB first one), all-reduced after the backward (~0.3 ms over NVLink
    between 2 H100s) instead of NCCL kernels waiting for the other rank beside the backward's own: on two
    H100s at 8,192 tokens x accumulation 2, 1.6% and 1.7% more tokens/s than 25 in two pairs (bench/README.md)."""


class AdapterPath(Section):
    path: Annotated[str | None, ADAPTER_DIR] = None
    """LoRA adapter directory (e.g. outputs/run/final_model); None = the base model alone (merge needs one)."""
    force: bool = False
    """Load the adapter even where the base model it records (architecture, vocabulary, tokenizer, embedding
    weights) differs from this one."""


class AdapterConfig(AdapterPath):
    prompt_format: EvalPromptFormat | None = None
    """chat, plain, or native (a LawBench file's own instruction and question, LawBench's protocol); None = the
    adapter's own (its lawtune_config.yaml), a merged model's, else chat."""
    fold: bool = True
    """Fold the adapter into the loaded base weights (peft's merge_adapter), rounded once to the model's dtype as
    `lawtune merge` rounds them: generation runs at the base model's speed (one H200, rank 16 on the seven projections
    unfolded: 254 against 416 tokens/s for one stream, bench/README.md). false = the adapter's modules every step."""


class GenerationConfig(Section):
    max_new_tokens: PositiveInt | None = None
    """Token budget of the selected mode and a hard cap on generated tokens, a forced answer included;
    None = the mode's default: 8 in direct mode, 2048 in reasoning mode."""
    do_sample: bool = False
    """Greedy decoding by default; sampling uses temperature and top_p."""
    temperature: PositiveFloat = 0.6
    """Sampling temperature (the model card's 0.6)."""
    top_p: Annotated[float, Field(gt=0, le=1)] = 0.95
    """Nucleus sampling mass (the model card's 0.95)."""
    top_k: NonNegativeInt = 0
    """Sample among the k likeliest tokens only; 0 = no limit."""
    seed: int = 0
    """Sampling seed; each question's samples come from (seed, the question, the sample index), whatever else is
    generated beside it."""
    engine: bool = True
    """Generate with lawtune's engine (continuous batching on a static KV cache, lawtune/generation/engine/);
    false = transformers' generate. Models the engine cannot run use generate anyway."""
    static_cache: bool = True
    """Where transformers' generate runs: a preallocated (static) KV cache instead of one that grows by copying
    every token, for generations of 32 tokens or more (direct mode's 8 tokens measured faster without it)."""
    cuda_graphs: bool = True
    """On a GPU the engine replays each decoding step from a CUDA graph; false = every step eagerly."""
    kv_cache: Annotated[str, Field(pattern=r"^([1-9][0-9]?(\.[0-9]+)?%|[0-9]+(\.[0-9]+)?GiB)$")] = "70%"
    """The engine's KV cache budget: "40GiB", or a share of the GPU's free memory once the model is loaded ("70%",
    like vLLM's gpu_memory_utilization but of what is free). It caps the questions decoded at once to the rows it
    holds at the call's row length (prompt + token budget); the rest wait for a free row. On a CPU a share is of the
    available RAM."""


class DistillGeneration(GenerationConfig):
    max_new_tokens: PositiveInt | None = 4096
    """Token budget of each sampled reasoning completion (think text, </think> and the answer)."""
    do_sample: bool = True
    """Distillation always samples (temperature, top_p, top_k): greedy decoding would give K equal completions."""


class EvalConfig(Section):
    mode: Literal["direct", "reasoning", "choice"] = "direct"
    """direct = empty think block then read the letters; reasoning = think first; choice = score answers.
    During training, reasoning is evaluated as direct (thousands of tokens a question)."""
    batch_size: PositiveInt = 64
    """Questions per scoring batch (choice mode's forward batch). Generating modes hand the engine 8 batches at once
    and decode as many of them at once as generation.kv_cache holds."""
    shuffle_options: bool = False
    """Re-letter options with a fixed seed (answers mapped back) to expose letter bias."""
    seed: int = 0
    """Seed of option shuffling."""


class EvalFileConfig(EvalConfig):
    data: str = ""
    """JEC-QA file with answers to score."""
    output: str = "report.json"
    """Report file (one JSON file: summary and every question's output)."""
    max_samples: PositiveInt | None = None
    """Score only the first N questions."""
    format: DataFormat = "auto"
    """File format of eval.data: jecqa, agieval or lawbench; auto = told by the first record's fields."""
    type: QuestionType = "auto"
    """KD (knowledge-driven) or CA (case analysis) for every record of eval.data; auto = what the file says: JEC-QA's
    type field, AGIEval's file name (kd or ca in it), LawBench's (1-2 KD, 3-6 CA), else unknown. Set it for a renamed
    copy of an AGIEval or LawBench file."""
    suite: str | None = None
    """A suite YAML (model, adapter, runs: name, data, mode, prompt_format, samples, max_new_tokens, format,
    type): every run is scored and eval.output is one HTML page, each run's report beside it as <page>.<name>.json."""
    samples: PositiveInt = 1
    """K sampled answers per question (generation.temperature and top_p, the model card's 0.6 and 0.95): the report
    gets avg@K, maj@K and pass@K; 1 = one answer, greedy unless generation.do_sample."""
    api_url: str | None = None
    """Score a served model instead of a local one: the API root of an OpenAI-compatible server (e.g.
    http://host:8000/v1: `lawtune serve`, vLLM). Prompts are rendered here with eval.tokenizer exactly as in-process
    eval renders them and sent as token ids to /v1/completions; choice mode reads the prompts' log-probabilities
    (echo with logprobs). Scoring, report and page are eval's; a rerun skips the questions scored before
    (<report>.questions.jsonl)."""
    api_model: str | None = None
    """The model name the server serves (needed with api_url)."""
    tokenizer: Annotated[str | None, TOKENIZER_DIR] = None
    """The served model's tokenizer (a local folder or hub id; its chat template renders the prompts): needed with
    api_url, except with api_chat."""
    api_key: SecretStr | None = None
    """Bearer token of the server; None = OPENAI_API_KEY from the environment, else none. Never printed."""
    api_chat: bool = False
    """Ask /v1/chat/completions (a chat-only server renders the question with its own template): reasoning mode
    only, answers read after </think> or from content beside reasoning_content; a cut-off trace cannot be forced."""
    api_concurrency: Annotated[int, Field(ge=1, le=1024)] = 8
    """Requests to the server in flight at once."""
    api_timeout_s: PositiveFloat = 600.0
    """Seconds one request may take."""
    api_retries: Annotated[int, Field(ge=0, le=20)] = 5
    """Times a request answered 429 or 5xx (or not reached) is sent again, after 1, 2, 4 … s (at most 30; the
    server's Retry-After where given)."""

    def problems(self) -> Iterator[str]:
        if self.suite and self.data:
            yield "eval.data: a suite names its own files (its runs' data); give --suite or --data"
        if self.samples > 1 and self.mode == "choice":
            yield "eval.samples: choice mode scores every answer set, nothing is sampled (use direct)"
        if bool(self.api_url) != bool(self.api_model):  # the server and the model name it serves
            yield (f"eval.{'api_url' if self.api_model else 'api_model'}: give both api_url and api_model (--api-url, "
                   f"--api-model), or neither")
        for key in ("tokenizer", "api_key", "api_chat"):
            if getattr(self, key) and not self.api_url and not self.suite:
                yield f"eval.{key}: only with eval.api_url (a served model); a local model brings its own"
        if self.api_chat and self.mode != "reasoning":
            yield (f"eval.api_chat: {self.mode} mode needs the prompt rendered here (direct: its empty think block; "
                   f"choice: the prompt's log-probabilities); a chat server renders its own: use --mode reasoning")
        if self.api_url and not self.api_chat and not self.tokenizer and not self.suite:
            yield "eval.tokenizer: needed with eval.api_url (the served model's tokenizer folder: prompts are rendered here)"


class PredictConfig(Section):
    data: str = ""
    """JEC-QA file (answers not needed, e.g. 0_test.json)."""
    output: str = ""
    """Predictions file (JSON Lines); a rerun skips the ids already in it."""
    mode: InferMode = "direct"
    """direct or reasoning."""
    batch_size: PositiveInt = 64
    """Questions per batch."""
    max_samples: PositiveInt | None = None
    """Answer only the first N questions of the file (a trial run before a long one)."""
    samples: VoteSamples = 1
    """K sampled answers per question (generation.temperature and top_p), one prefill for the K, voted into one by
    eval's maj@K rule; each line also gets `samples` (every sample's answer) and `agreement`. 1 = one answer, greedy
    unless generation.do_sample."""


class AskConfig(Section):
    question: str | None = None
    """The question; trailing lines 'A. …' are read as its options. None = interactive (stdin)."""
    option: list[str] = Field(default_factory=list)
    """Options as A=TEXT, one entry each."""
    record: str | None = None
    """One JEC-QA record as JSON (statement, option_list)."""
    mode: InferMode = "direct"
    """direct or reasoning."""
    samples: VoteSamples = 1
    """K sampled answers (generation.temperature and top_p), one prefill for the K, voted into one by eval's maj@K
    rule: prints the majority sample's words, K and the agreement, then the voted answer line (not streamed). 1 = one
    answer, streamed, greedy unless generation.do_sample."""


class ServeConfig(Section):
    host: str = "127.0.0.1"
    """Address to listen on."""
    port: Annotated[int, Field(ge=0, le=65535)] = 8000
    """Port (0 = any free port)."""
    max_prompt_tokens: PositiveInt | None = None
    """Longest prompt a request may send, in tokens; None = the model's context. A prompt longer than this, or one
    that leaves no room in the context for the request's token budget, is refused at once (400)."""
    slots: PositiveInt | None = None
    """Requests generated at once (rows of the engine's KV cache); more wait for a free row. None = as many as
    generation.kv_cache holds at max_len, at most 256 (the 1.5B model in bf16: 28 layers x 2 x 2 heads x 128 x 2 bytes
    = 28 KiB a token, 224 MiB a row of 8,192)."""
    max_len: PositiveInt = 8192
    """Tokens of one request, prompt and answer together (the engine's row length; at most the model's context)."""
    api_key: SecretStr | None = None
    """Bearer token every /v1 route requires (compared in constant time); None = LAWTUNE_API_KEY from the
    environment, else none (then the server warns when it listens beyond loopback). Never printed."""
    max_body_bytes: PositiveInt = 1 << 20
    """Largest request body in bytes (1 MiB); a larger one is read and discarded, never held, and answered 413."""
    max_queue: NonNegativeInt = 1024
    """Requests that may wait for a free row (a request of n choices counts n); past it, 503 with Retry-After at
    once."""
    request_timeout_s: PositiveFloat | None = 600.0
    """Seconds a request may take: 504 if its first token has not come by then, an error event in its stream after
    it; None = no limit."""
    stream_interval: Annotated[int, Field(ge=1, le=256)] | None = None
    """A stream's tokens are sent in chunks of at least this many (the first token and the last at once), as vLLM's
    --stream-interval: fewer chunks cost the server less with many clients. 1 = every token as it comes; None = by
    the load: 1 while fewer than 16 rows run, then one token more for every 8 rows, at most 8."""
    shutdown_grace_s: NonNegativeFloat = 30.0
    """On SIGTERM (or Ctrl-C) new connections are refused and running requests get this many seconds to finish; the
    rest end with an error event (streams) or a 503, then the process exits 0."""


class MergeConfig(Section):
    output: str = ""
    """Directory for the merged model (a non-empty one is replaced only with --overwrite)."""
    dtype: Literal["bfloat16", "float16", "float32"] | None = None
    """Saved dtype: bfloat16, float16 or float32; None = the base checkpoint's."""


def _one_or_more(value: Any) -> Any:
    """A single value where a list is expected (a YAML ``teacher_url: URL``, as before it took several): a list of it."""
    return [value] if isinstance(value, str) else value


class DistillConfig(Section):
    data: str = ""
    """JEC-QA file with answers (a training split) to sample reasoning for."""
    output: str = ""
    """Traces file (JSON Lines: the records with a ``reasoning`` field); beside it ``.rejected.jsonl`` and
    ``.report.json``. A rerun skips the ids already in either file."""
    samples: PositiveInt = 4
    """Reasoning completions sampled per question."""
    pick: Literal["shortest", "random", "all"] = "shortest"
    """Which kept completion a question gets: shortest, random (seeded), or all (one record each)."""
    batch_size: PositiveInt = 64
    """Questions sampled at once (their samples share the engine's rows)."""
    teacher_url: Annotated[list[str], BeforeValidator(_one_or_more)] = Field(default_factory=list)
    """OpenAI-compatible endpoints (e.g. http://host:8000/v1: a larger R1, vLLM, `lawtune serve`) to sample from
    instead of the local model; the flag once per endpoint (in YAML one URL or a list). A question's request goes
    to one of them, in turn (round robin); one that still fails after the client's retries stops the run with an
    error naming it. All must serve teacher_model."""
    teacher_model: str | None = None
    """The model name the endpoint serves (needed with teacher_url)."""
    retry_rejected: bool = False
    """Sample the questions of the rejected file again."""
    timeout_s: PositiveFloat = 600.0
    """Seconds one request to the teacher may take."""
    api_key: SecretStr | None = None
    """Bearer token of the teacher's endpoint; None = OPENAI_API_KEY from the environment, else none. Never
    printed."""

    def problems(self) -> Iterator[str]:
        if bool(self.teacher_url) != bool(self.teacher_model):  # the endpoint and the model name it serves
            yield f"distill.{'teacher_url' if self.teacher_model else 'teacher_model'}: give both or neither"
        if any(not url.strip() for url in self.teacher_url):
            yield "distill.teacher_url: an empty URL"


class CheckConfig(Section):
    file: str = ""
    """JEC-QA file to validate."""
    tokenizer: str | None = None
    """Tokenizer directory: also report token lengths of training examples."""
    prompt_format: EvalPromptFormat = "chat"
    """Prompt format of those token lengths (chat, plain, or native for LawBench files)."""
    as_json: bool = False
    """Print one JSON object."""
    format: DataFormat = "auto"
    """File format: jecqa, agieval or lawbench; auto = told by the first record's fields."""
    type: QuestionType = "auto"
    """KD (knowledge-driven) or CA (case analysis) for every record; auto = what the file says: JEC-QA's type field,
    AGIEval's file name (kd or ca in it), LawBench's (1-2 KD, 3-6 CA), else unknown. Set it for a renamed copy of an
    AGIEval or LawBench file."""


class OverlapConfig(Section):
    a: str = ""
    """The file that may hold the questions (e.g. a training file)."""
    b: str = ""
    """The file whose questions are looked for in A (e.g. a benchmark)."""
    as_json: bool = False
    """Print one JSON object: {"b_records", "overlap", "same_statement_only", "pairs": every pair's a_id and b_id}."""
    exclude_output: str | None = None
    """Write B's own records without those found in A to this file, in B's format (name it like B where the format
    reads KD/CA from the file name: AGIEval, LawBench)."""


class CompareConfig(Section):
    report_a: str = ""
    """First eval report (e.g. the base model's)."""
    report_b: str = ""
    """Second eval report (e.g. the fine-tuned model's)."""
    html: str = "compare.html"
    """HTML report path."""


class CardConfig(Section):
    path: str = ""
    """A training run's output folder (its final_model/ and best_model/ get the card) or one model folder
    (final_model/, best_model/, a `lawtune merge` output)."""
    report: list[str] = Field(default_factory=list)
    """Eval reports (`lawtune eval` JSON) whose results the card carries: its model-index, tables and contamination
    check; one flag each. None given = a card without results (the ones named before are not kept)."""


class GrpoConfig(OptimizationSection):
    # Defaults of the shared fields for GRPO with a LoRA (configs/..._grpo.yaml says where each comes from).
    per_device_batch_size: PositiveInt = 16
    """Completions per device per micro-step: 16 x 4 accumulation steps = 64, the groups of 8 questions a step."""
    learning_rate: PositiveFloat = 1e-5
    """Peak learning rate of the LoRA parameters: TRL's 1e-6 is for full fine-tuning, and LoRA's best rate measured
    about 10x full fine-tuning's."""
    max_steps: PositiveInt = 500
    """Optimizer steps: 500 x 8 questions = 4,000 questions, a starting point."""
    warmup_steps: NonNegativeInt = 0
    """Linear warm-up steps."""
    lr_scheduler_type: str = "constant"
    """Any transformers scheduler name; constant, as the run's length is a budget, not a schedule to finish."""
    optim: str = "adamw_torch"
    """transformers optimizer name (PyTorch's AdamW here)."""
    save_steps: PositiveInt = 50
    """Checkpoint every this many steps (what --resume continues from)."""
    logging_steps: PositiveInt = 1
    """Log every this many steps: rewards, lengths, clipping and KL."""
    eval_steps: NonNegativeInt = 50
    """Score the held-out split in reasoning mode before the first step and every this many steps; 0 = only before
    the first and at the end."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass to save memory (TRL's GRPOConfig default)."""
    packed: bool = True
    """The training pass on packed rows: each micro-batch's prompts and completions end to end without padding,
    positions restarting at each (flex attention's document mask with model.attn_implementation=flex_attention),
    log-probabilities only at completion tokens; the same loss and metrics as TRL's. False = TRL's padded rows."""
    compile: bool = False
    """torch.compile each decoder layer for the training pass, as train.compile does (skipped on the CPU; the engine
    samples with the layers uncompiled)."""
    adapter: Annotated[str | None, DecidesWeights(content="adapter_model.safetensors"), ADAPTER_DIR] = None
    """LoRA adapter to continue (e.g. outputs/RUN/final_model of `lawtune train`), loaded trainable; None = a fresh
    LoRA from the lora section."""
    force: bool = False
    """Continue grpo.adapter even where the base model it records differs from model.path."""
    num_generations: Annotated[int, Field(ge=2)] = 8
    """Group size (at least 2): completions sampled per question; advantages compare each with its group's mean."""
    temperature: PositiveFloat = 0.6
    """Sampling temperature of the rollouts."""
    top_p: Annotated[float, Field(gt=0, le=1)] = 0.95
    """Nucleus sampling mass of the rollouts."""
    max_completion_length: PositiveInt = 1024
    """Token budget of a completion (think text, </think> and the answer); a completion cut there has no answer."""
    beta: NonNegativeFloat = 0.0
    """KL coefficient against the starting policy (the continued adapter, else the base model); 0 = no reference
    pass."""
    epsilon: PositiveFloat = 0.2
    """Lower clipping range of the probability ratio (PPO's epsilon)."""
    epsilon_high: PositiveFloat | None = 0.28
    """Upper clipping range; None = epsilon."""
    loss_type: Literal["dapo", "grpo", "dr_grpo", "bnpo"] = "dapo"
    """How token losses are averaged, as TRL names it: dapo (over all tokens of the batch), grpo (per sequence),
    dr_grpo (a constant), bnpo."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Advantages divided by the std of the group (group), of the batch (batch), or not at all (none)."""
    reward_f1_weight: NonNegativeFloat = 0.0
    """Weight of the partial-credit reward (per-option F1) beside the exact-set reward (weight 1)."""
    reward_format_weight: NonNegativeFloat = 0.0
    """Weight of the format reward (the think block closed by the model, then one 答案： line); logged at any weight.
    The exact-set reward already needs a closed think block and a readable answer; a format bonus in a group where no
    completion is right is scaled up by the group's tiny std into whole advantages for well-formed wrong answers."""
    length_budget: PositiveInt | None = None
    """Completion tokens past which the length penalty applies; None = no length penalty."""
    length_penalty: PositiveFloat = 1.0
    """Reward lost per further length_budget tokens (linear form, with length_budget); with the soft_overlong form,
    the reward at max_completion_length (DAPO's -1, its default 1)."""
    length_penalty_form: Literal["linear", "soft_overlong"] = "linear"
    """The length penalty's shape: linear = length_penalty lost per length_budget tokens past length_budget;
    soft_overlong = DAPO's soft overlong punishment, 0 up to max_completion_length - overlong_cache tokens, then
    linear down to -length_penalty at max_completion_length (needs overlong_cache, not length_budget)."""
    overlong_cache: PositiveInt | None = None
    """The soft_overlong form's ramp: the last tokens of max_completion_length over which the penalty falls from 0
    to -length_penalty (DAPO's L_cache: 4,096 of 20,480 in its paper); less than max_completion_length."""
    mask_truncated: bool = False
    """Overlong filtering: completions cut at max_completion_length (no end token) are left out of the loss (TRL's
    mask_truncated_completions). False = TRL's default: a cut completion gets no answer, no reward, and so teaches
    shorter reasoning; DAPO's recipe turns filtering on, beside its soft overlong penalty (the soft_overlong form)."""
    importance_sampling_level: Literal["token", "sequence"] = "token"
    """Where the probability ratio is taken (TRL's importance_sampling_level): token = GRPO's per-token ratios (TRL's
    default); sequence = GSPO, one ratio per completion (the mean of its token log-ratios). GSPO's paper pairs it
    with loss_type grpo; with dapo, bnpo or dr_grpo each completion weighs by its length (TRL warns)."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: each optimizer step trains on its configured number of groups (questions) whose
    rewards differ. A group whose completions all score the same has zero advantage and teaches nothing (TRL's
    frac_reward_zero_std), so further questions are drawn and sampled in its place, up to max_resample extra groups;
    a step then trains on the informative groups it has, and one with none skips its update. False = TRL's behaviour
    (TRL has no dynamic sampling). On several processes the step's groups are those of all ranks together."""
    max_resample: NonNegativeInt | None = None
    """Extra groups dynamic_sampling may sample per optimizer step, all processes together (each samples an equal
    share, rounded up); None = as many as the step's own groups (a step then costs at most twice its rollouts).
    Needs dynamic_sampling."""
    rollout: Literal["engine", "trl"] = "engine"
    """Who samples the completions: engine = lawtune's generation engine on the live weights (TRL's experimental
    rollout_func); trl = TRL's own generation (transformers' generate)."""
    fold_adapter: bool = True
    """The engine (rollouts and the held-out evaluation) samples from an inference copy of the model with the LoRA
    adapter folded into its projections, refreshed before each call (as TRL's vLLM path merges it): the adapted
    projections' weights once more in memory (2.6 GiB for the 1.5B model), and updates below a bf16 weight's
    rounding step are rounded away there (generation/folded.py). LoRA, rsLoRA and DoRA; other adapters are sampled
    unfolded. false = the adapter's own modules every decoding step, the training pass's arithmetic, slower."""
    eval_batch_size: PositiveInt = 64
    """Held-out questions generated at once."""
    eval_max_new_tokens: PositiveInt | None = None
    """Token budget of the held-out reasoning evaluation; None = max_completion_length."""

    def problems(self) -> Iterator[str]:
        if self.max_resample is not None and not self.dynamic_sampling:
            yield "grpo.max_resample: set without grpo.dynamic_sampling=true (the sampling it caps)"
        if self.length_penalty_form == "linear":
            if self.length_budget is None and self.length_penalty != 1.0:
                yield "grpo.length_penalty: set without grpo.length_budget (the tokens it applies past)"
            if self.overlong_cache is not None:
                yield "grpo.overlong_cache: set without grpo.length_penalty_form=soft_overlong (the form it shapes)"
        elif self.overlong_cache is None:
            yield "grpo.overlong_cache: grpo.length_penalty_form=soft_overlong needs it (the tokens of its ramp)"
        else:
            if self.overlong_cache >= self.max_completion_length:
                yield (f"grpo.overlong_cache: {self.overlong_cache} must be less than grpo.max_completion_length "
                       f"({self.max_completion_length})")
            if self.length_budget is not None:
                yield ("grpo.length_budget: not read by grpo.length_penalty_form=soft_overlong (its penalty starts at "
                       "max_completion_length - overlong_cache)")


class SuiteRun(Section):
    """One run of an eval suite: a file scored in one mode; a key left out takes the command's value."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")]
    """The run's name (letters, digits, . _ -), unique in the suite; its report is written as <page>.<name>.json."""
    data: Annotated[str, Field(min_length=1)]
    """The file to score (JEC-QA, AGIEval or LawBench)."""
    mode: Literal["direct", "reasoning", "choice"] | None = None
    """As eval.mode."""
    prompt_format: EvalPromptFormat | None = None
    """As adapter.prompt_format."""
    samples: PositiveInt | None = None
    """As eval.samples."""
    max_new_tokens: PositiveInt | None = None
    """As generation.max_new_tokens."""
    format: DataFormat | None = None
    """As eval.format."""
    type: QuestionType | None = None
    """As eval.type."""


class Suite(Section):
    """A suite YAML (`lawtune eval --suite`): one model (and adapter) scored on several files and modes."""

    model: str | None = None
    """The base model; None = --model."""
    adapter: str | None = None
    """The adapter; None = --adapter."""
    api_url: str | None = None
    """A served model instead (as eval.api_url; None = --api-url)."""
    api_model: str | None = None
    """The name it is served under (as eval.api_model)."""
    tokenizer: str | None = None
    """Its tokenizer (as eval.tokenizer)."""
    runs: Annotated[list[SuiteRun], Field(min_length=1)]
    """The runs, scored in this order with the model loaded once."""

    def problems(self) -> Iterator[str]:
        if self.api_url and (self.model or self.adapter):
            yield f"{'model' if self.model else 'adapter'}: a suite with api_url scores the served model (give one)"
        if self.api_model and not self.api_url:
            yield "api_model: only with api_url"
        names = [run.name for run in self.runs]
        yield from (f"runs: the name {name!r} is used twice" for name in names if names.count(name) > 1)


# ----------------------------------------------------------------------------- one config per command


class Run(Section):
    """A command's whole config: its sections. The class keyword ``title`` names the command in errors; the class
    docstring is the command's help."""

    source: str | None = Field(default=None, exclude=True, repr=False)
    """The YAML file the config was read from (not saved with it)."""


class TrainingRun(Run):
    """A command that trains a LoRA on a base model and data; each command adds its own section. Everything a
    training run reads is saved as lawtune_config.yaml beside its adapters."""

    model: ModelConfig = ModelConfig()
    lora: LoraSection = LoraSection()
    data: DataConfig = DataConfig()

    def lora_problems(self) -> Iterator[str]:
        if self.lora.init in MUTATING_INITS and self.model.quantization == "4bit":
            yield (f"lora.init: {self.lora.init} rewrites the base weights, which a 4-bit base (model.quantization) "
                   f"cannot hold exactly; use init default or gaussian")


class TrainRun(TrainingRun, title="train"):
    """LoRA SFT from a YAML config"""

    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    generation: GenerationConfig = GenerationConfig()

    def problems(self) -> Iterator[str]:
        yield from self.lora_problems()
        tokens, longest = self.train.batch_tokens, self.data.max_length
        if tokens is not None and tokens < longest:
            yield f"train.batch_tokens: {tokens} cannot hold an example of data.max_length={longest} tokens"


class DemoRun(TrainRun):
    """offline CPU demo: tiny random model trained on bundled questions"""


class GrpoRun(TrainingRun, title="grpo"):
    """GRPO on the exact-set reward (TRL), continuing an SFT adapter or a fresh LoRA"""

    grpo: GrpoConfig = GrpoConfig()

    def problems(self) -> Iterator[str]:
        g = self.grpo
        # data.mix belongs to SFT; a continued adapter keeps its own LoRA shape.
        if self.data.mix is not None:
            yield "data.mix: grpo samples its own completions; answer-only mixing is for `lawtune train`"
        if g.adapter and self.lora != LoraSection():
            yield "lora: grpo.adapter is continued with its own LoRA; lora shapes a fresh one (give one)"
        yield from self.lora_problems()
        if self.lora.init in MUTATING_INITS and g.beta > 0:
            yield (f"lora.init: {self.lora.init} takes the adapter's start out of the base weights, and grpo.beta > 0 "
                   f"uses the base (adapter off) as its reference; use init default or gaussian, or grpo.beta=0")
        if self.data.max_length <= g.max_completion_length:
            yield (f"data.max_length: {self.data.max_length} leaves no room for a prompt beside "
                   f"grpo.max_completion_length={g.max_completion_length}")
        if (g.per_device_batch_size * g.gradient_accumulation_steps) % g.num_generations:
            yield (f"grpo.per_device_batch_size: {g.per_device_batch_size} x gradient_accumulation_steps "
                   f"{g.gradient_accumulation_steps} are not whole groups of num_generations={g.num_generations}")


class InferenceRun(Run):
    """A command that loads a base model and, optionally, a LoRA adapter, and generates with it; each command adds
    its own section."""

    model: ModelConfig = ModelConfig()
    adapter: AdapterConfig = AdapterConfig()
    generation: GenerationConfig = GenerationConfig()


class EvalRun(InferenceRun, title="eval"):
    """score a model (and adapter), or a served one (--api-url), on a JEC-QA, AGIEval or LawBench file"""

    eval: EvalFileConfig = EvalFileConfig()

    def problems(self) -> Iterator[str]:
        if not self.eval.api_url:
            return
        # a served model: the settings of a local one would be silently ignored
        local = [(f"model.{k}", v, ModelConfig.model_fields[k].default) for k, v in self.model]
        local += [(f"adapter.{k}", getattr(self.adapter, k), AdapterConfig.model_fields[k].default)
                  for k in ("path", "force", "fold")]
        local += [(f"generation.{k}", getattr(self.generation, k), GenerationConfig.model_fields[k].default)
                  for k in ("engine", "static_cache", "cuda_graphs", "kv_cache", "top_k")]
        for key, value, default in local:
            if value != default:
                yield (f"{key}: not read with eval.api_url (the server runs its model; "
                       + ("top_k is no OpenAI field)" if key.endswith("top_k") else "leave it out)"))


class PredictRun(InferenceRun, title="predict"):
    """answer every question of a file without answers (JSON Lines, resumable)"""

    predict: PredictConfig = PredictConfig()


class AskRun(InferenceRun, title="ask"):
    """answer one question, streaming the reasoning (interactive without --question)"""

    ask: AskConfig = AskConfig()


class ServeRun(InferenceRun, title="serve"):
    """OpenAI-compatible HTTP API and a question page at /"""

    serve: ServeConfig = ServeConfig()

    def problems(self) -> Iterator[str]:
        if self.serve.slots is not None and self.generation.kv_cache != GenerationConfig.model_fields["kv_cache"].default:
            yield "generation.kv_cache: not read with serve.slots (the rows are given); leave one out"


class DistillRun(InferenceRun, title="distill"):
    """sample reasoning per question, keep the traces that reach the gold answer (to train on)"""

    generation: DistillGeneration = DistillGeneration()
    distill: DistillConfig = DistillConfig()

    def problems(self) -> Iterator[str]:
        if not self.generation.do_sample:
            yield "generation.do_sample: distill always samples (greedy would give K equal completions)"


class MergeRun(Run, title="merge"):
    """merge a LoRA adapter into its base model (plain transformers directory)"""

    # Merge reads only the model's path and the adapter (with the base check); the merge runs in float32.
    model: ModelPath = ModelPath()
    adapter: AdapterPath = AdapterPath()
    merge: MergeConfig = MergeConfig()


class CheckRun(Run, title="data check"):
    """validate a question file (JEC-QA, AGIEval, LawBench) and print what it holds"""

    check: CheckConfig = CheckConfig()


class OverlapRun(Run, title="data overlap"):
    """how many questions of file B are in file A (statement and options, any formats); --exclude-output writes B
    without them"""

    overlap: OverlapConfig = OverlapConfig()


class CompareRun(Run, title="compare"):
    """compare two eval reports (flips, McNemar, bootstrap CIs)"""

    compare: CompareConfig = CompareConfig()


class CardRun(Run, title="card"):
    """write or refresh the model card (README.md, Hugging Face format) of a run's models or of one model folder"""

    card: CardConfig = CardConfig()


SHORTHANDS = {"model": "model.path", "data": "data.train"}


def sections_of(run_cls: type[Run]) -> dict[str, type[Section]]:
    """Section name -> section model of a command's config."""
    return {name: f.annotation for name, f in run_cls.model_fields.items() if name != "source"}  # type: ignore[misc]


# Every section any command reads: a lent run file may hold any of them; anything else is a mistake.
KNOWN_SECTIONS = {name for run in (TrainRun, GrpoRun, EvalRun, PredictRun, AskRun, ServeRun, DistillRun, MergeRun,
                                   CheckRun, OverlapRun, CompareRun, CardRun) for name in sections_of(run)}


def path_fields(run_cls: type[Run]) -> dict[str, NamesPath]:
    """Dotted key -> marker of every field of a command's config that names a file or folder."""
    return {f"{name}.{key}": m for name, cls in sections_of(run_cls).items() for key, f in cls.model_fields.items()
            for m in f.metadata if isinstance(m, NamesPath)}


def looks_like_hub_id(path: str) -> bool:
    """``org/name``, and nothing that reads as a local path (``./x``, ``/x``, ``~/x``, ``a/b/c``, a backslash)."""
    return not path.startswith(("/", ".", "~")) and path.count("/") == 1 and "\\" not in path


def read_from(folder: str | Path, path: str, mark: NamesPath) -> str:
    """A path of a run file read from ``folder`` (the working directory of the run that wrote it): absolute. A hub id
    that is no folder there stays as written, as does an absolute path or one from the home folder (``~``)."""
    if not path or path.startswith("~") or Path(path).is_absolute():
        return path
    resolved = os.path.abspath(os.path.join(folder, path))
    return path if mark.hub and looks_like_hub_id(path) and not os.path.exists(resolved) else resolved


def valid_keys(run_cls: type[Run]) -> list[str]:
    return [f"{name}.{key}" for name, cls in sections_of(run_cls).items() for key in cls.model_fields]


def validate(model: type[M], raw: Any, where: str = "") -> M:
    """``model`` from ``raw``; else a ConfigError, ``where`` and then pydantic's first error as one line naming the
    key (and, for a key that does not exist, the valid ones)."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
    holder: Any = model  # the model holding the key
    key = "".join(f"[{part + 1}]" if isinstance(part, int) else f".{part}" for part in err["loc"]).lstrip(".")
    if err["type"] == "value_error":  # our own rules name their key
        raise ConfigError(where + str(err["ctx"]["error"]))
    if err["type"] != "extra_forbidden":
        # A flag's value is text: "got 0" reads better than "got '0'" (an empty text shows as '').
        got = err["input"] if isinstance(err["input"], str) and err["input"] else repr(err["input"])
        raise ConfigError(f"{where}{key}: {err['msg'][0].lower()}{err['msg'][1:]}, got {got}")
    for part in err["loc"][:-1]:  # a number is an item of a list of models
        holder = get_args(holder)[0] if isinstance(part, int) else holder.model_fields[part].annotation
    if issubclass(holder, Run):
        title, sections = holder.model_config.get("title"), ", ".join(sections_of(holder))
        raise ConfigError(f"{where}{key}: not a section of `lawtune {title}`; valid sections: {sections}")
    raise ConfigError(f"{where}{key}: unknown key; valid keys: {', '.join(holder.model_fields)}")


def replace(obj: M, **changes: Any) -> M:
    """A copy of a config object (a section or a whole run) with some fields changed, validated again."""
    return validate(type(obj), {**dict(obj), **changes})


def load_suite(path: str) -> Suite:
    """A suite file, checked: a problem is named with its run and key."""
    return validate(Suite, read_yaml(path), where=f"{path}: ")


# Run files written before the generation section existed kept its keys under eval, with one budget per mode.
_MOVED_TO_GENERATION = {"do_sample", "temperature", "top_p", "static_cache", "cuda_graphs", "max_new_tokens",
                        "direct_max_new_tokens"}


def upgrade_run_file(raw: dict) -> dict:
    """Move an older run file's generation keys from ``eval`` to ``generation``. Its two budgets become the one
    budget of the mode the file selects; the old defaults (8 direct, 2048 reasoning) are today's mode defaults."""
    old = raw["eval"] if isinstance(raw.get("eval"), dict) else {}
    moved = {key: old.pop(key) for key in _MOVED_TO_GENERATION & old.keys()}
    budgets = (moved.pop("direct_max_new_tokens", 8), moved.pop("max_new_tokens", 2048))
    if budgets != (8, 2048):
        moved["max_new_tokens"] = budgets[0] if old.get("mode", "direct") == "direct" else budgets[1]
    if moved:
        raw["generation"] = {**(raw.get("generation") or {}), **moved}
    return raw


def read_yaml(path: str | Path) -> dict:
    """A YAML file's mapping of sections (``train:`` with nothing under it is an empty section, not a missing one),
    older run files upgraded."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except OSError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as exc:
        line = f":{exc.problem_mark.line + 1}" if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark else ""
        raise ConfigError(f"{path}{line}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return upgrade_run_file({key: {} if value is None else value for key, value in raw.items()})


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), run_cls: type[Run] = TrainRun,
                lend: bool = False, settings: dict[str, Any] | None = None) -> Any:
    """A command's config: the YAML file (if any), then ``key=value`` overrides (values read as YAML scalars: a
    number-like path such as 1_train.json stays text), then ``settings`` (values by dotted key, from command-line
    flags). A key the command does not read is an error.

    ``lend``: the file is a full run file lending the sections the command reads; its other known sections are
    left out. Otherwise every section in the file must be one the command reads."""
    raw: dict = read_yaml(path) if path is not None else {}
    recorded = raw.pop(WORKING_DIR, None)
    if recorded is not None and not (isinstance(recorded, str) and Path(recorded).is_absolute()):
        raise ConfigError(f"{path}: {WORKING_DIR}: expected the absolute folder of the run, got {recorded!r}")
    if lend:  # the known sections the command does not read stay behind; one no command reads is refused by name
        raw = {name: value for name, value in raw.items() if name in sections_of(run_cls) or name not in KNOWN_SECTIONS}
    keys, title = valid_keys(run_cls), run_cls.model_config.get("title")
    changes = [(key.strip(), yaml.safe_load(text)) for key, _, text in (item.partition("=") for item in overrides)]
    given = {SHORTHANDS[k] if SHORTHANDS.get(k) in keys else k: value for k, value in [*changes, *(settings or {}).items()]}
    for key, value in given.items():
        if key not in keys:
            raise ConfigError(f"{key}: not a key of `lawtune {title}`; valid keys: {', '.join(keys)}")
        section, name = key.split(".")
        raw[section] = {**(raw[section] if isinstance(raw.get(section), dict) else {}), name: value}
    cfg = validate(run_cls, {**raw, "source": str(path) if path else None}, where=f"{path}: " if path else "")
    # A relative path of the file is read from the folder of the run that wrote it; one given here, as it is.
    folder = recorded or os.getcwd()
    for key, mark in path_fields(run_cls).items():
        section, name = key.split(".")
        written = getattr(getattr(cfg, section), name)
        resolved = written if key in given or not written else read_from(folder, written, mark)
        if resolved != written and mark.missing and not os.path.exists(resolved):
            raise ConfigError(f"{path}: {key} {written} (relative to {folder}): {mark.missing}")
        if recorded:
            setattr(getattr(cfg, section), name, resolved)
    return cfg


def config_to_yaml(cfg: Run) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), allow_unicode=True, sort_keys=False)


def save_config(cfg: Run, path: str | Path) -> None:
    """A run file: the config, and the working directory its relative paths are read from."""
    head = f"# relative paths in this file are read from {WORKING_DIR}, the folder the run was started in\n"
    Path(path).write_text(head + yaml.safe_dump({WORKING_DIR: os.getcwd()}, allow_unicode=True) + config_to_yaml(cfg),
                          encoding="utf-8")
