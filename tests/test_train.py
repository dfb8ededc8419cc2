import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lawtune.config import load_config
from lawtune.train import fit, setup, train


def _adapter(path):
    return load_file(str(path / "adapter_model.safetensors"))


def test_training_changes_exactly_the_lora_parameters_and_writes_a_complete_run(tiny_config, tmp_path):
    cfg = tiny_config("train.eval_steps=2", "train.report_to=[tensorboard]")
    parts = setup(cfg)
    model = parts.model
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert sum(1 for n in trainable if "lora_A" in n) == 7 * 2  # seven projections in each of two layers
    result = fit(parts)
    after = dict(model.named_parameters())
    unchanged = [n for n, before in trainable.items() if torch.equal(before, after[n].detach())]
    assert not unchanged, f"LoRA parameters that did not change: {unchanged[:3]}"
    assert all(torch.equal(before, after[n].detach()) for n, before in frozen.items())
    assert result.steps == 4

    out = tmp_path / "run"
    final = out / "final_model"
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer_config.json", "lawtune_config.yaml",
                 "data_manifest.json"):
        assert (final / name).is_file(), name
    assert (out / "best_model" / "adapter_model.safetensors").is_file()
    assert (out / "curves.png").stat().st_size > 1000
    assert list((out / "runs").rglob("events.out.tfevents*")), "no TensorBoard events"
    saved = load_config(final / "lawtune_config.yaml")
    assert saved.train.max_steps == 4 and saved.model.path == cfg.model.path
    manifest = json.loads((final / "data_manifest.json").read_text(encoding="utf-8"))
    split = manifest["split"]
    train_lines = (out / "data" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    eval_lines = (out / "data" / "eval.jsonl").read_text(encoding="utf-8").splitlines()
    assert (len(train_lines), len(eval_lines)) == (split["train"], split["eval"]) and split["eval"] > 0
    assert len(manifest["files"][0]["sha256"]) == 64 and manifest["prompt"]["format"] == "chat"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert all(r["tokens_per_s"] > 0 for r in rows if "loss" in r)
    assert [r["step"] for r in rows if "eval_accuracy" in r] == [2, 4]
    assert not list(out.glob(".final_model*")), "temporary directories left behind"

    # The adapter reloads with plain peft and generates.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, final)
    tok = AutoTokenizer.from_pretrained(final)
    ids = tok("甲乙", return_tensors="pt", add_special_tokens=False)
    generated = reloaded.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert generated.shape[1] > ids["input_ids"].shape[1]
    state = _adapter(final)
    live = {n.replace(".default", ""): p for n, p in model.named_parameters() if p.requires_grad}
    assert set(state) == set(live) and all(torch.equal(state[k], live[k].detach().cpu()) for k in state)


def _crash_in_step_three(cfg):
    """Set up a run and crash it in step 3, after checkpoint-2 was written; returns what setup built."""
    from transformers import TrainerCallback

    class CrashInStepThree(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise KeyboardInterrupt

    parts = setup(cfg)
    parts.trainer.add_callback(CrashInStepThree())
    try:
        fit(parts)
    except KeyboardInterrupt:
        pass
    return parts


@pytest.mark.parametrize("init", ["default", "pissa"])
def test_resume_after_interruption_reaches_the_same_adapter(init, tiny_config, tmp_path):
    """pissa too: the resumed session takes the start out of the base again, and converts against the first
    session's starting adapters."""
    straight = train(tiny_config(f"train.output_dir={tmp_path / 'a'}", "train.max_steps=4", f"lora.init={init}"))

    cfg = tiny_config(f"train.output_dir={tmp_path / 'b'}", "train.max_steps=4", f"lora.init={init}")
    _crash_in_step_three(cfg)
    assert (tmp_path / "b" / "checkpoint-2").is_dir() and not (tmp_path / "b" / "final_model").exists()
    resumed = train(cfg, resume=True)
    assert resumed.steps == straight.steps == 4
    a, b = _adapter(tmp_path / "a" / "final_model"), _adapter(tmp_path / "b" / "final_model")
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    first = _adapter(tmp_path / "b" / "checkpoint-2")
    assert any(not torch.equal(first[k], b[k]) for k in b), "resume did not train past the checkpoint"


def test_separate_eval_file_removes_overlapping_statements(tiny_config, tmp_path):
    from lawtune.data import load_records
    from lawtune.demo import demo_data_path

    from conftest import write_jsonl

    records = [r.to_json() for r in load_records(demo_data_path()).records]
    eval_file = write_jsonl(tmp_path / "dev.json", records[:5])
    cfg = tiny_config(f"data.eval={eval_file}", "train.max_steps=1", "train.save_steps=1")
    result = train(cfg)
    manifest = json.loads((tmp_path / "run" / "final_model" / "data_manifest.json").read_text(encoding="utf-8"))
    assert manifest["dropped_train_overlapping_eval"] == 5
    assert manifest["split"] == {"train": len(records) - 5, "eval": 5}
    assert result.eval_history[-1]["eval_n"] == 5
    saved = yaml.safe_load((tmp_path / "run" / "final_model" / "lawtune_config.yaml").read_text(encoding="utf-8"))
    assert saved["data"]["eval"] == str(eval_file)


def test_the_gpu_default_config_falls_back_cleanly_on_cpu(tiny_model_dir, tmp_path, caplog):
    """configs/deepseek-r1-distill-qwen-1.5b_lora.yaml (flex attention, compile, packing) still trains on a CPU."""
    from pathlib import Path

    from lawtune.demo import demo_data_path

    config = Path(__file__).resolve().parents[1] / "configs" / "deepseek-r1-distill-qwen-1.5b_lora.yaml"
    cfg = load_config(config, [f"model.path={tiny_model_dir}", f"data.train={demo_data_path()}", "train.max_steps=2",
                               f"train.output_dir={tmp_path / 'out'}", "train.report_to=[none]", "data.eval_fraction=0"])
    assert cfg.model.attn_implementation == "flex_attention" and cfg.train.compile and cfg.train.packing
    with caplog.at_level("WARNING", logger="lawtune"):
        result = train(cfg)
    assert result.steps == 2 and result.final_loss > 0
    assert "flex_attention cannot train on the CPU" in caplog.text
    saved = load_config(tmp_path / "out" / "final_model" / "lawtune_config.yaml")
    assert saved.model.attn_implementation == "sdpa" and not saved.train.compile  # what actually ran


@pytest.mark.parametrize("overrides,said", [
    (["model.attn_implementation=flex_attention"], "(flex attention)"),
    (["train.compile=true"], "(train.compile)"),
    (["model.attn_implementation=flex_attention", "train.compile=true"], "(flex attention, train.compile)"),
    ([], None)])
def test_a_gpu_run_that_compiles_says_its_first_step_will_take_minutes(tiny_model_dir, tmp_path, monkeypatch, caplog,
                                                                        overrides, said):
    """The first step under flex attention or compiled layers sits at step 0 for minutes (354-393 s for grpo's
    yaml on an H200): the run says so before it starts, and only then."""
    from lawtune.train import common

    monkeypatch.setattr(common, "resolve_device", lambda model: torch.device("cuda"))  # no CUDA call follows
    cfg = load_config(None, [f"model.path={tiny_model_dir}", "model.dtype=bfloat16", "train.compile=false",
                             f"train.output_dir={tmp_path / 'out'}", *overrides])
    with caplog.at_level("INFO", logger="lawtune"):
        common.start_run(cfg, "train", resume=False, overwrite=False)
    lines = [r.getMessage() for r in caplog.records if "first step compiles" in r.getMessage()]
    if said is None:
        assert lines == []
    else:
        assert len(lines) == 1 and said in lines[0], lines


def test_gpu_batches_are_copied_without_blocking_and_buffers_not_broadcast(tiny_config, tmp_path):
    """A blocking host-to-GPU copy syncs the CPU with the GPU at every step (a barrier per step under DDP)."""
    import torch

    from lawtune.train.sft import training_arguments

    gpu = training_arguments(tiny_config(), tmp_path, torch.float32, torch.device("cuda"))
    assert gpu.dataloader_pin_memory and gpu.accelerator_config.non_blocking
    assert gpu.ddp_broadcast_buffers is False
    cpu = training_arguments(tiny_config(), tmp_path, torch.float32, torch.device("cpu"))
    assert not cpu.dataloader_pin_memory and not cpu.accelerator_config.non_blocking


def _count_on_rank(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    from lawtune.train.callbacks import MetricsCallback
    from lawtune.train.collate import CountingCollator

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        counter = CountingCollator(lambda items: items)
        counter.tokens = 100 * (rank + 1)  # the ranks' micro-batches differ in real tokens
        seen = MetricsCallback(Path(out) / "metrics.jsonl", append=False, counter=counter).seen(None)
        (Path(out) / f"seen-{rank}").write_text(str(seen))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # spawns two processes (gloo)
def test_tokens_seen_sums_the_ranks_counts(tmp_path):
    """With a token budget each rank counts its own tokens on the CPU; metrics.jsonl gets their sum, not an
    estimate from rank 0's count (the multi-GPU tokens/s is computed from it)."""
    import torch.multiprocessing as mp

    mp.spawn(_count_on_rank, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    assert [int((tmp_path / f"seen-{r}").read_text()) for r in (0, 1)] == [300, 300]


def test_in_training_evaluation_leaves_the_training_batches_padded_as_before(tiny_config):
    """Evaluation pads its prompts on the left; the training collator shares the tokenizer and must keep padding
    on the right after every in-training evaluation (it pads through tokenizer.padding_side)."""
    run = setup(tiny_config("train.eval_steps=1", "train.max_steps=3", "train.per_device_batch_size=4",
                            "train.gradient_accumulation_steps=2", "data.eval_max_samples=4"))
    masks = []
    collate = run.trainer.data_collator

    def recording(items):
        batch = collate(items)
        masks.append(batch["attention_mask"].clone())
        return batch

    run.trainer.data_collator = recording
    fit(run)
    assert len(run.held_out.history) == 3 and len(masks) >= 6
    padded = [m for m in masks if not bool(m.all())]
    assert padded, "no micro-batch needed padding: the test would prove nothing"
    for mask in masks:  # right padding: ones, then only zeros, in every row
        assert torch.equal(mask, mask.sort(dim=1, descending=True).values)


@pytest.mark.slow  # three training runs through the CLI
def test_a_folder_holding_a_run_is_continued_only_by_that_run_and_replaced_only_on_request(tiny_model_dir, tmp_path,
                                                                                              capsys):
    from lawtune.cli import main
    from lawtune.demo import demo_data_path

    config = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    out = tmp_path / "X"
    common = [str(config), "--model", str(tiny_model_dir), "--data", str(demo_data_path()), "--output-dir", str(out),
              "train.save_steps=2", "train.eval_steps=0", "train.report_to=[none]", "train.optim=adamw_torch",
              "train.warmup_steps=0"]
    assert main(["train", *common, "train.max_steps=4"]) == 0
    assert (out / "checkpoint-4").is_dir()
    capsys.readouterr()
    # a fresh run into it is refused before anything is written
    assert main(["train", *common, "train.max_steps=2", "data.max_samples=30"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--resume" in err and "--overwrite" in err and len(err.splitlines()) == 1
    # --resume by a run that would train other weights (another LoRA rank) is refused and says what differs
    assert main(["train", *common, "train.max_steps=6", "lora.r=4", "--resume"]) == 2
    assert "lora.r" in capsys.readouterr().err
    # --overwrite starts over: the old run's checkpoints are gone
    assert main(["train", *common, "train.max_steps=2", "data.max_samples=30", "--overwrite"]) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    manifest = json.loads((out / "final_model" / "data_manifest.json").read_text(encoding="utf-8"))
    assert manifest["files"][0]["records"] == 30
    saved = yaml.safe_load((out / "final_model" / "lawtune_config.yaml").read_text(encoding="utf-8"))
    assert saved["train"]["output_dir"] == str(out)  # the run records the folder it used


def test_half_precision_on_a_cpu_trains_in_float32_with_a_warning(tiny_config, caplog):
    with caplog.at_level("WARNING", logger="lawtune"):
        run = setup(tiny_config("model.dtype=float16", "train.warmup_steps=3"))
    assert run.cfg.model.dtype == "float32" and next(run.model.parameters()).dtype == torch.float32
    assert "many times slower than float32" in caplog.text
    assert "warmup_steps=3 is half or more of train.max_steps=4" in caplog.text


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.mark.slow  # a straight run, a crashed run and its resumption
def test_a_resumed_run_counts_tokens_from_where_it_stopped_and_examples_per_second_counts_examples(tiny_config, tmp_path):
    """With a token budget (the GPU configs) tokens are counted on the CPU; a resumed run must go on from the
    checkpoint's count, and a packed micro-batch of many examples is not one sample."""
    packed = ("train.batch_tokens=1024", "train.packing=true", "train.max_steps=4", "train.save_steps=2")
    straight = tmp_path / "a"
    train(tiny_config(f"train.output_dir={straight}", *packed))

    cfg = tiny_config(f"train.output_dir={tmp_path / 'b'}", *packed)
    parts = _crash_in_step_three(cfg)
    train(cfg, resume=True)
    a, b = _metrics(straight), _metrics(tmp_path / "b")
    seen_a = {r["step"]: r["tokens_seen"] for r in a if "tokens_seen" in r}
    seen_b = {r["step"]: r["tokens_seen"] for r in b if "tokens_seen" in r}
    assert seen_a[4] > seen_a[2] > 0
    assert seen_b[4] == seen_a[4]  # the resumed run's count goes on from checkpoint-2's
    end = next(r for r in a if "train_samples_per_second" in r)
    rows = 4 * parts.trainer.args.gradient_accumulation_steps  # packed micro-batches in 4 steps
    examples = parts.n_train / len(parts.trainer.train_dataset) * rows  # examples in them, on average
    assert examples > 3 * rows  # else the test could not tell the two apart
    assert abs(end["train_samples_per_second"] * end["train_runtime"] - examples) < 0.3 * examples


# ----------------------------------------------------------------------------- a finished run, a preempted run


def test_resume_of_a_finished_run_writes_nothing_and_a_larger_max_steps_goes_on(tiny_config, tmp_path, capsys):
    from lawtune.commands import run

    from conftest import assert_same_adapter, file_states

    out = tmp_path / "run"
    two = tiny_config("train.max_steps=2", "train.save_steps=2")
    assert run("train", two) == 0
    before = file_states(out)
    capsys.readouterr()
    assert run("train", two, resume=True) == 0
    assert capsys.readouterr().out.startswith("already at step 2 of 2: nothing to do")
    assert file_states(out) == before  # no checkpoint, no final model, no metrics row, not even lawtune_run.json

    # A run that stopped after its last checkpoint, before its final model was written: only that is left to do.
    metrics = (out / "metrics.jsonl").read_text(encoding="utf-8")
    shutil.rmtree(out / "final_model")
    assert run("train", two, resume=True) == 0
    last_loss = [r["loss"] for r in _metrics(out) if "loss" in r][-1]
    assert capsys.readouterr().out.startswith(f"done: 2 steps, final loss {last_loss:.4f}")
    assert_same_adapter(out / "final_model", out / "checkpoint-2")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert (out / "metrics.jsonl").read_text(encoding="utf-8") == metrics  # the evaluation at step 2 is not redone

    assert run("train", tiny_config("train.max_steps=3", "train.save_steps=2"), resume=True) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("done: 3 steps")
    rows = _metrics(out)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3] and [r["step"] for r in rows if "eval_accuracy" in r] == [2, 3]
    assert run("train", two, resume=True) == 0
    assert capsys.readouterr().out.startswith("already at step 3 (past train.max_steps=2): nothing to do")


def _demo_args(config, out, *extra):
    return ["train", str(config), "--output-dir", str(out), *extra]


@pytest.mark.parametrize("when", ["setup", "first step"])
def test_sigterm_before_the_first_step_ends_exits_143_without_a_checkpoint(when, tiny_model_dir, tmp_path, monkeypatch,
                                                                           capsys):
    from lawtune.cli import main
    from lawtune.train import sft

    from conftest import ddp_demo_config, term_at_step

    if when == "setup":
        real = sft.prepare_data

        def prepare_data(*args, **kwargs):
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None)
            os.kill(os.getpid(), signal.SIGTERM)
            return real(*args, **kwargs)

        monkeypatch.setattr(sft, "prepare_data", prepare_data)
    else:
        real_setup = sft.setup

        def setup(*args, **kwargs):
            run = real_setup(*args, **kwargs)
            run.trainer.add_callback(term_at_step(1))
            return run

        monkeypatch.setattr(sft, "setup", setup)
    config = ddp_demo_config(tmp_path / "run.yaml", tiny_model_dir, tmp_path / "run")
    handler = signal.getsignal(signal.SIGTERM)
    assert main(_demo_args(config, tmp_path / "run", "train.save_steps=1" if when == "setup" else "train.save_steps=2")) == 143
    assert capsys.readouterr().err.strip().splitlines()[-1] == ("preempted before the first step ended: no checkpoint "
                                                                "written; rerun with --resume")
    assert not list((tmp_path / "run").glob("checkpoint-*")) and not (tmp_path / "run" / "final_model").exists()
    assert signal.getsignal(signal.SIGTERM) is handler  # the previous handler is back


@pytest.mark.slow  # an uninterrupted run, a run preempted in a subprocess, its resumption
def test_sigterm_saves_the_step_exits_143_and_resume_reaches_the_uninterrupted_adapter(tiny_model_dir, tmp_path):
    """SIGTERM during step 2 of 4 (checkpoints every 3 steps, evaluations every 2): step 2 ends and is saved, its
    evaluation is left for the resumed run, the process exits 143; --resume ends where a run without the signal
    ends."""
    import subprocess
    import sys

    from lawtune.cli import main

    from conftest import assert_same_adapter, ddp_demo_config, launcher_env, preempting_script

    config = ddp_demo_config(tmp_path / "run.yaml", tiny_model_dir, tmp_path / "run")
    extra = ("train.save_steps=3", "train.gradient_accumulation_steps=1")
    assert main(_demo_args(config, tmp_path / "straight", *extra)) == 0

    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(preempting_script(tmp_path)), *_demo_args(config, out, *extra)],
                          capture_output=True, text=True, timeout=300, env={**launcher_env(), "TERM_AT_STEP": "2"})
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == "preempted at step 2; rerun with --resume"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"] and not (out / "final_model").exists()
    assert not [r for r in _metrics(out) if "eval_accuracy" in r]  # no time is spent on it after the signal

    assert main([*_demo_args(config, out, *extra), "--resume"]) == 0
    assert_same_adapter(out / "final_model", tmp_path / "straight" / "final_model")
    evals = lambda run: [(r["step"], r["eval_accuracy"]) for r in _metrics(run) if "eval_accuracy" in r]  # noqa: E731
    assert evals(out) == evals(tmp_path / "straight") and [s for s, _ in evals(out)] == [2, 4]
    assert [r["step"] for r in _metrics(out) if "loss" in r] == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- LoRA variants (lora.use_dora ...)

VARIANTS = {
    "dora": ["lora.use_dora=true"],
    "pissa": ["lora.init=pissa", "lora.r=4"],
    # rsLoRA's conversion scales alpha by sqrt(2), not 2
    "olora": ["lora.init=olora", "lora.use_rslora=true"],
    "modules_to_save": ["lora.modules_to_save=[lm_head,embed_tokens]", "train.sparse_logits=true"],
}


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_lora_variant_trains_and_its_final_model_loads_and_merges_exactly_on_the_original_base(
        variant, tiny_config, tmp_path):
    """What `train` saved, loaded by eval's loader on the original base and merged by `lawtune merge`, computes
    the logits of the model as trained (for pissa and olora: whose base weights were changed while training)."""
    from transformers import AutoModelForCausalLM

    from lawtune.config import MergeRun, ModelConfig
    from lawtune.merge import merge_adapter
    from lawtune.model import load_for_inference

    cfg = tiny_config("train.max_steps=2", "train.save_steps=10", *VARIANTS[variant])
    parts = setup(cfg)
    before = {n: p.detach().clone() for n, p in parts.model.named_parameters() if p.requires_grad}
    fit(parts)
    ids = torch.tensor([list(range(5, 40))])
    trained = _logits(parts.model, ids)
    final = tmp_path / "run" / "final_model"
    config = json.loads((final / "adapter_config.json").read_text(encoding="utf-8"))
    changed = [n for n, p in parts.model.named_parameters() if n in before and not torch.equal(p, before[n])]

    if variant == "dora":
        assert config["use_dora"] and any("lora_magnitude_vector" in k for k in _adapter(final))
        assert any("lora_magnitude_vector" in n for n in changed)
    if variant == "olora":
        assert config["use_rslora"] and config["lora_alpha"] == pytest.approx(cfg.lora.alpha * 2**0.5)
    if variant in ("pissa", "olora"):
        # saved as a plain LoRA of the original base: twice the rank, the starting adapters subtracted
        assert config["init_lora_weights"] is True and config["r"] == 2 * cfg.lora.r
        assert (tmp_path / "run" / "initial_adapter" / "adapter_config.json").is_file()
    if variant == "modules_to_save":
        assert sorted(config["modules_to_save"]) == ["embed_tokens", "lm_head"]
        assert {"base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.weight"} <= set(_adapter(final))
        # both trained, the head though sparse logits compute it at the answer positions alone
        assert any("lm_head" in n for n in changed) and any("embed_tokens" in n for n in changed)

    card = (final / "README.md").read_text(encoding="utf-8")
    assert {"dora": "; DoRA", "pissa": "; pissa init (saved converted", "olora": "; rsLoRA; olora init",
            "modules_to_save": "; trained in full: lm_head, embed_tokens"}[variant] in card

    base = ModelConfig(path=cfg.model.path, dtype="float32")
    loaded, _ = load_for_inference(base, str(final))  # eval's and serve's loader, with the adapter/base check
    torch.testing.assert_close(_logits(loaded, ids), trained, rtol=1e-4, atol=1e-4)
    untouched, _ = load_for_inference(base)
    assert not torch.allclose(_logits(untouched, ids), trained, atol=1e-3)  # the adapter matters

    merged_dir = tmp_path / "merged"
    merge_adapter(MergeRun.model_validate({"model": {"path": cfg.model.path}, "adapter": {"path": str(final)},
                                           "merge": {"output": str(merged_dir)}}), say=lambda _: None)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    torch.testing.assert_close(_logits(merged, ids), trained, rtol=1e-4, atol=1e-4)

    # eval's and serve's generation (the engine) through the adapter's layers writes what the merged model writes
    from lawtune.config import GenerationConfig
    from lawtune.generation import generate

    merged_model, tokenizer = load_for_inference(ModelConfig(path=str(merged_dir), dtype="float32"))
    prompts = ["甲乙丙丁", "以下说法"]
    assert ([g.text for g in generate(loaded, tokenizer, prompts, 8, GenerationConfig())]
            == [g.text for g in generate(merged_model, tokenizer, prompts, 8, GenerationConfig())])
