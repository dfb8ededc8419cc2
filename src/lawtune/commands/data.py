"""`lawtune data check` and `lawtune data overlap`: what a question file holds, and what two files share."""

from __future__ import annotations

import json

from ..config import CheckRun, OverlapRun
from ..data import data_stats, find_overlap, load_records


def run_check(cfg: CheckRun) -> int:
    c = cfg.check
    loaded = load_records(c.file, require_answer=False, fmt=c.format)
    lengths = None
    if c.tokenizer:
        from ..model import load_tokenizer
        from ..prompts import encode_example, render_prompt

        tokenizer = load_tokenizer(c.tokenizer)
        lengths = []
        for r in loaded.records:
            if r.answer is not None:
                encoded = encode_example(r, tokenizer, c.prompt_format, 10**9)
                assert encoded is not None  # None only for an example over max_length, here unbounded
                lengths.append(len(encoded.input_ids))
            else:
                lengths.append(len(tokenizer(render_prompt(r, tokenizer, c.prompt_format), add_special_tokens=False)["input_ids"]))
    stats = data_stats(loaded, lengths)
    if c.as_json:
        print(json.dumps(stats, ensure_ascii=False))
        return 0
    print(f"{c.file}: {stats['records']} usable records")
    for reason, count in stats["skipped"].items():
        print(f"  skipped: {count} ({reason})")
    print(f"  single-answer {stats['single']}, multi-answer {stats['multi']}, "
          f"without answer {stats['records'] - stats['single'] - stats['multi']}")
    print("  by type: " + ", ".join(f"{k} {v}" for k, v in stats["by_type"].items()))
    print(f"  repeated statements: {stats['repeated_statements']}")
    if "token_length" in stats:
        t = stats["token_length"]
        print(f"  tokens per example ({c.prompt_format}): p50 {t['p50']}, p95 {t['p95']}, max {t['max']}")
    return 0


def run_overlap(cfg: OverlapRun) -> int:
    o = cfg.overlap
    a, b = load_records(o.a, require_answer=False).records, load_records(o.b, require_answer=False).records
    pairs = find_overlap(a, b)
    examples = [{"b_id": rb.id, "a_id": ra.id, "statement": rb.statement[:80]} for rb, ra in pairs[:5]]
    if o.as_json:
        print(json.dumps({"b_records": len(b), "overlap": len(pairs), "examples": examples}, ensure_ascii=False))
        return 0
    print(f"{len(pairs)} of {len(b)} questions of {o.b} are in {o.a} ({100 * len(pairs) / len(b):.1f}%; statements "
          f"compared folded to half width, without whitespace, punctuation or options)")
    for e in examples:
        print(f"  {e['b_id']} = {e['a_id']}: {e['statement']}")
    return 0
