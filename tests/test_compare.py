import json
import re

import pytest

from lawtune.compare import (
    compare_reports,
    format_comparison,
    load_report,
    mcnemar_exact,
    write_html,
)
from lawtune.errors import UsageError


def _sample(i, correct, gold=("A",), typ="KD", **extra):
    s = {"id": i, "type": typ, "gold": list(gold), "pred": list(gold) if correct else ["D"],
         "correct": correct, "output": "", "valid": True, "forced": False}
    s.update(extra)
    return s


def _report(samples, mode="think", sha="abc", qps=1.5):
    return {"summary": {"mode": mode, "model": "m", "adapter": None, "data_sha256": sha,
                        "questions_per_s": qps},
            "samples": samples}


def _pair_9_1():
    """20 questions: 6 both right, 4 both wrong, 9 only B right, 1 only A right."""
    a, b = [], []
    k = 0
    for ca, cb, count in ((True, True, 6), (False, False, 4), (False, True, 9), (True, False, 1)):
        for _ in range(count):
            gold = ("A", "C") if k % 2 else ("B",)
            typ = "CA" if k % 3 == 0 else "KD"
            a.append(_sample(f"q{k}", ca, gold, typ))
            b.append(_sample(f"q{k}", cb, gold, typ))
            k += 1
    return _report(a), _report(b)


def test_mcnemar_exact_known_values():
    assert mcnemar_exact(9, 1) == pytest.approx(0.021484375, abs=1e-15)
    assert mcnemar_exact(1, 9) == pytest.approx(0.021484375, abs=1e-15)
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)
    # large n must not overflow
    assert 0.0 <= mcnemar_exact(600, 500) < 0.01


def test_compare_flips_and_mcnemar():
    a, b = _pair_9_1()
    r = compare_reports(a, b, n_boot=500, seed=1)
    assert r["n_paired"] == 20
    assert r["a_only"] == ["q19"]
    assert r["b_only"] == [f"q{k}" for k in range(10, 19)]
    assert r["both_correct"] == 6 and r["both_wrong"] == 4
    assert r["mcnemar"]["p_value"] == pytest.approx(0.021484375)
    assert r["accuracy"]["a"] == pytest.approx(7 / 20)
    assert r["accuracy"]["b"] == pytest.approx(15 / 20)
    assert r["accuracy"]["diff"] == pytest.approx(0.4)
    assert r["warnings"] == []
    assert r["unmatched"] == {"a": 0, "b": 0}


def test_categories_on_paired_set():
    a, b = _pair_9_1()
    r = compare_reports(a, b, n_boot=10)
    cats = r["categories"]
    assert cats["overall"]["n"] == 20
    assert cats["single"]["n"] + cats["multi"]["n"] == 20
    assert cats["single"]["n"] == 10  # even k -> single gold ("B",)
    # A right on k in 0..5 and 19: single k in {0,2,4} -> 3/10
    assert cats["single"]["a"] == pytest.approx(0.3)
    # B right on k in 0..5 and 10..18: single k in {0,2,4,10,12,14,16,18} -> 8/10
    assert cats["single"]["b"] == pytest.approx(0.8)
    assert cats["CA"]["n"] == 7  # k in {0,3,6,9,12,15,18}
    assert cats["KD"]["n"] == 13


def test_bootstrap_ci_contains_point_estimate_and_is_deterministic():
    a, b = _pair_9_1()
    r = compare_reports(a, b, n_boot=2000, seed=0)
    for key in ("a", "b", "diff"):
        lo, hi = r["ci"][key]
        assert lo <= r["accuracy"][key] <= hi
        assert lo < hi
    for key in ("a", "b"):
        assert 0.0 <= r["ci"][key][0] and r["ci"][key][1] <= 1.0
    assert -1.0 <= r["ci"]["diff"][0] and r["ci"]["diff"][1] <= 1.0
    assert r["ci"]["diff"][0] > 0  # 9 vs 1 discordant over 20 is a clear win
    again = compare_reports(a, b, n_boot=2000, seed=0)
    assert again["ci"] == r["ci"]
    other = compare_reports(a, b, n_boot=2000, seed=7)
    assert other["ci"] != r["ci"]


