"""The embedded default: a tiny random Qwen2 model and a local tokenizer, trained on bundled questions.

Nothing here touches the network. The tokenizer is a byte-level BPE learned from the bundled
questions, with the special tokens and chat-template behaviour of DeepSeek-R1-Distill (bos, eos ==
pad, ``<｜User｜>`` / ``<｜Assistant｜>``, a generation prompt that opens ``<think>\\n``, and
assistant turns reduced to the text after ``</think>``), so the same prompt code path runs as for
the real model.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from .rundir import give_weights_default_mode
from .think import CLOSE, OPEN

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
THINK, END_THINK = OPEN, CLOSE

# Written for lawtune; mirrors the behaviour of R1-Distill's template that matters for prompts.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}"
    "{% set c = m['content'] %}{% if '</think>' in c %}{% set c = c.split('</think>')[-1] %}{% endif %}"
    "{{ '<｜Assistant｜>' + c + '<｜end▁of▁sentence｜>' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
)


def demo_data_path() -> Path:
    return Path(str(resources.files("lawtune") / "assets" / "demo_jecqa.jsonl"))


def demo_config_path() -> Path:
    """The demo's run file (`lawtune demo` reads it when given no YAML)."""
    return Path(str(resources.files("lawtune") / "assets" / "demo.yaml"))


def corpus_texts(paths: list[Path]) -> list[str]:
    """All text of JEC-QA files (statements, options, reasoning) for learning a tokenizer."""
    texts = []
    for path in paths:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            if line.strip():
                obj = json.loads(line)
                options = obj.get("option_list", {})
                options = options.values() if isinstance(options, dict) else options
                texts += [obj.get("statement", ""), *options, obj.get("reasoning") or ""]
    return texts


def build_tokenizer(texts: list[str], vocab_size: int = 2000):
    """A byte-level BPE tokenizer with R1-Distill's special tokens and template behaviour."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AddedToken, PreTrainedTokenizerFast

    from .prompts import ANSWER_PREFIX, CHAT_INSTRUCTION, PLAIN_TEMPLATE

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, BOS, USER, ASSISTANT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    letters = [f"{ANSWER_PREFIX}{x}" for x in ("A", "B", "C", "D")] + ["ABCD", "\n\n"]
    core.train_from_iterator(texts + [CHAT_INSTRUCTION, PLAIN_TEMPLATE] + letters * 20, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=EOS, clean_up_tokenization_spaces=False
    )
    # As in the real tokenizer, think markers are added tokens but not "special": skip_special_tokens keeps them.
    tokenizer.add_tokens([AddedToken(THINK, special=False, normalized=False), AddedToken(END_THINK, special=False, normalized=False)])
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.model_max_length = 4096
    return tokenizer


def build_tiny_model(tokenizer, hidden_size: int = 64, layers: int = 2, seed: int = 0):
    """A Qwen2ForCausalLM with random weights and the tokenizer's vocabulary."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        # LoRA leaves lm_head frozen: with the usual 0.02 init its logits could never become peaked
        # enough for a tiny random model to learn anything, so the demo model starts wider.
        initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    return model


def write_base_model(directory: str | Path, data_paths: list[Path], hidden_size: int = 64, layers: int = 2) -> Path:
    """Write a tokenizer + tiny random model directory that every command accepts as --model."""
    directory = Path(directory)
    tokenizer = build_tokenizer(corpus_texts(data_paths))
    model = build_tiny_model(tokenizer, hidden_size=hidden_size, layers=layers)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    give_weights_default_mode(directory)
    return directory
