"""The multi-process path on CPU: two processes with the gloo backend, launched like on a GPU node."""

import json
import subprocess
import sys

import yaml

from lawtune.demo import demo_data_path


def _launch(config, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lawtune", "train", str(config), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _env():
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_two_processes_train_on_disjoint_shards_and_only_rank0_writes(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "ddp.yaml"
    config.write_text("# lawtune train ddp.yaml\n" + yaml.safe_dump({
        "model": {"path": str(tiny_model_dir), "dtype": "float32"},
        "data": {"train": str(demo_data_path()), "eval_fraction": 0.15, "max_length": 512},
        "train": {"output_dir": str(out), "max_steps": 4, "save_steps": 2, "logging_steps": 1, "eval_steps": 2,
                  "optim": "adamw_torch", "report_to": ["none"], "warmup_steps": 0, "ddp_bucket_cap_mb": 3},
        "eval": {"batch_size": 4},
    }), encoding="utf-8")
    proc = _launch(config)
    assert proc.stdout.count("done: 4 steps") == 1  # rank 1 stays quiet
    assert proc.stderr.count("all-reduced in buckets of 3 MiB") == 1  # the config reached DDP; rank 0 says so
    assert proc.stderr.count("rank 1: ") == 1 and "full Python garbage collections during training" in proc.stderr

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    loss_steps = [r["step"] for r in rows if "loss" in r]
    assert loss_steps == [1, 2, 3, 4]  # one row per step: only rank 0 writes
    n_train = len((out / "data" / "train.jsonl").read_text(encoding="utf-8").splitlines())
    n_eval = len((out / "data" / "eval.jsonl").read_text(encoding="utf-8").splitlines())
    # The global batch is per-device batch 2 x accumulation 4 x 2 processes = 16 sequences a step.
    last = [r for r in rows if "loss" in r][-1]
    assert abs(last["epoch"] - 4 * 16 / n_train) < 0.1
    evals = [r for r in rows if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [2, 4] and all(r["eval_n"] == n_eval for r in evals)  # gathered from both
    assert (out / "final_model" / "adapter_model.safetensors").is_file()
    assert (out / "best_model" / "adapter_model.safetensors").is_file()
    assert (out / "checkpoint-4").is_dir()

    # Resume from the two-process checkpoint and train two more steps.
    config.write_text(config.read_text(encoding="utf-8").replace("max_steps: 4", "max_steps: 6"), encoding="utf-8")
    proc = _launch(config, "--resume")
    assert "done: 6 steps" in proc.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_accelerate_configs_parse_with_accelerate():
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file

    folder = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
    kinds = {}
    for path in sorted(folder.glob("*.yaml")):
        assert path.read_text(encoding="utf-8").startswith("# "), path  # each says how to launch it
        kinds[path.name] = str(load_config_from_file(str(path)).distributed_type)
    assert kinds == {"ddp.yaml": "DistributedType.MULTI_GPU", "fsdp2.yaml": "DistributedType.FSDP"}
