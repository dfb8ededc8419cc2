import json

import pytest
import torch

from lawtune.config import AdapterConfig, EvalConfig, EvalFileConfig, EvalRun, GenerationConfig, ModelConfig
from lawtune.data import Record, load_records
from lawtune.demo import build_tiny_model, build_tokenizer, demo_data_path
from lawtune.evaluate import candidate_answers, eval_file, evaluate_records, score_candidates, shuffle_options
from lawtune.prompts import render_prompt

from conftest import synthetic_records, write_jsonl


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """Train a tiny model with lawtune's own training path on the synthetic task (shared by the tests)."""
    from lawtune.config import load_config
    from lawtune.train import train

    tmp = tmp_path_factory.mktemp("learn")
    rows = synthetic_records(400)
    data = write_jsonl(tmp / "syn.json", rows)
    tok = build_tokenizer([r["statement"] + "".join(r["option_list"].values()) for r in rows], vocab_size=600)
    base = tmp / "base"
    build_tiny_model(tok, hidden_size=64, layers=2).save_pretrained(base)
    tok.save_pretrained(base)
    cfg = load_config(None, [
        f"model.path={base}", "model.dtype=float32", f"data.train={data}", "data.eval_fraction=0.1",
        f"train.output_dir={tmp / 'run'}", "train.max_steps=300", "train.save_steps=1000", "train.logging_steps=50",
        "train.eval_steps=0", "train.warmup_steps=10", "train.learning_rate=1e-2", "train.optim=adamw_torch",
        "train.report_to=[none]", "train.per_device_batch_size=8", "train.gradient_accumulation_steps=1",
        "eval.batch_size=48",
    ])
    result = train(cfg)
    return {"base": base, "adapter": tmp / "run" / "final_model", "eval_file": tmp / "run" / "data" / "eval.jsonl",
            "result": result, "tmp": tmp}


def _eval(learned, mode, adapter=True, **kw):
    out = learned["tmp"] / f"{mode}-{adapter}.json"
    report = eval_file(EvalRun(model=ModelConfig(path=str(learned["base"]), dtype="float32"),
                              adapter=AdapterConfig(path=str(learned["adapter"]) if adapter else None),
                              eval=EvalFileConfig(mode=mode, batch_size=48, data=str(learned["eval_file"]), output=str(out),
                                                  **kw)))
    return report, out


@pytest.mark.slow  # the `learned` fixture trains 300 steps
def test_the_whole_loop_learns_a_content_dependent_task(learned):
    """Formatting, masking, generation and extraction line up: held-out accuracy rises from chance to >= 90%."""
    # No wall-clock bound here: under load the 300 steps took 65-330 s on 2 cores (timings belong in bench/).
    assert learned["result"].steps == 300
    held_out = load_records(learned["eval_file"]).records
    assert len({tuple(r.answer) for r in held_out}) >= 4 and any(len(r.answer) > 1 for r in held_out)
    base, _ = _eval(learned, "direct", adapter=False)
    assert base["summary"]["accuracy"] < 0.3
    direct, _ = _eval(learned, "direct")
    choice, _ = _eval(learned, "choice")
    assert direct["summary"]["accuracy"] >= 0.9, direct["summary"]
    assert choice["summary"]["accuracy"] >= 0.9, choice["summary"]
    assert direct["summary"]["multi"]["n"] > 0 and direct["summary"]["multi"]["accuracy"] >= 0.8
    assert learned["result"].eval_history[-1]["eval_accuracy"] >= 0.9  # the in-training evaluation agrees


@pytest.mark.slow  # the `learned` fixture trains 300 steps
def test_report_layout(learned):
    report, path = _eval(learned, "direct")
    s = report["summary"]
    for key in ("n", "accuracy", "invalid", "forced", "single", "multi", "by_type", "option_f1", "mode", "model",
                "adapter", "data_sha256", "questions_per_s"):
        assert key in s, key
    assert set(s["by_type"]) >= {"KD", "CA"} and s["mode"] == "direct" and len(s["data_sha256"]) == 64
    sample = report["samples"][0]
    assert set(sample) >= {"id", "type", "gold", "pred", "correct", "output"}
    assert sample["gold"] == sorted(sample["gold"]) and json.loads(path.read_text(encoding="utf-8")) == report


