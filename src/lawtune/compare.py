"""Paired comparison of two evaluation reports (e.g. base model vs. LoRA).

Both runs answer the same questions, so the comparison is paired: McNemar's
exact test on the questions where exactly one run is right, and a paired
bootstrap over questions for confidence intervals.  An unpaired test would
waste most of the statistical power on question difficulty.
"""

from __future__ import annotations

import html
import json
import math
import random
import unicodedata
from pathlib import Path
from typing import Any

from .errors import UsageError
from .stats import percentile

CATEGORIES = ("overall", "single", "multi", "KD", "CA")
_FLIP_LIMIT = 20


def load_report(path: str | Path) -> dict:
    """Read a report written by the evaluator; ValueError names the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: cannot read report JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise UsageError(f"{path}: report must be a JSON object")
    for key, typ in (("summary", dict), ("samples", list)):
        if not isinstance(data.get(key), typ):
            raise UsageError(f"{path}: missing or malformed key {key!r}")
    for i, s in enumerate(data["samples"]):
        missing = [k for k in ("id", "gold", "correct") if not isinstance(s, dict) or k not in s]
        if missing:
            raise UsageError(f"{path}: sample {i} lacks {', '.join(missing)}")
    return data


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value (binomial test on discordant pairs)."""
    n = a_only + b_only
    if n == 0:
        return 1.0
    k = min(a_only, b_only)
    # Integer arithmetic until the final division keeps this exact for any n.
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, 2 * tail / 2**n)


def _bootstrap(a: list[bool], b: list[bool], n_boot: int, seed: int) -> dict:
    n = len(a)
    if n == 0 or n_boot <= 0:
        return {"a": None, "b": None, "diff": None, "level": 0.95, "n_boot": n_boot, "seed": seed}
    # Each question is one of four outcome codes; resampling questions with
    # replacement and counting codes is the same as resampling indices, and
    # list.count keeps 2000 x n draws cheap.
    codes = [2 * int(x) + int(y) for x, y in zip(a, b)]
    rng = random.Random(seed)
    acc_a, acc_b, diff = [], [], []
    for _ in range(n_boot):
        draw = rng.choices(codes, k=n)
        c3, c2, c1 = draw.count(3), draw.count(2), draw.count(1)
        pa, pb = (c3 + c2) / n, (c3 + c1) / n
        acc_a.append(pa)
        acc_b.append(pb)
        diff.append(pb - pa)
    out: dict[str, Any] = {"level": 0.95, "n_boot": n_boot, "seed": seed}
    for key, vals in (("a", acc_a), ("b", acc_b), ("diff", diff)):
        vals.sort()
        out[key] = [percentile(vals, 2.5), percentile(vals, 97.5)]
    return out


def _category(sample: dict, cat: str) -> bool:
    if cat == "overall":
        return True
    gold = sample.get("gold") or []
    if cat == "single":
        return len(gold) == 1
    if cat == "multi":
        return len(gold) > 1
    return str(sample.get("type", "unknown")) == cat


def _index(samples: list[dict]) -> tuple[dict, int]:
    by_id: dict = {}
    dups = 0
    for s in samples:
        key = str(s["id"])
        if key in by_id:
            dups += 1
            continue
        by_id[key] = s
    return by_id, dups


def _counts(pairs: list[tuple[dict, dict]], side: int, summary: dict) -> dict:
    samples = [p[side] for p in pairs]
    # Counted on the paired set when samples carry the flags; older reports
    # keep them only in the summary (whole run), which is the fallback.
    has_valid = any("valid" in s for s in samples)
    has_forced = any("forced" in s for s in samples)
    return {
        "invalid": sum(1 for s in samples if "valid" in s and not s["valid"])
        if has_valid else summary.get("invalid"),
        "forced": sum(1 for s in samples if s.get("forced"))
        if has_forced else summary.get("forced"),
    }


# One answer set for more than this share of the questions marks a run whose predictions are (nearly) constant.
# A chosen cut: well above what a model that reads the questions gives on four-option, partly multi-answer sets.
DEGENERATE_SHARE = 0.75


