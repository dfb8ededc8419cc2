"""The GPU benchmarks run end to end in their CPU smoke modes, so they cannot rot between GPU runs."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"

pytestmark = pytest.mark.slow  # each runs a benchmark script end to end


def _run(script: str, *args: str) -> list[dict]:
    proc = subprocess.run([sys.executable, str(BENCH / script), "--smoke", *args], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{\"")]


def test_eval_bench_smoke():
    rows = {r["bench"]: r for r in _run("eval_throughput.py")}
    for name in ("env", "direct_bs8", "choice_bs8", "reasoning", "base_single", "base_batch64", "base_direct", "summary"):
        assert name in rows, name
    # random weights: every row runs to its budget of 12 tokens, the forced answer's included
    assert rows["reasoning"]["generated_tokens"] == 8 * 12
    assert rows["direct_bs8"]["questions"] == 24 and rows["summary"]["direct_s"] > 0


def test_train_bench_smoke():
    # every recipe, and --lora-variants' rows (which alone would leave the recipes out) in the same process
    rows = {r.get("recipe", r.get("bench")): r for r in _run(
        "train_throughput.py", "--lora-variants", "--recipes", "baseline,trl,lawtune,lawtune8,low_memory")}
    for name in ("baseline", "trl", "lawtune", "lawtune8", "low_memory"):
        assert rows[name]["tokens_per_s"] > 0, rows[name]
        assert rows[name]["tokens"] > 0 and 0 < rows[name]["mfu"] < 1
    assert rows["baseline"]["sequences_per_step"] == 8.0  # 2 x 4, as in the original recipe
    assert rows["lawtune"]["config"]["sparse_logits"] and rows["lawtune"]["config"]["packing"]
    assert rows["low_memory"]["config"]["gradient_checkpointing"]
    assert "ratio_to_baseline" in rows["lawtune"]
    # LoRA, DoRA and rsLoRA on lawtune's default config, compared with LoRA
    assert all(rows[name]["tokens_per_s"] > 0 for name in ("lora", "dora", "rslora"))
    assert [rows[name]["config"]["lora"]["use_dora"] for name in ("lora", "dora", "rslora")] == [False, True, False]
    assert rows["rslora"]["config"]["lora"]["use_rslora"] and not rows["lora"]["config"]["lora"]["use_rslora"]
    assert rows["dora"]["ratio_to_lora"] > 0 and "ratio_to_lora" not in rows["lora"]


def test_multi_gpu_bench_smoke():
    """One process and two (torchrun, gloo) run the real `lawtune train`; rates come from its metrics.jsonl. The
    two-process run is a --variant of ddp (its overrides and environment reach the run); the `independent` base
    (copies at once) is left to the GPU runs: it is one more launch of two processes here."""
    rows = {r["run"]: r for r in _run(
        "multi_gpu.py", "--steps", "4", "--warmup", "1", "--records", "200", "--runs", "single", "--variant",
        "ddp_half=ddp,train.batch_tokens=512,data.max_length=512,env:LAWTUNE_TEST_MARK=1")}
    assert set(rows) == {"single", "ddp_half"}
    assert rows["single"]["processes"] == 1 and rows["ddp_half"]["processes"] == 2
    assert all(r["tokens"] > 0 and r["tokens_per_s"] > 0 and r["steps_timed"] == 3 for r in rows.values())
    assert set(rows["ddp_half"]["ratio_to"]) == {"single"} and rows["ddp_half"]["ratio_to"]["single"] > 0
    assert [line.split(":")[0] for line in rows["ddp_half"]["gc"]] == ["rank 0", "rank 1"]  # both ranks' pauses, once
    assert len(rows["single"]["gc"]) == 1
    # the variant's override reached the run: two ranks at half the token budget train about what one process does
    # at the whole (without it, about twice as much)
    assert rows["ddp_half"]["tokens"] < 1.4 * rows["single"]["tokens"]


def test_profile_train_reports_the_window(tiny_model_dir, tmp_path):
    """bench/profile_train.py runs the real training command and prints one profile of the chosen steps."""
    from lawtune.demo import demo_data_path

    proc = subprocess.run(
        [sys.executable, str(BENCH / "profile_train.py"), "--window", "1:3", "--trace", str(tmp_path / "tr"), "configs/demo.yaml",
         f"model.path={tiny_model_dir}", f"data.train={demo_data_path()}", "model.dtype=float32", "train.max_steps=4",
         f"train.output_dir={tmp_path / 'run'}", "train.report_to=[none]", "data.eval_fraction=0", "train.eval_steps=0"],
        capture_output=True, text=True, timeout=300, cwd=BENCH.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("@@PROFILE ")]
    assert len(lines) == 1
    row = json.loads(lines[0].split(" ", 1)[1])
    assert row["steps"] == 2 and row["wall_s"] > 0 and row["top_cpu_self_ms"]
    with gzip.open(tmp_path / "tr" / "trace-rank0.json.gz", "rt") as fh:
        assert json.load(fh)["traceEvents"]


def test_allreduce_probe_reports_a_bandwidth():
    """bench/allreduce.py under torchrun (gloo on the CPU) prints one line from rank 0 with a time and a rate."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(BENCH / "allreduce.py"), "--numel", "1e5", "--repeat", "2"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 1 and rows[0]["world_size"] == 2 and rows[0]["bytes"] == 400_000
    assert rows[0]["median_ms"] > 0 and rows[0]["bus_gb_s"] > 0