@pytest.mark.slow  # the `learned` fixture trains 300 steps
def test_training_split_overlap_warns_loudly(learned, caplog):
    out = learned["tmp"] / "overlap.json"
    with caplog.at_level("WARNING", logger="lawtune"):
        report = eval_file(EvalRun(model=ModelConfig(path=str(learned["base"]), dtype="float32"),
                                  adapter=AdapterConfig(path=str(learned["adapter"])),
                                  eval=EvalFileConfig(batch_size=48, data=str(learned["tmp"] / "run" / "data" / "train.jsonl"),
                                                      output=str(out), max_samples=20)))
    assert report["summary"]["train_overlap"] == 20
    assert "TRAINING split" in caplog.text


@pytest.mark.slow  # the `learned` fixture trains 300 steps
def test_shuffled_options_are_mapped_back(learned):
    report, _ = _eval(learned, "choice", shuffle_options=True)
    # The synthetic answer depends on the statement's topic, not on where an option sits, so a model that
    # learned letters by position loses accuracy under shuffling; predictions are reported in original letters.
    assert all(set(s["pred"]) <= {"A", "B", "C", "D"} for s in report["samples"])
    assert all("shown_letters" in s for s in report["samples"])
    record = Record(id="x", statement="s", options={"A": "a", "B": "b", "C": "c", "D": "d"}, answer=["A", "C"])
    shown, new_to_old = shuffle_options(record, seed=3)
    assert sorted(shown.options.values()) == ["a", "b", "c", "d"]
    assert sorted(new_to_old[x] for x in shown.answer) == ["A", "C"]
    assert {shown.options[n] for n in shown.answer} == {"a", "c"}


def test_choice_scores_equal_full_sequence_log_likelihood(tiny_tokenizer):
    """The shared-prefix, left-padded batch gives the same scores as scoring each full text alone."""
    model = build_tiny_model(tiny_tokenizer).eval()
    records = [Record(id="1", statement="甲与乙的合同纠纷，下列哪些说法正确？", options={"A": "甲", "B": "乙", "C": "丙"}, answer=["A"]),
               Record(id="2", statement="短题？", options={"A": "有效", "B": "无效"}, answer=["B"])]
    batched = score_candidates(model, tiny_tokenizer, records, "chat")
    assert [len(s) for s in batched] == [7, 3] and candidate_answers("AB") == ["A", "B", "AB"]
    for record, scored in zip(records, batched):
        prompt = tiny_tokenizer(render_prompt(record, tiny_tokenizer, "chat"), add_special_tokens=False)["input_ids"]
        for cand, value in scored:
            target = tiny_tokenizer("答案：" + cand, add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
            with torch.no_grad():
                logits = model(torch.tensor([prompt + target])).logits[0].float()
            logp = torch.log_softmax(logits, -1)
            expected = sum(logp[len(prompt) - 1 + t, tok].item() for t, tok in enumerate(target))
            assert value == pytest.approx(expected, abs=1e-4)


def test_reasoning_rows_cut_off_at_the_limit_are_forced_and_flagged(tiny_model_dir):
    from lawtune.model import load_for_inference

    model, tok = load_for_inference(ModelConfig(path=str(tiny_model_dir), dtype="float32"))
    records = [Record(id=str(i), statement=f"第{i}题？", options={"A": "a", "B": "b"}, answer=["A"]) for i in range(3)]
    samples, summary = evaluate_records(model, tok, records, EvalConfig(mode="reasoning"),
                                        GenerationConfig(max_new_tokens=5), "chat", show_progress=False)
    # A random model almost never ends its thinking within 5 tokens: every row must be closed and flagged.
    assert summary["forced"] == sum(s["forced"] for s in samples) >= 1
    forced = next(s for s in samples if s["forced"])
    assert "</think>\n\n答案：" in forced["output"]
    assert forced["correct"] == (forced["pred"] == ["A"])
    # --max-new-tokens is a hard cap: the forced answer's tokens are inside it, not on top of it.
    assert all(1 <= s["generated_tokens"] <= 5 for s in samples)


def test_prompts_are_left_padded_exactly_as_the_tokenizer_pads_them(tiny_tokenizer):
    from lawtune.generation import encode_batch

    texts = ["短", "甲公司与乙公司的合同纠纷，下列哪些说法正确？", "丙的房屋"]
    tiny_tokenizer.padding_side = "left"
    ref = tiny_tokenizer(texts, add_special_tokens=False, return_tensors="pt", padding=True)
    got = encode_batch(tiny_tokenizer, texts, torch.device("cpu"))
    assert got["input_ids"].shape[1] > 3
    assert torch.equal(got["input_ids"], ref["input_ids"]) and torch.equal(got["attention_mask"], ref["attention_mask"])


def _drawn(pred, gold="AC"):
    valid = pred is not None
    return {"pred": list(pred or ""), "valid": valid, "correct": valid and set(pred) == set(gold), "forced": False,
            "generated_tokens": 3, "output": f"答案：{pred}"}


def test_majority_vote_mean_and_any_correct_on_planted_samples():
    from lawtune.scoring import vote

    v = vote([_drawn("B"), _drawn("AC"), _drawn("AC"), _drawn(None)])
    assert v["pred"] == ["A", "C"] and v["correct"] and v["mean_correct"] == 0.5 and v["any_correct"]
    assert v["agreement"] == 0.5 and len(v["sampled"]) == 4
    tie = vote([_drawn("B"), _drawn("AC"), _drawn("AC"), _drawn("B")])
    assert tie["pred"] == ["B"] and not tie["correct"]  # a tie goes to the set sampled first
    unreadable = vote([_drawn(None), _drawn(None)])
    assert not unreadable["correct"] and not unreadable["any_correct"] and unreadable["agreement"] == 0.0
    lucky = vote([_drawn("B"), _drawn("B"), _drawn("AC")])
    assert not lucky["correct"] and lucky["any_correct"] and lucky["mean_correct"] == pytest.approx(1 / 3)


def test_eval_with_k_samples_reports_avg_maj_and_pass_at_k(tiny_model_dir, tmp_path):
    from lawtune.cli import main

    out = tmp_path / "k.json"
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(demo_data_path()), "--max-samples", "12",
                 "--samples", "3", "--output", str(out), "model.dtype=float32"]) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    s = report["summary"]
    assert s["samples"] == 3 and s["avg@3"] <= s["pass@3"] and s["maj@3"] == s["accuracy"]
    assert s["maj@3"] <= s["pass@3"] and "sampled first" in s["majority_rule"]
    for q in report["samples"]:
        assert len(q["sampled"]) == 3 and q["mean_correct"] == sum(x["correct"] for x in q["sampled"]) / 3
    again = tmp_path / "k2.json"
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(demo_data_path()), "--max-samples", "12",
                 "--samples", "3", "--output", str(again), "model.dtype=float32"]) == 0
    assert json.loads(again.read_text(encoding="utf-8"))["samples"] == report["samples"]  # seeded: repeats