def _most_common_answer(samples: list[dict]) -> tuple[str, float]:
    """The answer set predicted most often, and the share of questions it was predicted for."""
    counts: dict[str, int] = {}
    for s in samples:
        key = "".join(sorted(s.get("pred") or []))
        counts[key] = counts.get(key, 0) + 1
    if not counts:
        return "", 0.0
    letters, count = max(counts.items(), key=lambda kv: kv[1])
    return letters, count / len(samples)


PERMUTATIONS = 10000


def paired_permutation(a: list[float], b: list[float], draws: int = PERMUTATIONS, seed: int = 0) -> float:
    """Two-sided p of the mean paired difference b - a under random sign flips (each question's two means are
    exchangeable under no difference): the test for sampled reports, whose per-question outcomes are the share of
    correct samples, not yes/no (McNemar needs yes/no)."""
    diffs = [y - x for x, y in zip(a, b)]
    observed = abs(sum(diffs))
    rng = random.Random(seed)
    hits = sum(abs(sum(d if rng.random() < 0.5 else -d for d in diffs)) >= observed - 1e-12 for _ in range(draws))
    return (hits + 1) / (draws + 1)


def _decoding(summary: dict) -> tuple[str | None, int]:
    """(greedy or sampled, K) of a report; None where a report written before ``do_sample`` was recorded does not
    say (one answer each: greedy unless generation.do_sample was set)."""
    k = int(summary.get("samples") or 1)
    sampled = k > 1 or summary.get("do_sample")
    return ("sampled" if sampled else None if summary.get("do_sample") is None else "greedy"), k


def _decoding_warnings(sa: dict, sb: dict) -> list[str]:
    """A greedy report against a sampled one, or two sampled with another K, measure different things."""
    (da, ka), (db, kb) = _decoding(sa), _decoding(sb)

    def said(d: str | None, k: int) -> str:
        return "greedy" if d == "greedy" else f"sampled, K={k}" if d == "sampled" else "one answer each"

    if da and db and da != db:
        return [f"decoding differs: A {said(da, ka)}, B {said(db, kb)}: a greedy answer and sampled ones are not the "
                f"same measurement (compare greedy with greedy, or sampled with sampled at one K)"]
    if ka != kb:
        return [f"K differs: A {said(da, ka)}, B {said(db, kb)}: accuracy (maj@K), avg@K and pass@K all move with K"]
    return []


