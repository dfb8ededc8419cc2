"""`lawtune data check` and `lawtune data overlap`: what a question file holds, and what two files share."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..config import CheckRun, OverlapRun
from ..data import data_stats, find_overlap, load_records, statement_key, write_without
from ..errors import UsageError

log = logging.getLogger("lawtune")


def run_check(cfg: CheckRun) -> int:
    c = cfg.check
    loaded = load_records(c.file, require_answer=False, fmt=c.format, question_type=c.type)
    lengths = None
    if c.tokenizer:
        from ..model import load_tokenizer
        from ..prompts import check_native, encode_example, render_prompt

        check_native(c.prompt_format, loaded.records, c.file)
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
    out = Path(o.exclude_output) if o.exclude_output else None
    if out is not None and (out.is_dir() or (out.exists() and out.resolve() == Path(o.b).resolve())):
        raise UsageError(f"overlap.exclude_output: {out} is {'a directory' if out.is_dir() else 'file B itself'}; "
                         f"give a new file")
    a, b = load_records(o.a, require_answer=False).records, load_records(o.b, require_answer=False).records
    pairs = find_overlap(a, b)
    found = {rb.position for rb, _ in pairs}
    # the same stem with other options: what a statement-only check (manifests of key normalized-1) also counts
    stem_only = {rb.position for rb, _ in find_overlap(a, b, key=statement_key)} - found
    result: dict = {"b_records": len(b), "overlap": len(found), "same_statement_only": len(stem_only),
                    "pairs": [{"a_id": ra.id, "b_id": rb.id} for rb, ra in pairs]}
    if out is not None:
        result["exclude_output"] = {"file": str(out), "records": write_without(o.b, out, found)}
        # read back: AGIEval and LawBench take KD/CA from the file name, which the new name may not carry
        expected = [r.type for r in b if r.position not in found]
        types = [r.type for r in load_records(out, require_answer=False).records] if expected else []
        if types != expected:
            log.warning("%s: its questions read as type %s, B's as %s (%s reads KD/CA from the file name): name it "
                        "like B, e.g. %s, or give --type (data.type) where it is read", out,
                        ", ".join(sorted(set(types))), ", ".join(sorted({r.type for r in b})), b[0].format,
                        Path(o.b).stem + ".clean" + Path(o.b).suffix)
    if o.as_json:
        print(json.dumps(result, ensure_ascii=False))
        return 0
    print(f"{len(found)} of {len(b)} questions of {o.b} are in {o.a} ({100 * len(found) / len(b):.1f}%; statement "
          f"and option texts compared, options as a set, folded to half width, without whitespace or punctuation)"
          + (f"; {len(stem_only)} more share only the statement" if stem_only else ""))
    for rb, ra in pairs[:5]:
        print(f"  {rb.id} = {ra.id}: {rb.statement[:80]}")
    if len(pairs) > 5:
        print(f"  … {len(pairs) - 5} more pairs (--json lists every one)")
    if out is not None:
        print(f"{result['exclude_output']['records']} records of {o.b} not in {o.a} -> {out}")
    return 0