def test_warnings_for_mode_sha_and_unmatched_ids():
    a, b = _pair_9_1()
    b["summary"]["mode"] = "forced"
    b["summary"]["data_sha256"] = "zzz"
    b["samples"] = b["samples"][:-2] + [_sample("extra", True)]
    r = compare_reports(a, b, n_boot=10)
    assert r["n_paired"] == 18
    assert r["unmatched"] == {"a": 2, "b": 1}
    joined = "\n".join(r["warnings"])
    assert "mode" in joined and "data_sha256" in joined
    assert "2 only in A" in joined and "1 only in B" in joined
    text = format_comparison(r, "base", "lora")
    assert text.count("WARNING:") == 3


def test_format_comparison_contents():
    a, b = _pair_9_1()
    text = format_comparison(compare_reports(a, b, n_boot=200), "base", "lora")
    assert "A: base" in text and "B: lora" in text
    assert "35.0%" in text and "75.0%" in text and "+40.0 pp" in text
    assert "q19" in text and "q10" in text
    assert "p = 0.02148" in text
    assert "significant" in text and "B is better" in text
    assert "WARNING" not in text
    for row in ("single", "multi", "KD", "CA", "invalid", "forced", "questions/s"):
        assert row in text


def test_format_truncates_long_flip_lists():
    a = _report([_sample(f"x{i}", True) for i in range(30)])
    b = _report([_sample(f"x{i}", False) for i in range(30)])
    r = compare_reports(a, b, n_boot=50)
    text = format_comparison(r, "a", "b")
    assert "x19" in text and "x20" not in text
    assert "(10 more)" in text
    assert "no discordant" not in text


def test_write_html_self_contained_and_escaped(tmp_path):
    a, b = _pair_9_1()
    evil = "<script>alert(1)</script>"
    a["samples"][10]["id"] = evil
    b["samples"][10]["id"] = evil
    r = compare_reports(a, b, n_boot=100)
    assert evil in r["b_only"]
    out = tmp_path / "cmp.html"
    write_html(r, "base <a>", "lora", out)
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert '<meta charset="utf-8">' in page
    assert "<svg" in page
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"<(script|link|img|iframe)\b", page)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "base &lt;a&gt;" in page
    assert "q19" in page


def test_load_report_errors(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(_report([_sample("1", True)])), encoding="utf-8")
    assert load_report(good)["samples"][0]["id"] == "1"

    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(UsageError, match="bad.json"):
        load_report(bad)

    nokey = tmp_path / "nokey.json"
    nokey.write_text(json.dumps({"summary": {}}), encoding="utf-8")
    with pytest.raises(UsageError, match="nokey.json.*samples"):
        load_report(nokey)

    nogold = tmp_path / "nogold.json"
    nogold.write_text(json.dumps({"summary": {}, "samples": [{"id": 1, "correct": True}]}),
                      encoding="utf-8")
    with pytest.raises(UsageError, match="nogold.json.*gold"):
        load_report(nogold)

    with pytest.raises(UsageError, match="missing.json"):
        load_report(tmp_path / "missing.json")


def test_empty_overlap_does_not_crash():
    a = _report([_sample("1", True)])
    b = _report([_sample("2", True)])
    r = compare_reports(a, b, n_boot=10)
    assert r["n_paired"] == 0
    assert r["mcnemar"]["p_value"] == 1.0
    assert r["ci"]["a"] is None
    assert "WARNING:" in format_comparison(r, "a", "b")