def compare_reports(a: dict, b: dict, n_boot: int = 2000, seed: int = 0) -> dict:
    """Pair two reports by question id and compare them."""
    sa, sb = a.get("summary", {}), b.get("summary", {})
    idx_a, dup_a = _index(a["samples"])
    idx_b, dup_b = _index(b["samples"])
    shared = [k for k in idx_a if k in idx_b]
    pairs = [(idx_a[k], idx_b[k]) for k in shared]
    ok_a = [bool(p[0]["correct"]) for p in pairs]
    ok_b = [bool(p[1]["correct"]) for p in pairs]

    a_only = [k for k, x, y in zip(shared, ok_a, ok_b) if x and not y]
    b_only = [k for k, x, y in zip(shared, ok_a, ok_b) if y and not x]
    n = len(pairs)
    acc_a = sum(ok_a) / n if n else 0.0
    acc_b = sum(ok_b) / n if n else 0.0

    categories = {}
    for cat in CATEGORIES:
        sel = [i for i, (x, _) in enumerate(pairs) if _category(x, cat)]
        m = len(sel)
        ca = sum(ok_a[i] for i in sel) / m if m else 0.0
        cb = sum(ok_b[i] for i in sel) / m if m else 0.0
        categories[cat] = {"n": m, "a": ca, "b": cb, "diff": cb - ca}

    warnings = []
    for key in ("mode", "data_sha256"):
        va, vb = sa.get(key), sb.get(key)
        if va != vb:
            warnings.append(f"{key} differs: A={va!r} B={vb!r}")
    warnings += _decoding_warnings(sa, sb)
    unmatched_a, unmatched_b = len(idx_a) - n, len(idx_b) - n
    if unmatched_a or unmatched_b:
        warnings.append(
            f"question ids do not match: {n} paired, {unmatched_a} only in A, {unmatched_b} only in B"
        )
    if dup_a or dup_b:
        warnings.append(f"duplicate ids ignored: {dup_a} in A, {dup_b} in B")
    top = {"a": _most_common_answer([p[0] for p in pairs]), "b": _most_common_answer([p[1] for p in pairs])}
    for side, (letters, share) in top.items():
        if n and share > DEGENERATE_SHARE:
            warnings.append(f"{side.upper()} answers {letters or '(nothing)'} to {100 * share:.0f}% of the questions: its "
                            f"predictions are (nearly) constant, so its accuracy says little about legal skill")
    gold_diff = sum(1 for x, y in pairs if sorted(x.get("gold") or []) != sorted(y.get("gold") or []))
    if gold_diff:
        warnings.append(f"{gold_diff} paired questions have different gold answers")

    sampled = None
    if n and all("mean_correct" in x and "mean_correct" in y for x, y in pairs):
        mean_a, mean_b = [x["mean_correct"] for x, _ in pairs], [y["mean_correct"] for _, y in pairs]
        sampled = {"avg_a": sum(mean_a) / n, "avg_b": sum(mean_b) / n, "diff": (sum(mean_b) - sum(mean_a)) / n,
                   "p_value": paired_permutation(mean_a, mean_b, seed=seed),
                   "test": f"paired sign-flip permutation test on the per-question avg@K ({PERMUTATIONS:,} draws, "
                           f"seed {seed})"}
    return {
        "n_paired": n,
        "sampled": sampled,
        "unmatched": {"a": unmatched_a, "b": unmatched_b},
        "accuracy": {"a": acc_a, "b": acc_b, "diff": acc_b - acc_a},
        "a_only": a_only,
        "b_only": b_only,
        "both_correct": sum(1 for x, y in zip(ok_a, ok_b) if x and y),
        "both_wrong": sum(1 for x, y in zip(ok_a, ok_b) if not x and not y),
        "mcnemar": {
            "a_only": len(a_only),
            "b_only": len(b_only),
            "p_value": mcnemar_exact(len(a_only), len(b_only)),
        },
        "ci": _bootstrap(ok_a, ok_b, n_boot, seed),
        "categories": categories,
        "most_common_answer": {side: {"answer": letters, "share": share} for side, (letters, share) in top.items()},
        "counts": {"a": _counts(pairs, 0, sa), "b": _counts(pairs, 1, sb)},
        "summary_a": sa,
        "summary_b": sb,
        "warnings": warnings,
    }


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _ci(ci: list[float] | None) -> str:
    return "" if not ci else f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _num(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.2f}"
    return str(x)


def _delta(a, b, pct: bool = False) -> str:
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return "-"
    d = b - a
    if pct:
        return f"{100 * d:+.1f} pp"
    return f"{d:+.2f}" if isinstance(d, float) else f"{d:+d}"


def _interpret(result: dict) -> str:
    p = result["mcnemar"]["p_value"]
    na, nb = result["mcnemar"]["a_only"], result["mcnemar"]["b_only"]
    if na + nb == 0:
        return "no discordant questions: the two runs agree on every paired question"
    if p < 0.05:
        better = "B" if nb > na else "A"
        return (f"significant at the 5% level: {better} is better "
                f"({_questions(nb)} only B got right, {na} only A)")
    return f"not significant at the 5% level ({_questions(nb)} only B got right, {na} only A)"


def _questions(k: int) -> str:
    return f"{k} question" if k == 1 else f"{k} questions"