def test_a_timed_out_launch_leaves_no_rank_running(tmp_path):
    """torchrun starts each rank in its own session: the benchmark's timeout must still stop them all, or a
    left-over rank keeps using the machine during the next measured run."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("multi_gpu", BENCH / "multi_gpu.py")
    multi_gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(multi_gpu)
    script = tmp_path / "sleeper.py"
    script.write_text("import os, pathlib, sys, time\n"
                      f"pathlib.Path({str(tmp_path)!r}, 'pid-' + os.environ['RANK']).write_text(str(os.getpid()))\n"
                      "time.sleep(300)\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    with pytest.raises(RuntimeError, match="timed out"):
        multi_gpu.run([(cmd, {**os.environ, "OMP_NUM_THREADS": "1"}, tmp_path / "log")], timeout=20)
    pids = [int((tmp_path / f"pid-{rank}").read_text()) for rank in (0, 1)]  # both ranks had started
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1][:3]


def test_gc_pause_bench_times_full_collections_before_and_after_freezing(tiny_model_dir, tmp_path):
    from lawtune.demo import demo_data_path

    proc = subprocess.run(
        [sys.executable, str(BENCH / "gc_pause.py"), "configs/demo.yaml", f"model.path={tiny_model_dir}",
         f"data.train={demo_data_path()}", "model.dtype=float32", f"train.output_dir={tmp_path / 'run'}",
         "train.report_to=[none]"],
        capture_output=True, text=True, timeout=300, cwd=BENCH.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith('{"bench": "gc_pause"')))
    assert row["examples"] > 0 and row["tracked_objects"] > 10_000
    # a frozen heap leaves a full collection almost nothing to walk
    assert 0 <= row["frozen_full_collection_ms"] < row["full_collection_ms"] / 10


def test_generation_bench_smoke():
    rows = {r["bench"]: r for r in _run("generation.py")}
    for name in ("env", "mixed12_engine", "mixed12_static", "mixed12_generate", "ask_stream", "serve", "summary",
                 "distill_engine", "distill_generate"):
        assert name in rows, name
    assert rows["distill_engine"]["completions"] == 6 * 2 and rows["distill_generate"]["completions"] == 4
    engine = rows["mixed12_engine"]
    assert engine["useful_tokens"] == rows["mixed12_static"]["useful_tokens"] > 0
    assert 0 < engine["occupancy"] <= 1 and engine["steps"] > 0
    assert rows["ask_stream"]["generated_tokens"] == 24 and rows["ask_stream"]["pieces"] > 1  # streamed, not at once
    wave = rows["serve"]["concurrent"]
    assert wave["clients"] == wave["answered"] == 4 and wave["tokens"] == 4 * 12 and wave["client_processes"] == 1
    if sys.platform == "linux":  # the server's CPU a token, by thread, read from /proc
        assert wave["server_cpu_us_a_token"]["engine"] > 0 and "event_loop" in wave["server_cpu_us_a_token"]


def test_grpo_bench_smoke(tmp_path):
    """Every side runs on the same forced lengths (lawtune's packed and padded training passes too); the table's
    ratios come from lawtune's and TRL's; a list of micro-batches runs lawtune once each."""
    out = tmp_path / "grpo.json"
    rows = _run("grpo.py", "--json", str(out), "--impls", "lawtune,lawtune_padded,trl", "--micro", "2,4")
    sides = [(r["impl"], r["micro_batch"]) for r in rows if r["bench"] == "grpo"]
    assert sides == [("lawtune", 2), ("lawtune", 4), ("lawtune_padded", 2), ("lawtune_padded", 4), ("trl", 2)]
    runs = {(r["impl"], r["completion_tokens"]): r for r in rows if r["bench"] == "grpo" and r["micro_batch"] == 2}
    assert set(runs) == {(impl, 8) for impl in ("lawtune", "lawtune_padded", "trl")}
    assert runs[("lawtune_padded", 8)]["overrides"] == ["grpo.packed=false"]
    assert "model.attn_implementation=flex_attention" in runs[("lawtune", 8)]["overrides"]
    for r in runs.values():
        assert r["s_per_step"] > 0 and r["rollout_tokens_per_s"] > 0 and r["train_tokens_per_s"] > 0
        assert r["steps_timed"] == 2 and r["completions_per_step"] == 4
        # the step's parts add up to it; the warm-up step is reported apart
        assert r["rollout_s"] + r["reward_s"] + r["train_s"] == pytest.approx(r["s_per_step"], abs=0.003)
        assert r["reward_s"] > 0 and r["train_s"] > 0 and len(r["warmup_s"]) == 1 and r["warmup_s"][0] > 0
    assert [r["completion_tokens"] for r in rows if r["bench"] == "grpo_ratio"] == [8]
    assert json.loads(out.read_text(encoding="utf-8")) == rows


def test_decode_step_bench_smoke():
    rows = _run("decode_step.py")
    attention = next(r for r in rows if r["bench"] == "attention")
    assert attention["rows"] == 8 and attention["sdpa_window_us"] > 0 and attention["window"] >= attention["max_length"]
    steps = [r for r in rows if r["bench"] == "step"]
    assert [(r["rows"], r["variant"]) for r in steps] == [(1, "eager+sdpa"), (4, "eager+sdpa")]
    assert all(r["tokens_per_s"] > 0 and r["ms_per_step"] > 0 for r in steps)
    assert [r["variant"] for r in rows if r["bench"] == "profile"] == ["eager+sdpa"]
    host = [r for r in rows if r["bench"] == "host"]
    assert [r["rows"] for r in host] == [1, 4]
    # every streaming row is read each step, and its listener told
    assert all(r["read_back_us"] > 0 and r["run_step_us"] > 0 and r["listener_calls_a_step"] >= r["rows"] for r in host)
