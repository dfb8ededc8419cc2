"""`lawtune grpo`: it learns from the exact-set reward (and not from a random one), writes what `lawtune train`
writes, resumes, continues an SFT adapter, and refuses settings it does not read."""

import json
import math
import os
import random

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lawtune.cli import main
from lawtune.config import ConfigError, GrpoRun, load_config
from lawtune.demo import build_tiny_model, build_tokenizer

from conftest import TOPIC_ANSWERS, random01, synthetic_records, tiny_grpo_settings, write_jsonl

TOPICS = sorted(TOPIC_ANSWERS)
# Half the topics are taught with a wrong answer set most of the time (a weak teacher): after SFT the model writes
# the format and the think text, answers those topics wrong when greedy, and samples their right answer in about
# a third of its completions. The other half it answers right. Held-out accuracy starts near 50%.
WEAK = TOPICS[1::2]
RIGHT_SHARE = 0.35
# Script mode of the seed sweep (not run in CI): LAWTUNE_GRPO_SWEEP=1 LAWTUNE_SFT_SEED=N pytest -m slow -s -k sweep.
SFT_SEED, SWEEP = "LAWTUNE_SFT_SEED", "LAWTUNE_GRPO_SWEEP"


def _with_think(rows: list, prefix: str) -> list:
    for r in rows:
        r["reasoning"] = r["statement"].split("问题")[0]  # the topic: a think text of one token
        r["id"] = prefix + r["id"]
    return rows


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A tiny model after a short SFT on the synthetic task (its reasoning traces one token long)."""
    from lawtune.train import train

    tmp = tmp_path_factory.mktemp("grpo")
    teacher = random.Random(0)
    sft_rows = _with_think(synthetic_records(400, seed=500), "s")
    for r in sft_rows:
        if r["reasoning"] in WEAK and teacher.random() >= RIGHT_SHARE:
            r["answer"] = list(TOPIC_ANSWERS[TOPICS[(TOPICS.index(r["reasoning"]) + 1) % len(TOPICS)]])
    grpo_rows = _with_think(synthetic_records(400, seed=0), "g")
    held_rows = _with_think(synthetic_records(240, seed=1000), "e")
    files = {name: write_jsonl(tmp / f"{name}.json", rows)
             for name, rows in (("sft", sft_rows), ("train", grpo_rows), ("eval", held_rows))}
    tok = build_tokenizer([r["statement"] + "".join(r["option_list"].values()) for r in grpo_rows], vocab_size=600)
    model = build_tiny_model(tok, hidden_size=64, layers=2)
    with torch.no_grad():
        # LoRA leaves lm_head frozen: a wider head lets the tiny model's sampled completions be as sure of the format
        # as its greedy ones (with the demo's head it samples garbage at temperature 1).
        model.lm_head.weight.mul_(4)
    base = tmp / "base"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    cfg = load_config(None, [
        f"model.path={base}", "model.dtype=float32", f"data.train={files['sft']}", f"data.eval={files['eval']}",
        "data.eval_max_samples=16", f"train.output_dir={tmp / 'sft'}", "train.max_steps=150", "train.save_steps=1000",
        "train.logging_steps=50", "train.eval_steps=0", "train.warmup_steps=0", "train.learning_rate=1e-2",
        "train.optim=adamw_torch", "train.report_to=[none]", "train.per_device_batch_size=8",
        "train.gradient_accumulation_steps=1", "eval.batch_size=16",
        f"train.seed={os.environ.get(SFT_SEED, '0')}",
    ])
    train(cfg)
    return {"base": base, "adapter": tmp / "sft" / "final_model", "tmp": tmp, **files}


def _grpo_config(run, out, *overrides):
    return load_config(None, [
        f"model.path={run['base']}", "model.dtype=float32", f"data.train={run['train']}", f"data.eval={run['eval']}",
        "data.max_length=512", f"grpo.output_dir={out}", f"grpo.adapter={run['adapter']}",
        "grpo.num_generations=8", "grpo.per_device_batch_size=64", "grpo.gradient_accumulation_steps=1",
        "grpo.temperature=1.0", "grpo.top_p=1.0", "grpo.max_completion_length=16", "grpo.eval_max_new_tokens=24",
        "grpo.learning_rate=3e-3", "grpo.beta=0", "grpo.save_steps=1000", "grpo.report_to=[none]",
        "grpo.eval_batch_size=240", "data.eval_max_samples=240",
        # A forward pass again in every backward buys nothing at this size (same gradients, a fifth more time).
        "grpo.gradient_checkpointing=false", *overrides,
    ], run_cls=GrpoRun)


@pytest.mark.slow  # the `sft_run` fixture trains 150 SFT steps
def test_grpo_raises_held_out_accuracy_and_a_random_reward_does_not(sft_run):
    """The learning proof, on the default rollouts (lawtune's engine): 30 steps of 8 questions x 8 completions
    (<= 16 tokens, beta 0, learning rate 3e-3) raise held-out exact-set accuracy (greedy, reasoning mode, 240
    questions) by >= 20 points; a seeded random 0/1 reward in place of the rewards gains < 5 (it drifts). No
    wall-clock bound (timings belong in bench/).

    Measured on one CPU machine (seventeenth session, SFT seed 0, pinned): 42.5% -> 71.7% (72.1% after 20 steps),
    the control 12.5%; the same with the rollouts on the folded adapter (grpo.fold_adapter, eighteenth session).
    With TRL's own generation (grpo.rollout=trl) the same settings peak early (73.3% after 12 steps) and fall back
    (50.8% after 20, 44.6% after 30); the test below runs them at 2e-3, the seed sweep at 1e-3 for 60 steps."""
    from lawtune.train.grpo import grpo

    learned = grpo(_grpo_config(sft_run, sft_run["tmp"] / "learn", "grpo.max_steps=30", "grpo.eval_steps=0"))
    start, end = learned.start_eval_accuracy, learned.final_eval_accuracy
    assert learned.eval_history[0]["eval_n"] == 240 and learned.eval_history[0]["eval_mode"] == "reasoning"
    assert 0.2 < start < 0.75, learned.eval_history  # the SFT left room: well below the ceiling
    assert end - start >= 0.20, learned.eval_history

    control = grpo(_grpo_config(sft_run, sft_run["tmp"] / "control", "grpo.max_steps=30", "grpo.eval_steps=0"),
                   reward_funcs=[random01])
    assert control.start_eval_accuracy == start
    assert control.final_eval_accuracy - start < 0.05, control.eval_history


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get(SWEEP), reason=f"script mode: {SWEEP}=1 {SFT_SEED}=N (two 60-step runs)")
def test_dynamic_sampling_sweep_row(sft_run, capsys):
    """One SFT seed's row of the dynamic-sampling comparison: 60 optimizer steps of TRL's rollouts at 1e-3 without and
    with grpo.dynamic_sampling (max_resample unset: up to 8 extra groups a step), printed as one JSON line with the
    held-out gain and the completions sampled. Gains are not compared here: the claim is over seeds (a median)."""
    from lawtune.train.grpo import grpo

    row: dict = {"sft_seed": int(os.environ.get(SFT_SEED, "0"))}
    for name, extra in (("plain", []), ("dynamic", ["grpo.dynamic_sampling=true"])):
        out = sft_run["tmp"] / f"sweep-{name}"
        r = grpo(_grpo_config(sft_run, out, "grpo.max_steps=60", "grpo.eval_steps=0", "grpo.rollout=trl",
                              "grpo.learning_rate=1e-3", *extra))
        steps = _step_rows(out)
        groups = sum(s.get("groups/sampled", 8) for s in steps)
        row[name] = {"start": r.start_eval_accuracy, "final": r.final_eval_accuracy,
                     "gain": round(r.final_eval_accuracy - r.start_eval_accuracy, 4), "completions": int(groups) * 8,
                     "skipped_steps": sum(s.get("groups/kept", 1) == 0 for s in steps),
                     "frac_reward_zero_std": round(sum(s["frac_reward_zero_std"] for s in steps) / len(steps), 3)}
    with capsys.disabled():
        print("\nSWEEP " + json.dumps(row))


@pytest.mark.slow  # the `sft_run` fixture trains 150 SFT steps
def test_trl_rollouts_train_the_same_way(sft_run):
    """grpo.rollout=trl (TRL's own generation in place of the engine's rollout_func) teaches the same direction.

    At learning rate 2e-3: at the engine test's 3e-3 the gain after 12 steps depended on torch's thread count
    (twenty-second session, one CPU machine: 42.5% -> 57.9% with 2 threads, -> 47.1% with 1, which `-n auto` on 2
    cores gives each worker); at 2e-3 it was 42.5% -> 60.4% with either."""
    from lawtune.train.grpo import grpo

    r = grpo(_grpo_config(sft_run, sft_run["tmp"] / "trl", "grpo.max_steps=12", "grpo.eval_steps=0",
                          "grpo.rollout=trl", "grpo.learning_rate=2e-3"))
    rows = [json.loads(line) for line in (sft_run["tmp"] / "trl" / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "reward" in row]
    assert len(steps) == 12 and all(0 < row["completions/mean_length"] <= 16 for row in steps)
    assert r.final_eval_accuracy - r.start_eval_accuracy >= 0.10, r.eval_history


@pytest.mark.slow  # the `sft_run` fixture trains 150 SFT steps
def test_a_run_writes_what_train_writes_and_resumes(sft_run, tmp_path):
    out = tmp_path / "run"
    common = ["grpo", "--model", str(sft_run["base"]), "--adapter", str(sft_run["adapter"]), "--data",
              str(sft_run["train"]), "--output-dir", str(out), "model.dtype=float32", f"data.eval={sft_run['eval']}",
              "data.eval_max_samples=16", "data.max_length=512", "grpo.num_generations=4",
              "grpo.per_device_batch_size=8", "grpo.gradient_accumulation_steps=1", "grpo.max_completion_length=16",
              "grpo.eval_steps=2", "grpo.save_steps=2", "grpo.report_to=[tensorboard]", "grpo.eval_batch_size=16",
              "grpo.beta=0.01", "grpo.length_budget=8"]
    assert main([*common, "--max-steps", "2"]) == 0
    for folder in ("final_model", "best_model"):
        for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer_config.json",
                     "lawtune_config.yaml", "data_manifest.json"):
            assert (out / folder / name).is_file(), (folder, name)
        assert not (out / folder / "ref").exists()  # the KL reference is rebuilt from grpo.adapter, never saved
        card = (out / folder / "README.md").read_text(encoding="utf-8")  # lawtune's card, not TRL's template
        assert "[More Information Needed]" not in card and "`lawtune grpo`" in card and "library_name: peft" in card
    saved = yaml.safe_load((out / "final_model" / "lawtune_config.yaml").read_text(encoding="utf-8"))
    assert list(saved) == ["working_dir", "model", "lora", "data", "grpo"] and saved["data"]["prompt_format"] == "chat"
    manifest = json.loads((out / "final_model" / "data_manifest.json").read_text(encoding="utf-8"))
    assert manifest["grpo"]["continued_adapter"] and manifest["base_model"]["hidden_size"] == 64
    sft_manifest = json.loads((sft_run["adapter"] / "data_manifest.json").read_text(encoding="utf-8"))
    assert set(sft_manifest["train_statements_sha256"]) <= set(manifest["train_statements_sha256"])
    assert (out / "curves.png").stat().st_size > 1000 and any((out / "runs").rglob("events.out.tfevents*"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = {row["step"]: row for row in rows if "reward" in row}
    assert sorted(steps) == [1, 2]
    for key in ("rewards/exact_set/mean", "rewards/exact_set/std", "rewards/option_f1/mean", "rewards/answer_format/mean",
                "rewards/length_penalty_8/mean", "reward", "reward_std", "groups/any_exact", "completions/mean_length",
                "completions/max_length", "completions/clipped_ratio", "frac_reward_zero_std", "kl"):
        assert all(key in row for row in steps.values()), key
    assert [row["step"] for row in rows if "eval_accuracy" in row] == [0, 2]
    # a stopped run goes on from its checkpoint: steps 3 and 4 are added, nothing is redone
    assert main([*common, "--max-steps", "4", "--resume"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "reward" in row] == [1, 2, 3, 4]
    assert json.loads(sorted(out.glob("checkpoint-*"))[-1].joinpath("trainer_state.json").read_text())["global_step"] == 4
    # eval takes the result unchanged
    report = tmp_path / "report.json"
    assert main(["eval", "--model", str(sft_run["base"]), "--adapter", str(out / "final_model"), "--data",
                 str(sft_run["eval"]), "--max-samples", "8", "--output", str(report), "model.dtype=float32"]) == 0


@pytest.mark.slow  # the `sft_run` fixture trains 150 SFT steps
def test_an_sft_adapter_is_continued_trainable(sft_run, tmp_path):
    from lawtune.train.grpo import fit, setup

    run = setup(_grpo_config(sft_run, tmp_path / "cont", "grpo.max_steps=2", "grpo.eval_steps=0",
                             "grpo.per_device_batch_size=16", "data.eval_max_samples=8", "grpo.rollout=engine"))
    lora = {n: p for n, p in run.model.named_parameters() if "lora_" in n}
    assert lora and all(p.requires_grad for p in lora.values())
    assert not any(p.requires_grad for n, p in run.model.named_parameters() if "lora_" not in n)
    fit(run)
    before = load_file(str(sft_run["adapter"] / "adapter_model.safetensors"))
    after = load_file(str(tmp_path / "cont" / "final_model" / "adapter_model.safetensors"))
    assert before.keys() == after.keys()
    assert all(not torch.equal(before[k], after[k]) for k in before if "lora_A" in k or "lora_B" in k)
    assert all(p.requires_grad for p in lora.values())


@pytest.mark.parametrize("override, key", [("train.max_steps=3", "train.max_steps"), ("eval.mode=direct", "eval.mode"),
                                           ("generation.temperature=0.7", "generation.temperature")])
def test_settings_grpo_does_not_read_are_refused(override, key, tmp_path, capsys):
    code = main(["grpo", "--model", "m", "--data", "d.json", "--output-dir", str(tmp_path / "x"), override])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and f"{key}: not a key of `lawtune grpo`" in err
    assert not (tmp_path / "x").exists()


def test_a_grpo_yaml_with_a_section_it_does_not_read_or_contradictory_settings_is_refused(tmp_path, capsys):
    path = tmp_path / "g.yaml"
    path.write_text("# lawtune grpo --config g.yaml\ngrpo: {max_steps: 3}\neval: {mode: direct}\n", encoding="utf-8")
    assert main(["grpo", "--config", str(path), "--print-config"]) == 2
    assert "eval: not a section of `lawtune grpo`" in capsys.readouterr().err
    for overrides, message in ((["grpo.adapter=a", "lora.r=4"], "lora:"), (["data.mix=x.json"], "data.mix:"),
                               (["grpo.length_penalty=2"], "grpo.length_penalty:"),
                               (["grpo.overlong_cache=8"], "grpo.overlong_cache:"),
                               (["grpo.length_penalty_form=soft_overlong"], "grpo.overlong_cache:"),
                               (["grpo.length_penalty_form=soft_overlong", "grpo.overlong_cache=1024"],
                                r"grpo.overlong_cache: 1024 must be less than grpo.max_completion_length \(1024\)"),
                               (["grpo.length_penalty_form=soft_overlong", "grpo.overlong_cache=8",
                                 "grpo.length_budget=100"], "grpo.length_budget:"),
                               (["grpo.length_penalty_form=quadratic"], "grpo.length_penalty_form:"),
                               (["grpo.importance_sampling_level=batch"], "grpo.importance_sampling_level:"),
                               (["grpo.per_device_batch_size=5"], "grpo.per_device_batch_size:"),
                               (["grpo.rollout=vllm"], "grpo.rollout:"),
                               (["grpo.max_resample=2"], "grpo.max_resample: set without grpo.dynamic_sampling"),
                               (["grpo.dynamic_sampling=true", "grpo.max_resample=-1"], "grpo.max_resample")):
        with pytest.raises(ConfigError, match=message):
            load_config(None, overrides, run_cls=GrpoRun)


@pytest.mark.parametrize("override, expected", [([], True), (["grpo.gradient_checkpointing=false"], False)])
def test_gradient_checkpointing_reaches_trl_either_way(override, expected, tmp_path):
    # TRL's GRPOConfig defaults to checkpointing on: an "off" that is not passed would be ignored.
    from lawtune.train.grpo import grpo_arguments

    cfg = load_config(None, ["model.path=m", "data.train=d.json", *override], run_cls=GrpoRun)
    args = grpo_arguments(cfg, tmp_path, torch.float32, torch.device("cpu"), [1.0])
    assert args.gradient_checkpointing is expected


@pytest.mark.parametrize("fold", [True, False])
def test_fold_adapter_decides_how_rollouts_and_held_out_evaluation_sample(fold, tiny_tokenizer, tmp_path):
    # Rollouts run on the held-out evaluation's engine holder (EngineRollout takes held_out.engines).
    from lawtune.train.grpo import GrpoHeldOut

    cfg = load_config(None, ["model.path=m", "data.train=d.json", f"grpo.fold_adapter={str(fold).lower()}"],
                      run_cls=GrpoRun)
    held_out = GrpoHeldOut(cfg, [], tiny_tokenizer, None, tmp_path, {})
    assert held_out.engines.fold is fold


def test_the_cpu_runs_grpo_uncompiled_with_sdpa_and_says_so(caplog):
    from lawtune.train.common import cpu_fallbacks

    cfg = load_config(None, ["model.path=m", "data.train=d.json", "grpo.compile=true",
                             "model.attn_implementation=flex_attention"], run_cls=GrpoRun)
    assert cfg.grpo.packed  # the default
    kept = cpu_fallbacks(cfg, "grpo", torch.device("cuda"))
    assert kept.grpo.compile and kept.model.attn_implementation == "flex_attention"
    with caplog.at_level("WARNING", logger="lawtune"):
        cpu = cpu_fallbacks(cfg, "grpo", torch.device("cpu"))
    assert not cpu.grpo.compile and cpu.model.attn_implementation == "sdpa" and cpu.grpo.packed
    assert "grpo.compile: skipped on the CPU" in caplog.text


@pytest.mark.parametrize("override, mask, level", [([], False, "token"),
                                                   (["grpo.mask_truncated=true", "grpo.importance_sampling_level=sequence"],
                                                    True, "sequence")])
def test_the_recipe_switches_reach_trl(override, mask, level, tmp_path):
    from lawtune.train.grpo import grpo_arguments

    cfg = load_config(None, ["model.path=m", "data.train=d.json", *override], run_cls=GrpoRun)
    args = grpo_arguments(cfg, tmp_path, torch.float32, torch.device("cpu"), [1.0])
    assert args.mask_truncated_completions is mask and args.importance_sampling_level == level


@pytest.mark.parametrize("overrides, name, values", [
    (["grpo.length_budget=10", "grpo.length_penalty=0.5"], "length_penalty_10", [0.0, -0.4, -0.5]),
    (["grpo.length_penalty_form=soft_overlong", "grpo.overlong_cache=4"], "length_penalty_soft_overlong_4",
     [0.0, -0.5, -1.0]),
])
def test_the_length_penalty_form_picks_one_length_reward(overrides, name, values):
    from lawtune.train.grpo import reward_functions

    cfg = load_config(None, ["model.path=m", "data.train=d.json", "grpo.max_completion_length=20", *overrides],
                      run_cls=GrpoRun)
    funcs, weights = reward_functions(cfg)
    lengths = [f for f in funcs if f.__name__.startswith("length_penalty")]
    assert [f.__name__ for f in lengths] == [name] and len(weights) == len(funcs)
    assert lengths[0](["", "", ""], ["", "", ""], completion_ids=[[0] * 10, [0] * 18, [0] * 20]) == values


def test_sequence_level_ratios_train_and_log_as_token_level_ones(tiny_model_dir, tmp_path, monkeypatch):
    """GSPO (grpo.importance_sampling_level=sequence) reaches TRL's trainer, trains and logs the same keys."""
    from lawtune.train import grpo as grpo_module
    from lawtune.train.grpo import fit, setup

    monkeypatch.setattr(grpo_module, "reward_functions", lambda cfg: ([_alternating], [1.0]))
    keys = {}
    for level in ("token", "sequence"):
        out = tmp_path / level
        run = setup(_tiny_config(tiny_model_dir, out, "grpo.max_steps=2", "grpo.eval_steps=0", "grpo.rollout=engine",
                                 f"grpo.importance_sampling_level={level}"))
        assert run.trainer.importance_sampling_level == level
        fit(run)
        steps = _step_rows(out)
        assert len(steps) == 2 and all(row["grad_norm"] > 0 for row in steps), steps
        keys[level] = set(steps[0])
    assert keys["sequence"] == keys["token"]
    assert {"entropy", "clip_ratio/region_mean", "rewards/_alternating/mean", "completions/mean_length"} <= keys["token"]


def _tiny_grpo(model_dir, out, *extra):
    from lawtune.demo import demo_data_path

    return ["grpo", "--model", str(model_dir), "--data", str(demo_data_path()), "--output-dir", str(out),
            *tiny_grpo_settings(*extra)]


def _tiny_config(model_dir, out, *extra) -> GrpoRun:
    """_tiny_grpo's run as a config, for setup() and fit()."""
    from lawtune.demo import demo_data_path

    return load_config(None, [f"model.path={model_dir}", f"data.train={demo_data_path()}", f"grpo.output_dir={out}",
                              *tiny_grpo_settings(*extra)], run_cls=GrpoRun)


@pytest.mark.slow  # three short GRPO sessions and a straight run
def test_sigterm_stops_grpo_with_a_checkpoint_and_the_resumed_run_ends_as_a_straight_one(tiny_model_dir, tmp_path,
                                                                                       monkeypatch, capsys):
    """SIGTERM during step 2 of 3: exit 143 with checkpoint-2 (no evaluation after the signal); --resume ends on the
    straight run's adapter and prints its held-out summary (start, best, final); another --resume does nothing."""
    from lawtune.train import grpo as grpo_module

    from conftest import assert_same_adapter, file_states, term_at_step

    monkeypatch.setattr(grpo_module, "reward_functions", lambda cfg: ([random01], [1.0]))
    straight, out = tmp_path / "straight", tmp_path / "run"
    assert main(_tiny_grpo(tiny_model_dir, straight)) == 0
    summary = capsys.readouterr().out.splitlines()[-1]
    assert "at the start, best" in summary and summary.endswith(str(straight / "final_model"))

    real_setup = grpo_module.setup

    def setup(*args, **kwargs):
        run = real_setup(*args, **kwargs)
        run.trainer.add_callback(term_at_step(2))
        return run

    monkeypatch.setattr(grpo_module, "setup", setup)
    assert main(_tiny_grpo(tiny_model_dir, out)) == 143
    assert capsys.readouterr().err.strip().splitlines()[-1] == "preempted at step 2; rerun with --resume"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"] and not (out / "final_model").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_accuracy" in r] == [0]

    monkeypatch.setattr(grpo_module, "setup", real_setup)
    assert main([*_tiny_grpo(tiny_model_dir, out), "--resume"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == summary.replace(str(straight), str(out))
    assert_same_adapter(out / "final_model", straight / "final_model")
    step2, final = (load_file(str(out / name / "adapter_model.safetensors")) for name in ("checkpoint-2", "final_model"))
    assert any(not torch.equal(step2[k], v) for k, v in final.items())  # step 3 trained: the comparison means something
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_accuracy" in r] == [0, 2, 3]

    before = file_states(out)
    assert main([*_tiny_grpo(tiny_model_dir, out), "--resume"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("already at step 3 of 3: nothing to do")
    assert file_states(out) == before


def _alternating(prompts, completions, **_):
    """1, 0, 1, 0, ...: the two completions of each group of 2 differ, so every advantage is +-1 whatever they say."""
    return [float(i % 2 == 0) for i in range(len(completions))]


def _step_rows(out) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if "reward" in row]


@pytest.mark.parametrize("rollout", ["engine", "trl"])
def test_mask_truncated_leaves_cut_completions_out_of_the_loss(rollout, tiny_model_dir, tmp_path, monkeypatch):
    """Two completion tokens: the random model cuts every completion. With grpo.mask_truncated nothing is left in the
    loss (0, no gradient); without it the same steps have a gradient."""
    from lawtune.train import grpo as grpo_module

    monkeypatch.setattr(grpo_module, "reward_functions", lambda cfg: ([_alternating], [1.0]))
    grad = {}
    for mask in (True, False):
        out = tmp_path / f"mask-{mask}"
        assert main(_tiny_grpo(tiny_model_dir, out, "grpo.max_steps=2", "grpo.eval_steps=0",
                               "grpo.max_completion_length=2", f"grpo.rollout={rollout}",
                               f"grpo.mask_truncated={str(mask).lower()}")) == 0
        steps = _step_rows(out)
        assert len(steps) == 2 and all(row["completions/clipped_ratio"] == 1.0 for row in steps), steps
        grad[mask] = [row["grad_norm"] for row in steps]
        if mask:
            assert all(row["loss"] == 0.0 for row in steps), steps
    assert grad[True] == [0.0, 0.0] and all(g > 0 for g in grad[False]), grad


def _two_ending_model(tokenizer, path, other_end: int):
    """A tiny model that samples only the end token or ``other_end`` (equal logits), which its generation config also
    names as an end token (as R1-Distill's names more than the tokenizer's)."""
    from transformers import GenerationConfig

    model = build_tiny_model(tokenizer, hidden_size=64, layers=2)
    with torch.no_grad():
        for layer in model.model.layers:  # the residual stream stays the token's embedding
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight[:, 0] = 1.0
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0  # the final hidden state: (positive, 0, ..., 0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[[tokenizer.eos_token_id, other_end], 0] = 10.0
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                                               eos_token_id=[tokenizer.eos_token_id, other_end])
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("rollout", ["engine", "trl"])
def test_completions_end_where_trl_ends_them_and_count_as_not_cut(rollout, tiny_tokenizer, tmp_path, monkeypatch):
    """Every completion of this model is one end token (the tokenizer's or the generation config's other one): TRL
    reads none as cut, so grpo.mask_truncated leaves them all in the loss. An engine that ran on past the generation
    config's end token, or dropped the end token from the completion, would have them cut."""
    from lawtune.train import grpo as grpo_module

    monkeypatch.setattr(grpo_module, "reward_functions", lambda cfg: ([_alternating], [1.0]))
    other = 100
    model_dir = _two_ending_model(tiny_tokenizer, tmp_path / "model", other)
    out = tmp_path / "run"
    assert main(_tiny_grpo(model_dir, out, "grpo.max_steps=2", "grpo.eval_steps=0", "grpo.max_completion_length=4",
                           f"grpo.rollout={rollout}", "grpo.mask_truncated=true")) == 0
    steps = _step_rows(out)
    assert len(steps) == 2, steps
    for row in steps:
        assert row["completions/max_length"] == 1 and row["completions/clipped_ratio"] == 0.0, row
        # In the loss: TRL's entropy is its mean over the loss's tokens (0 over none), here that of two equally likely
        # end tokens. (Their gradient is 0: a log-probability of ln 1/2 whatever the hidden state's one live
        # direction; the padded pass's float noise once made it look positive.)
        assert row["entropy"] == pytest.approx(math.log(2), abs=0.01), row


@pytest.mark.parametrize("variant", [["lora.use_dora=true", "lora.use_rslora=true"], ["lora.init=pissa"],
                                     ["lora.modules_to_save=[lm_head]"]], ids=["dora", "pissa", "modules_to_save"])
def test_a_fresh_lora_variant_trains_under_grpo_and_its_final_model_loads_exactly_on_the_original_base(
        variant, tiny_model_dir, tmp_path, monkeypatch):
    from lawtune.config import ModelConfig
    from lawtune.model import load_for_inference
    from lawtune.train import grpo as grpo_module
    from lawtune.train.grpo import fit, setup

    monkeypatch.setattr(grpo_module, "reward_functions", lambda cfg: ([random01], [1.0]))
    out = tmp_path / "run"
    run = setup(_tiny_config(tiny_model_dir, out, "grpo.max_steps=2", "grpo.eval_steps=0", "grpo.rollout=engine",
                             *variant))
    before = {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}
    fit(run)
    changed = [n for n, p in run.model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert changed
    config = json.loads((out / "final_model" / "adapter_config.json").read_text(encoding="utf-8"))
    if "lora.use_dora=true" in variant:
        assert config["use_dora"] and config["use_rslora"] and any("magnitude" in n for n in changed)
    if "lora.init=pissa" in variant:
        assert config["init_lora_weights"] is True and config["r"] == 2 * run.cfg.lora.r  # converted
    if "lora.modules_to_save=[lm_head]" in variant:
        assert config["modules_to_save"] == ["lm_head"] and any("lm_head" in n for n in changed)

    ids = torch.tensor([list(range(5, 40))])
    run.model.eval()
    loaded, _ = load_for_inference(ModelConfig(path=str(tiny_model_dir), dtype="float32"), str(out / "final_model"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, run.model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_dynamic_sampling_trains_only_groups_whose_rewards_differ_counts_them_and_skips_a_step_with_none(
        tiny_model_dir, tmp_path, monkeypatch):
    """Two groups a step, grpo.max_resample=1. A rigged reward decides once per question whether its completions
    score alike (all 0) or differ (1, 0): in step 1 one of the step's questions differs, the other not, so one further
    question is drawn, and differs; step 2's questions are all alike, the extra one too, so the step is skipped. The
    counts logged match the groups the reward saw; the loss sees only completions of differing groups; step 2 leaves
    the adapter as step 1 left it (AdamW's momentum would otherwise move it)."""
    from lawtune.train import grpo as grpo_module
    from lawtune.train.grpo import fit, setup

    verdict: dict[str, bool] = {}  # question -> its rewards differ
    calls: list[tuple[int, list[str]]] = []  # (step, the questions of one scoring call)

    def rigged(prompts, completions, id, trainer_state, **_):  # noqa: A002 (TRL passes the dataset's columns)
        step = trainer_state.global_step
        first_call = not calls or calls[-1][0] != step
        calls.append((step, list(dict.fromkeys(id))))
        for k, qid in enumerate(calls[-1][1]):
            verdict.setdefault(qid, step == 0 and (k == 0 or not first_call))
        return [float(verdict[qid] and i % 2 == 0) for i, qid in enumerate(id)]

    monkeypatch.setattr(grpo_module, "reward_functions", lambda cfg: ([rigged], [1.0]))
    out = tmp_path / "run"
    run = setup(_tiny_config(tiny_model_dir, out, "grpo.max_steps=2", "grpo.eval_steps=0", "grpo.save_steps=1",
                             "grpo.dynamic_sampling=true", "grpo.max_resample=1", "grpo.max_completion_length=2",
                             "grpo.eval_max_new_tokens=2"))
    trained = []
    compute_loss = run.trainer.compute_loss

    def recording(model, inputs, *args, **kwargs):
        trained.append({k: inputs[k].detach().clone() for k in ("advantages", "completion_mask")})
        return compute_loss(model, inputs, *args, **kwargs)

    monkeypatch.setattr(run.trainer, "compute_loss", recording)
    fit(run)

    steps = _step_rows(out)
    assert len(steps) == 2 and len(trained) == 2
    for row, step, batch in zip(steps, range(2), trained):
        seen = [q for s, qs in calls if s == step for q in qs]
        differ = sum(verdict[q] for q in seen)
        assert (row["groups/sampled"], row["groups/kept"], row["groups/resampled"]) == (
            len(seen), min(2, differ), len(seen) - 2), (step, row, calls)
        in_loss = batch["completion_mask"].sum(dim=1) > 0
        assert len(in_loss) == 4 and int(in_loss.sum()) == 2 * row["groups/kept"]
        assert bool((batch["advantages"][in_loss] != 0).all()), batch
    assert [(r["groups/sampled"], r["groups/kept"], r["groups/resampled"]) for r in steps] == [(3, 2, 1), (3, 0, 1)]
    assert steps[0]["grad_norm"] > 0 and steps[1]["grad_norm"] == 0
    step1 = load_file(str(out / "checkpoint-1" / "adapter_model.safetensors"))
    final = load_file(str(out / "final_model" / "adapter_model.safetensors"))
    assert step1.keys() == final.keys() and all(torch.equal(step1[k], final[k]) for k in final)


def test_dynamic_sampling_deals_the_kept_groups_out_evenly_across_ranks_in_the_order_of_one_process():
    """The verdicts of two scoring calls on two ranks (TRL's gathered order: rank 0's groups, then rank 1's): the
    step's own 2 + 2 groups, of which rank 1's teach nothing, then one extra group a rank. The first 4 informative
    groups in one process's order are kept, 2 to each rank: rank 1 trains rank 0's extra group and its own. One
    process keeps its informative groups first and fills up with the others."""
    from lawtune.train.grpo import deal_groups

    verdicts = [torch.tensor([True, True, False, False]), torch.tensor([True, True])]
    plan, kept = deal_groups(verdicts, ranks=2, wanted=4)
    assert kept == 4 and plan == [[(0, 0, True), (0, 1, True)], [(0, 2, True), (1, 2, True)]]
    plan, kept = deal_groups([torch.tensor([False, True, False])], ranks=1, wanted=3)
    assert kept == 1 and plan == [[(0, 1, True), (0, 0, False), (0, 2, False)]]
    plan, kept = deal_groups([torch.tensor([False, False]), torch.tensor([False, True])], ranks=2, wanted=2)
    assert kept == 1 and plan == [[(1, 1, True)], [(0, 0, False)]]


def test_a_group_split_between_processes_is_refused_by_the_config_and_by_the_rollout():
    """A group split between processes would have each rank draw its samples 0, 1, ...: the same "different"
    completions twice. lawtune's config makes a rank's batch whole groups (TRL's sampler gives each rank a
    consecutive share of the step's), whatever the number of processes; the rollout checks that it got them."""
    from types import SimpleNamespace

    from lawtune.train.grpo import EngineRollout

    with pytest.raises(ConfigError, match=r"^grpo.per_device_batch_size: 3 x gradient_accumulation_steps 1 are not "
                                          r"whole groups of num_generations=2$"):
        load_config(None, ["model.path=m", "data.train=d.json", "grpo.num_generations=2",
                           "grpo.per_device_batch_size=3", "grpo.gradient_accumulation_steps=1"], run_cls=GrpoRun)
    cfg = load_config(None, ["model.path=m", "data.train=d.json", "grpo.num_generations=2"], run_cls=GrpoRun)
    rollout = EngineRollout(cfg, tokenizer=None, ids_by_prompt={}, engines=None)
    for prompts in (["a", "a", "b"], ["a", "b", "b", "c"]):
        with pytest.raises(RuntimeError, match="not whole groups of grpo.num_generations=2"):
            rollout(prompts, SimpleNamespace(num_generations=2))


@pytest.mark.parametrize("variable, name", [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")])
def test_grpo_under_fsdp_or_deepspeed_is_refused_in_one_line(variable, name, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(variable, "true")  # what `accelerate launch` sets for such a config
    assert main(["grpo", "--model", "m", "--data", "d.json", "--output-dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"grpo runs under DDP only, not {name}" in err
    assert not (tmp_path / "x").exists()


def test_dynamic_sampling_draws_further_questions_reproducibly_and_not_twice_in_a_step():
    from datasets import Dataset

    from lawtune.train.grpo import DynamicSampling

    data = Dataset.from_list([{"id": f"q{i}"} for i in range(10)])
    draw = DynamicSampling(max_resample=None, seed=7).draw
    first = draw(data, {"q0", "q1"}, 3, 0, 4)
    assert first == draw(data, {"q0", "q1"}, 3, 0, 4) and len(set(first)) == 4
    assert not {0, 1} & set(first)
    assert {tuple(draw(data, set(), step, 0, 4)) for step in range(5)} != {tuple(first)}  # the step seeds it
    assert sorted(draw(data, {f"q{i}" for i in range(8)}, 3, 0, 4)) == [8, 9]  # fewer left than asked
    assert len(draw(data, {f"q{i}" for i in range(10)}, 3, 0, 4)) == 4  # all used: any again


def test_scored_batches_join_with_prompts_padded_left_and_completions_right():
    from lawtune.train.grpo import concat_batches

    a = {"prompt_ids": torch.tensor([[5, 6]]), "prompt_mask": torch.tensor([[1, 1]]),
         "completion_ids": torch.tensor([[7]]), "completion_mask": torch.tensor([[1]]),
         "advantages": torch.tensor([0.5]), "num_items_in_batch": torch.tensor(1)}
    b = {"prompt_ids": torch.tensor([[4, 5, 6]]), "prompt_mask": torch.tensor([[1, 1, 1]]),
         "completion_ids": torch.tensor([[7, 8]]), "completion_mask": torch.tensor([[1, 1]]),
         "advantages": torch.tensor([-0.5]), "num_items_in_batch": torch.tensor(2)}
    joined = concat_batches([a, b], pad_id=0)
    assert joined["prompt_ids"].tolist() == [[0, 5, 6], [4, 5, 6]] and joined["prompt_mask"].tolist() == [[0, 1, 1],
                                                                                                           [1, 1, 1]]
    assert joined["completion_ids"].tolist() == [[7, 0], [7, 8]]
    assert joined["completion_mask"].tolist() == [[1, 0], [1, 1]] and joined["advantages"].tolist() == [0.5, -0.5]


# ----------------------------------------------------------------------------- the packed training pass (grpo.packed)

# A micro-batch of uneven rows: prompt lengths (left-padded), completion lengths (right-padded) and whether the
# completion ends with the end token; the rows of full length without it are cut (TRL's "truncated").
PROMPTS = [3, 9, 5, 7, 4, 6]
COMPLETIONS = [2, 7, 7, 4, 7, 1]
ENDED = [True, False, True, True, False, True]


def _lawtune_trainer(tokenizer, out, device: str = "cpu", attn: str = "sdpa"):
    """lawtune's GRPO trainer on a tiny LoRA model (B matrices non-zero), built as setup builds it; the tests set
    the loss settings TRL reads per call on it."""
    from datasets import Dataset

    from lawtune.train.grpo import grpo_arguments, trainer_class

    from conftest import lora_tiny_model

    cfg = load_config(None, ["model.path=m", "data.train=d.json", f"grpo.per_device_batch_size={len(PROMPTS)}",
                             "grpo.num_generations=2", f"grpo.max_completion_length={max(COMPLETIONS)}",
                             "grpo.temperature=0.7", "grpo.gradient_checkpointing=false", "grpo.report_to=[none]"],
                      run_cls=GrpoRun)
    args = grpo_arguments(cfg, out, torch.float32, torch.device(device), [1.0])
    trainer = trainer_class()(model=lora_tiny_model(tokenizer, attn), reward_funcs=[random01], args=args,
                              train_dataset=Dataset.from_list([{"prompt": "x"}] * 4), processing_class=tokenizer)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 2  # as the Trainer sets it in a step: the loss is scaled for it
    return trainer


@pytest.fixture(scope="module")
def packed_trainer(tiny_tokenizer, tmp_path_factory):
    return _lawtune_trainer(tiny_tokenizer, tmp_path_factory.mktemp("packed"))


def _micro_batch(trainer, mask_truncated: bool, beta: float) -> dict:
    """The inputs TRL's compute_loss takes for the rows above: padded ids and masks, advantages, and old and
    reference log-probabilities off the current ones (so ratios clip on both sides and the KL is not 0)."""
    from trl import GRPOTrainer

    g = torch.Generator().manual_seed(0)
    tokenizer = trainer.processing_class
    eos, pad, vocab = tokenizer.eos_token_id, tokenizer.pad_token_id, trainer.model.config.vocab_size
    width, length = max(PROMPTS), max(COMPLETIONS)
    prompt_ids = torch.full((len(PROMPTS), width), pad)
    completion_ids = torch.full((len(PROMPTS), length), pad)
    prompt_mask = torch.zeros_like(prompt_ids)
    completion_mask = torch.zeros_like(completion_ids)
    for row, (p, c, ended) in enumerate(zip(PROMPTS, COMPLETIONS, ENDED)):
        prompt_ids[row, width - p:] = torch.randint(5, vocab, (p,), generator=g)
        prompt_mask[row, width - p:] = 1
        completion_ids[row, :c] = torch.randint(5, vocab, (c,), generator=g)
        if ended:
            completion_ids[row, c - 1] = eos
        completion_mask[row, :c] = 1
    if mask_truncated:  # what TRL's _generate_and_score_completions does with mask_truncated_completions
        completion_mask = completion_mask * ~torch.tensor([not e for e in ENDED]).unsqueeze(1)
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": torch.randn(len(PROMPTS), generator=g),
              "num_items_in_batch": completion_mask.sum() * 3}
    inputs = {k: v.to(trainer.accelerator.device) for k, v in inputs.items()}
    with torch.no_grad():
        current, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(
            trainer, trainer.model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1), length)
    g = torch.Generator(current.device).manual_seed(1)
    inputs["old_per_token_logps"] = current + 0.3 * torch.randn(current.shape, generator=g, device=current.device)
    if beta:
        inputs["ref_per_token_logps"] = current + 0.5 * torch.randn(current.shape, generator=g, device=current.device)
    return inputs


def test_rows_as_long_as_the_longest_sequence_hold_each_sequence_whole_and_apart():
    from lawtune.train.grpo import pack_rows

    lengths = [9, 3, 5, 7, 1, 6, 4, 9, 2]
    rows, offsets, n = pack_rows(lengths, max(lengths))
    cells = [(r, o + k) for r, o, length in zip(rows, offsets, lengths) for k in range(length)]
    assert len(set(cells)) == sum(lengths) and all(0 <= c < max(lengths) for _, c in cells)
    assert n == -(-sum(lengths) // max(lengths)) == len(set(rows))  # these lengths fit without a spare row
    assert pack_rows(lengths, sum(lengths))[2] == 1


def _loss_and_grads(trainer, inputs, packed: bool):
    trainer.packed = packed
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.model.zero_grad()
    return loss.detach(), grads


@pytest.mark.parametrize("one_row", [True, False])
@pytest.mark.parametrize("weights", ["policy", "adapter off", "ref adapter"])
def test_packed_log_probabilities_equal_trls_padded_ones_and_each_sequence_alone(packed_trainer, weights, one_row):
    """Packed rows (a micro-batch in one row, as under flex attention, or rows as long as its longest sequence, as
    under sdpa) give TRL's padded log-probabilities and entropies, of the policy and of either reference TRL takes (a
    fresh LoRA's: the adapter off; a continued one's: its starting copy, the adapter "ref"), and each sequence's
    equal those of the sequence run alone: no token attends across sequences."""
    import contextlib

    from trl import GRPOTrainer
    from trl.trainer.utils import use_adapter

    from lawtune.train.grpo import packed_logps

    trainer, inputs = packed_trainer, _micro_batch(packed_trainer, mask_truncated=False, beta=0.0)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    length = inputs["completion_ids"].size(1)
    model = trainer.model
    with torch.no_grad():
        policy, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(trainer, model, ids, mask, length)
    if weights == "ref adapter":
        model.add_adapter("ref", model.peft_config["default"])
        torch.manual_seed(1)
        for name, p in model.named_parameters():
            if ".ref." in name:
                torch.nn.init.normal_(p, std=0.05)
    using = {"policy": contextlib.nullcontext, "adapter off": model.disable_adapter,
             "ref adapter": lambda: use_adapter(model, "ref")}[weights]
    try:
        with torch.no_grad(), using():
            trainer.packed, trainer.one_row = True, one_row
            packed, packed_entropy, _ = trainer._get_per_token_logps_and_entropies(
                trainer.model, ids, mask, length, batch_size=4, compute_entropy=True)
            padded, padded_entropy, _ = GRPOTrainer._get_per_token_logps_and_entropies(
                trainer, trainer.model, ids, mask, length, compute_entropy=True)
            alone = [packed_logps(trainer.model, ids[r:r + 1], mask[r:r + 1], length, entropy=False, one_row=True)[0]
                     for r in range(len(ids))]
    finally:
        trainer.one_row = None
        if weights == "ref adapter":
            model.delete_adapter("ref")
            model.set_adapter("default")
    assert packed.shape == padded.shape == (len(PROMPTS), length)
    assert (packed[inputs["completion_mask"] == 0] == 0).all()
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed_entropy, padded_entropy, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed, torch.cat(alone), atol=1e-5, rtol=1e-5)
    assert packed.abs().sum() > 0
    if weights != "policy":  # the reference's weights were the ones used
        assert not torch.allclose(packed, policy, atol=1e-3)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("mask_truncated", [False, True])
@pytest.mark.parametrize("loss_type", GrpoRun.model_fields["grpo"].annotation.model_fields["loss_type"]
                         .annotation.__args__)
def test_the_packed_pass_has_trls_loss_and_lora_gradients(packed_trainer, loss_type, mask_truncated, level):
    """TRL's own compute_loss on its padded rows is the reference (grpo.packed=false): the packed pass, in either
    layout, gives its loss and LoRA gradients for every loss_type lawtune offers, overlong filtering on and off,
    token- and sequence-level ratios, with clipping and a KL term."""
    trainer = packed_trainer
    trainer.loss_type, trainer.importance_sampling_level, trainer.beta = loss_type, level, 0.04
    inputs = _micro_batch(trainer, mask_truncated, beta=trainer.beta)
    padded_loss, padded_grads = _loss_and_grads(trainer, inputs, packed=False)
    assert padded_loss != 0 and sum(g.abs().sum() for g in padded_grads.values()) > 0
    for one_row in (True, False):
        trainer.one_row = one_row
        try:
            packed_loss, packed_grads = _loss_and_grads(trainer, inputs, packed=True)
        finally:
            trainer.one_row = None
        torch.testing.assert_close(packed_loss, padded_loss, atol=1e-6, rtol=1e-5)
        assert packed_grads.keys() == padded_grads.keys() and any("lora_A" in n for n in packed_grads)
        for name, grad in padded_grads.items():
            torch.testing.assert_close(packed_grads[name], grad, atol=1e-6, rtol=1e-4, msg=f"{name} {one_row=}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex attention trains only on a GPU")
@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_the_flex_packed_pass_has_trls_padded_sdpa_loss_and_gradients_on_gpu(tiny_tokenizer, tmp_path, loss_type):
    """On a GPU, as the grpo yaml runs it: one packed row under flex attention's document mask (and TRL's fused
    head on its Triton path, the completion positions only) against TRL's padded pass under sdpa."""
    from lawtune.compat import set_attn_implementation
    from lawtune.train.kernels import install_packed_block_mask

    trainer = _lawtune_trainer(tiny_tokenizer, tmp_path, device="cuda", attn="flex_attention")
    install_packed_block_mask(trainer.model)
    trainer.loss_type, trainer.beta = loss_type, 0.04
    config = trainer.model.config
    set_attn_implementation(config, "sdpa")
    inputs = _micro_batch(trainer, mask_truncated=False, beta=trainer.beta)
    padded_loss, padded_grads = _loss_and_grads(trainer, inputs, packed=False)
    set_attn_implementation(config, "flex_attention")
    packed_loss, packed_grads = _loss_and_grads(trainer, inputs, packed=True)
    assert padded_loss != 0
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-5, rtol=1e-4)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-5, rtol=1e-3, msg=name)


def test_a_packed_run_logs_what_a_padded_run_logs(tiny_model_dir, tmp_path, monkeypatch):
    """grpo.packed on and off, a fresh LoRA with a KL term (its reference: the base, the adapter off): the same
    metrics.jsonl keys, and the first step (same rollouts, same weights) logs the same loss, entropy and gradient."""
    from lawtune.train import grpo as grpo_module
    from lawtune.train.grpo import fit, setup

    monkeypatch.setattr(grpo_module, "reward_functions", lambda cfg: ([_alternating], [1.0]))
    steps = {}
    for packed in (True, False):
        out = tmp_path / f"packed-{packed}"
        run = setup(_tiny_config(tiny_model_dir, out, "grpo.max_steps=2", "grpo.eval_steps=0", "grpo.beta=0.1",
                                 f"grpo.packed={str(packed).lower()}"))
        assert run.trainer.packed is packed
        fit(run)
        steps[packed] = _step_rows(out)
        assert len(steps[packed]) == 2 and steps[packed][1]["kl"] > 0, steps[packed]
    assert [set(row) for row in steps[True]] == [set(row) for row in steps[False]]
    assert {"kl", "entropy", "clip_ratio/region_mean", "clip_ratio/low_min", "clip_ratio/high_max",
            "completions/mean_length", "rewards/_alternating/mean"} <= set(steps[True][0])
    first, reference = steps[True][0], steps[False][0]
    for key in ("loss", "entropy", "grad_norm", "kl", "reward", "completions/mean_length"):
        assert first[key] == pytest.approx(reference[key], rel=1e-4, abs=1e-6), key