def _rows(result: dict) -> list[tuple[str, str, str, str]]:
    cats, ci = result["categories"], result["ci"]
    ca, cb = result["counts"]["a"], result["counts"]["b"]
    qa = result["summary_a"].get("questions_per_s")
    qb = result["summary_b"].get("questions_per_s")
    rows = [
        ("n (paired)", str(result["n_paired"]), str(result["n_paired"]), ""),
        ("accuracy", _pct(result["accuracy"]["a"]) + _ci(ci["a"]),
         _pct(result["accuracy"]["b"]) + _ci(ci["b"]),
         _delta(result["accuracy"]["a"], result["accuracy"]["b"], pct=True) + _ci(ci["diff"])),
    ]
    for cat in CATEGORIES[1:]:
        c = cats[cat]
        if c["n"] == 0:  # no such question: nothing to show, not a 0% accuracy
            rows.append((f"{cat} (n=0)", "-", "-", ""))
            continue
        rows.append((f"{cat} (n={c['n']})", _pct(c["a"]), _pct(c["b"]), _delta(c["a"], c["b"], pct=True)))
    rows.append(("invalid", _num(ca["invalid"]), _num(cb["invalid"]), _delta(ca["invalid"], cb["invalid"])))
    rows.append(("forced", _num(ca["forced"]), _num(cb["forced"]), _delta(ca["forced"], cb["forced"])))
    top = result.get("most_common_answer")
    if top:
        top_a, top_b = (f"{top[k]['answer'] or '-'} ({_pct(top[k]['share'])})" for k in ("a", "b"))
        rows.append(("most common answer", top_a, top_b, ""))
    rows.append(("questions/s", _num(qa), _num(qb), _delta(qa, qb)))
    return rows


def _width(s: str) -> int:
    # CJK characters take two terminal columns; model names may contain them.
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in s)


def _pad(s: str, w: int) -> str:
    return s + " " * max(0, w - _width(s))


def _flip_text(ids: list) -> str:
    shown = ", ".join(str(i) for i in ids[:_FLIP_LIMIT])
    if len(ids) > _FLIP_LIMIT:
        shown += f", ... ({len(ids) - _FLIP_LIMIT} more)"
    return f"{len(ids)}: {shown}" if ids else "0"