def test_k_samples_of_a_question_are_one_request_seeded_by_its_id_alone(tiny_model_dir):
    """eval --samples K: sample i of a question comes from (seed, its id, i), one prefill for the K: the same
    samples whether the question is evaluated among others or alone, and (reasoning mode) each sample forced on its
    own row when its trace is cut off."""
    from lawtune.generation import engine_holder
    from lawtune.model import load_for_inference

    model, tok = load_for_inference(ModelConfig(path=str(tiny_model_dir), dtype="float32"))
    records = [Record(id=f"q{i}", statement=f"第{i}题：甲与乙订立合同？", options={"A": "a", "B": "b"}, answer=["A"])
               for i in range(4)]
    gcfg = GenerationConfig(max_new_tokens=10)
    prefills = []
    with engine_holder(tok, gcfg) as engines:
        engine = engines.get(model, 3, 256)
        hook = engine.runner.decoder.register_forward_pre_hook(
            lambda module, args, kwargs: prefills.append(kwargs["input_ids"].shape) if kwargs["input_ids"].shape[1] > 1
            else None, with_kwargs=True)
        try:
            crowded, _ = evaluate_records(model, tok, records, EvalFileConfig(mode="reasoning", samples=3, batch_size=3),
                                          gcfg, "chat", show_progress=False, engines=engines)
        finally:
            hook.remove()
        alone, _ = evaluate_records(model, tok, records[2:3], EvalFileConfig(mode="reasoning", samples=3, batch_size=3),
                                    gcfg, "chat", show_progress=False, engines=engines)
    # one prefill row per question (and closing chunks of one row each), never one per sample
    assert sum(shape[0] for shape in prefills if shape[1] > 8) == len(records)
    assert [s["output"] for s in alone[0]["sampled"]] == [s["output"] for s in crowded[2]["sampled"]]
    assert len({s["output"] for s in crowded[2]["sampled"]}) > 1  # K different draws
