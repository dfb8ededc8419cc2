"""JEC-QA-shaped synthetic questions for the benchmarks: real record layout, realistic token lengths.

Text is random Chinese tokens of the tokenizer's own vocabulary (re-tokenizing such text gives back
about as many tokens), so lengths can be set in tokens. Length distributions (real tokenizer):

* training examples (chat prompt + answer + end token), as measured on JEC-QA in issue 4:
  KD median 143, p95 219, max 434; CA median 187, p95 313, max 686 (half of each type);
* evaluation questions (statement + options), as in issue 3: median ~160, p95 ~300, within 100-600.
"""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

CJK = re.compile(r"^[\u4e00-\u9fff]{1,3}$")
TRAIN_TYPES = {"0": (143, 219, 434), "1": (187, 313, 686)}  # type -> (median, p95, max) of the whole example


def cjk_pool(tokenizer) -> list[str]:
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    pool = [t for t in texts if CJK.match(t)]
    if len(pool) < 50:
        raise ValueError("the tokenizer has too few Chinese tokens to build questions from")
    return pool


def lognormal(rng: random.Random, median: float, p95: float, lo: int, hi: int) -> int:
    sigma = math.log(p95 / median) / 1.645
    return int(min(hi, max(lo, round(rng.lognormvariate(math.log(median), sigma)))))


def _record(rng, pool, i: int, type_: str, statement_tokens: int, option_tokens: list[int]) -> dict:
    letters = "ABCD"
    options = {x: "".join(rng.choices(pool, k=n)) for x, n in zip(letters, option_tokens)}
    k = 1 if rng.random() < 0.5 else rng.randint(2, 4)  # about half the questions have several answers
    return {"id": f"{type_}_{i}", "statement": "".join(rng.choices(pool, k=max(statement_tokens, 4))) + "？",
            "option_list": options, "answer": sorted(rng.sample(letters, k)), "type": type_}


def train_rows(tokenizer, n: int, seed: int = 0, overhead: int = 88, scale: float = 1.0) -> list[dict]:
    """Records whose encoded chat examples follow the JEC-QA lengths above (``scale`` shrinks them for smoke runs).

    ``overhead`` is what the chat template, instruction, option letters and answer add to the question text.
    """
    rng = random.Random(seed)
    pool = cjk_pool(tokenizer)
    rows = []
    for i in range(n):
        type_ = "01"[i % 2]
        median, p95, top = (x * scale for x in TRAIN_TYPES[type_])
        total = int(top) if i < 2 else lognormal(rng, median, p95, int(60 * scale), int(top))  # the max is present
        question = max(total - int(overhead * scale), 12)
        opts = [max(1, min(rng.randint(3, 14), question // 6)) for _ in range(4)]
        rows.append(_record(rng, pool, i, type_, question - sum(opts), opts))
    return rows


def eval_rows(tokenizer, n: int, seed: int = 1, scale: float = 1.0) -> list[dict]:
    """Questions whose statement + options have median ~160, p95 ~300 tokens, within 100-600."""
    rng = random.Random(seed)
    pool = cjk_pool(tokenizer)
    rows = []
    for i in range(n):
        question = lognormal(rng, 160 * scale, 300 * scale, int(100 * scale), int(600 * scale))
        opts = [max(1, min(rng.randint(6, 30), question // 6)) for _ in range(4)]
        rows.append(_record(rng, pool, i, "01"[i % 2], question - sum(opts), opts))
    return rows


def long_rows(tokenizer, n: int, length: int, seed: int = 2) -> list[dict]:
    """Questions long enough to be cut to exactly ``length`` tokens (data.max_length) when encoded."""
    rng = random.Random(seed)
    pool = cjk_pool(tokenizer)
    return [_record(rng, pool, i, "1", length + 50, [8, 8, 8, 8]) for i in range(n)]


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def percentiles(values: list[int]) -> dict:
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]  # noqa: E731
    return {"p50": pick(50), "p95": pick(95), "max": ordered[-1], "mean": round(sum(ordered) / len(ordered), 1)}


REPO = Path(__file__).resolve().parents[1]
MODEL_DIRS = [REPO / ".bench_assets" / "deepseek-r1-distill-qwen-1.5b", REPO.parent / "shared" / "deepseek-r1-distill-qwen-1.5b"]
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def model_config(model_dir: str | None, tiny: bool):
    """(tokenizer, config) of the benchmark model: the real R1-Distill files, shrunk to a tiny model if asked."""
    from transformers import AutoConfig, AutoTokenizer

    found = Path(model_dir) if model_dir else next((d for d in MODEL_DIRS if (d / "config.json").is_file()), None)
    if found is None:
        raise SystemExit(f"no model directory with config.json among {', '.join(map(str, MODEL_DIRS))}")
    tokenizer = AutoTokenizer.from_pretrained(found)
    config = AutoConfig.from_pretrained(found)
    if tiny:  # the real tokenizer on a tiny model of the same family
        config.update(TINY)
    return tokenizer, config


def save_bench_model(model_dir: str | None, smoke: bool, dest: Path):
    """The benchmark model saved to ``dest`` (random weights, seed 0): the demo's tiny model for a smoke run
    without ``model_dir``, else ``model_config``'s architecture, bf16 on a GPU. Returns its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    if smoke and not model_dir:
        from lawtune.demo import build_tiny_model, build_tokenizer, corpus_texts, demo_data_path

        tokenizer = build_tokenizer(corpus_texts([demo_data_path()]), vocab_size=1500)
        model = build_tiny_model(tokenizer, hidden_size=64, layers=2)
    else:
        tokenizer, config = model_config(model_dir, tiny=smoke)
        device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
        model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                                   pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return tokenizer


def cprofile_top(profiler, n: int = 25) -> dict:
    """The functions with the most CPU time of their own, in ms, from a cProfile.Profile."""
    import pstats

    stats = pstats.Stats(profiler).stats
    rows = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:n]
    return {f"{Path(f).name}:{line}({name})"[:100]: {"calls": cc, "self_ms": round(tt * 1e3, 1), "cum_ms": round(ct * 1e3, 1)}
            for (f, line, name), (cc, nc, tt, ct, callers) in rows}