def format_comparison(result: dict, name_a: str, name_b: str) -> str:
    """Plain-text side-by-side report."""
    header = ("metric", f"A: {name_a}", f"B: {name_b}", "Δ (B−A)")
    rows = [header] + _rows(result)
    widths = [max(_width(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(_pad(c, widths[i]) for i, c in enumerate(r)).rstrip() for r in rows]
    lines.insert(1, "-" * (sum(widths) + 6))
    lines.append("")
    lines.append("accuracy intervals: 95% paired bootstrap "
                 f"({result['ci'].get('n_boot')} resamples, seed {result['ci'].get('seed')})")
    lines.append(f"right in A, wrong in B (A only) {_flip_text(result['a_only'])}")
    lines.append(f"right in B, wrong in A (B only) {_flip_text(result['b_only'])}")
    if result.get("sampled"):
        s = result["sampled"]
        lines.append(f"sampled reports: avg@K A {100 * s['avg_a']:.1f}%, B {100 * s['avg_b']:.1f}% "
                     f"(Δ {100 * s['diff']:+.1f}); {s['test']}: p = {s['p_value']:.4g}")
        lines.append(f"(McNemar below is on the majority answers, maj@K) McNemar exact p = "
                     f"{result['mcnemar']['p_value']:.4g}: {_interpret(result)}")
    else:
        lines.append(f"McNemar exact p = {result['mcnemar']['p_value']:.4g}: {_interpret(result)}")
    for w in result["warnings"]:
        lines.append(f"WARNING: {w}")
    return "\n".join(lines) + "\n"


def _svg_chart(result: dict) -> str:
    cats = result["categories"]
    bar_w, gap, group_gap, plot_h, top, left = 28, 4, 36, 200, 20, 44
    width = left + len(CATEGORIES) * (2 * bar_w + gap + group_gap) + 10
    height = top + plot_h + 50
    colors = ("#7f8fa6", "#2f6fdf")
    parts = [f'<svg width="{width}" height="{height}" role="img" '
             f'aria-label="accuracy by category, A vs B">']
    for tick in range(0, 101, 25):
        y = top + plot_h - plot_h * tick / 100
        parts.append(f'<line x1="{left}" x2="{width - 10}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{tick}%</text>')
    x = left + group_gap / 2
    for cat in CATEGORIES:
        c = cats[cat]
        for j, (side, val) in enumerate((("A", c["a"]), ("B", c["b"])) if c["n"] else ()):  # n=0: no bar
            h = plot_h * val
            bx = x + j * (bar_w + gap)
            label = html.escape(f"{cat} {side}: {100 * val:.1f}% (n={c['n']})")
            parts.append(f'<rect x="{bx:.1f}" y="{top + plot_h - h:.1f}" width="{bar_w}" '
                         f'height="{h:.1f}" fill="{colors[j]}"><title>{label}</title></rect>')
            parts.append(f'<text x="{bx + bar_w / 2:.1f}" y="{top + plot_h - h - 3:.1f}" '
                         f'font-size="10" text-anchor="middle">{100 * val:.0f}</text>')
        if cat == "overall":
            for j, key in enumerate(("a", "b")):
                ci = result["ci"].get(key)
                if ci:
                    cx = x + j * (bar_w + gap) + bar_w / 2
                    y1, y2 = top + plot_h * (1 - ci[0]), top + plot_h * (1 - ci[1])
                    parts.append(f'<line x1="{cx:.1f}" x2="{cx:.1f}" y1="{y1:.1f}" y2="{y2:.1f}" '
                                 f'stroke="#000" stroke-width="1.5"/>')
        parts.append(f'<text x="{x + bar_w + gap / 2:.1f}" y="{top + plot_h + 16}" font-size="12" '
                     f'text-anchor="middle">{html.escape(cat)}</text>')
        parts.append(f'<text x="{x + bar_w + gap / 2:.1f}" y="{top + plot_h + 30}" font-size="10" '
                     f'text-anchor="middle" fill="#666">n={c["n"]}</text>')
        x += 2 * bar_w + gap + group_gap
    for j, side in enumerate(("A", "B")):
        lx = left + j * 60
        parts.append(f'<rect x="{lx}" y="{height - 14}" width="12" height="12" fill="{colors[j]}"/>')
        parts.append(f'<text x="{lx + 16}" y="{height - 4}" font-size="12">{side}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def _flip_html(title: str, ids: list) -> str:
    items = "".join(f"<li>{html.escape(str(i))}</li>" for i in ids)
    return f"<h3>{html.escape(title)} ({len(ids)})</h3><ul class=\"ids\">{items}</ul>"


def write_html(result: dict, name_a: str, name_b: str, path: str | Path) -> None:
    """Self-contained HTML page: no external resources, opens offline."""
    e = html.escape
    rows = _rows(result)
    table = ["<table><tr>"
             f"<th>metric</th><th>A: {e(name_a)}</th><th>B: {e(name_b)}</th><th>Δ (B−A)</th></tr>"]
    for r in rows:
        table.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>")
    table.append("</table>")
    ci = result["ci"]
    warn = "".join(f'<p class="warn">WARNING: {e(w)}</p>' for w in result["warnings"])
    body = [
        f"<h1>Comparison: {e(name_a)} vs {e(name_b)}</h1>",
        warn,
        "<h2>Summary</h2>",
        "".join(table),
        f"<p>Accuracy intervals: 95% paired bootstrap percentile intervals "
        f"({e(str(ci.get('n_boot')))} resamples, seed {e(str(ci.get('seed')))}). "
        f"A {e(_ci(ci.get('a')).strip() or '-')}, B {e(_ci(ci.get('b')).strip() or '-')}, "
        f"B−A {e(_ci(ci.get('diff')).strip() or '-')} (percentage points).</p>",
        "<h2>Accuracy by category</h2>",
        _svg_chart(result),
        "<h2>McNemar test</h2>",
        f"<p>exact two-sided p = {result['mcnemar']['p_value']:.4g} — {e(_interpret(result))}</p>",
        "<h2>Flips</h2>",
        _flip_html("right in A, wrong in B", result["a_only"]),
        _flip_html("right in B, wrong in A", result["b_only"]),
    ]
    style = ("body{font-family:sans-serif;max-width:960px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}.warn{color:#b00;font-weight:bold}"
             ".ids{columns:4;font-family:monospace;font-size:12px}")
    page = ("<!DOCTYPE html>\n<html lang=\"zh\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{e(name_a)} vs {e(name_b)}</title>\n<style>{style}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")
    Path(path).write_text(page, encoding="utf-8")