def test_a_run_with_constant_answers_is_flagged_and_empty_categories_are_not_drawn_as_zero(tmp_path):
    golds = [["A"], ["B"], ["C"], ["D"], ["A", "B"], ["C", "D"]] * 4
    def report(preds):
        return {"summary": {"mode": "direct"},
                "samples": [{"id": str(i), "type": "KD", "gold": g, "pred": p, "correct": sorted(p) == g}
                            for i, (g, p) in enumerate(zip(golds, preds))]}
    varied = report([g if i % 3 else ["A"] for i, g in enumerate(golds)])
    constant = report([["A", "B", "C", "D"]] * len(golds))
    result = compare_reports(varied, constant)
    assert result["most_common_answer"]["b"] == {"answer": "ABCD", "share": 1.0}
    assert result["most_common_answer"]["a"]["share"] <= 0.75
    assert any(w.startswith("B answers ABCD to 100%") for w in result["warnings"])
    assert not any(w.startswith("A answers") for w in result["warnings"])
    text = format_comparison(result, "a.json", "b.json")
    assert "WARNING: B answers ABCD" in text and "CA (n=0)" in text
    ca_row = next(line for line in text.splitlines() if line.startswith("CA (n=0)"))
    assert "%" not in ca_row  # no accuracy for a category without questions
    html_path = tmp_path / "c.html"
    write_html(result, "a.json", "b.json", html_path)
    page = html_path.read_text(encoding="utf-8")
    assert "B answers ABCD" in page and "CA A:" not in page


def test_sampled_reports_are_compared_on_their_per_question_means():
    from lawtune.compare import compare_reports, format_comparison, paired_permutation

    def sampled(means):
        return {"summary": {"mode": "reasoning"}, "samples": [
            {"id": str(i), "type": "KD", "gold": ["A"], "pred": ["A"] if m > 0.5 else ["B"], "correct": m > 0.5,
             "valid": True, "forced": False, "output": "", "mean_correct": m} for i, m in enumerate(means)]}

    a = sampled([0.25] * 30 + [0.5] * 10)
    b = sampled([0.75] * 30 + [0.5] * 10)
    result = compare_reports(a, b)
    assert result["sampled"]["diff"] == pytest.approx(0.375) and result["sampled"]["p_value"] < 0.001
    assert "permutation" in format_comparison(result, "a", "b")
    assert paired_permutation([0.5] * 20, [0.5] * 20) == 1.0  # no difference at all
    assert compare_reports(a, a)["sampled"]["p_value"] == 1.0
    plain = {"summary": {}, "samples": [{k: v for k, v in s.items() if k != "mean_correct"} for s in a["samples"]]}
    assert compare_reports(plain, plain)["sampled"] is None


def test_greedy_against_sampled_or_another_k_is_warned_about():
    def run(do_sample=None, k=None):
        report = _report([_sample(f"q{i}", i % 2 == 0) for i in range(6)], mode="reasoning")
        report["summary"].update({key: v for key, v in (("do_sample", do_sample), ("samples", k)) if v is not None})
        return report

    def said(a, b):
        result = compare_reports(a, b, n_boot=10)
        assert [w for w in result["warnings"] if w in format_comparison(result, "a", "b")] == result["warnings"]
        return [w for w in result["warnings"] if w.startswith(("decoding", "K differs"))]

    greedy, k4, k2 = run(do_sample=False), run(do_sample=True, k=4), run(do_sample=True, k=2)
    assert said(greedy, k4) == ["decoding differs: A greedy, B sampled, K=4: a greedy answer and sampled ones are not "
                                "the same measurement (compare greedy with greedy, or sampled with sampled at one K)"]
    assert said(k4, k2)[0].startswith("K differs: A sampled, K=4, B sampled, K=2")
    assert said(run(do_sample=True), greedy)[0].startswith("decoding differs: A sampled, K=1, B greedy")
    assert said(k4, run(do_sample=True, k=4)) == [] and said(greedy, greedy) == []
    # a report written before do_sample was recorded: one answer each, so only K can be told apart
    assert said(run(), k2)[0].startswith("K differs: A one answer each, B sampled, K=2")
    assert said(run(), greedy) == []
