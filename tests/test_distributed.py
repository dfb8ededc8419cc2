"""The multi-process path on CPU: processes with the gloo backend, launched like on GPU nodes — two on one node,
and one on each of two "nodes" (two launcher invocations on this machine, as the README's multi-node command)."""

import contextlib
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ddp_demo_config, distill_questions, launch_one_node, launcher_env

ACCELERATE_DDP = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "ddp.yaml"

pytestmark = pytest.mark.slow  # every test launches training processes


def test_two_processes_train_on_disjoint_shards_and_only_rank0_writes(one_node_ddp_run):
    _, out, proc, _ = one_node_ddp_run
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
    # --resume from a two-process checkpoint: the preemption test at the end of this file


# ----------------------------------------------------------------------------- two nodes

# One node of a two-node job, one process on it, as README.md "Several GPUs" launches each node (with N GPUs a node:
# accelerate's --num_processes counts the processes of all nodes, 2N; torchrun's --nproc_per_node is N).
NODE_LAUNCHERS = {
    "accelerate": lambda rank, port: [
        sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file", str(ACCELERATE_DDP),
        "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
        "--main_process_ip", "127.0.0.1", "--main_process_port", str(port)],
    "torchrun": lambda rank, port: [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
        "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port)],
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _end(proc: subprocess.Popen) -> None:
    """Kill a launcher still running, and its workers (torch's launcher starts every worker in a session of its own)."""
    import psutil  # accelerate's dependency

    if proc.poll() is not None:
        return
    try:
        workers = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        workers = []
    for worker in workers:
        try:
            worker.kill()
        except psutil.NoSuchProcess:
            pass
    proc.kill()
    proc.wait(timeout=30)
    psutil.wait_procs(workers, timeout=30)


def _launch_two_nodes(launcher, command: list[str], nodes: list[Path], logs: Path, timeout: float = 240,
                      env: dict | None = None) -> list[tuple]:
    """``command`` (what follows the launcher: ``-m lawtune train config``) as node 0 and node 1 of one job: two
    launcher invocations, each in its node's working directory, meeting at a port of 127.0.0.1 picked just before
    (tried once more if another process took it first). Returns each node's (stdout, stderr); a node that fails or
    outlives ``timeout`` ends both, workers included."""
    logs.mkdir(exist_ok=True)
    for attempt in range(2):
        port = _free_port()
        with contextlib.ExitStack() as stack:
            procs = []
            for rank, node in enumerate(nodes):
                node.mkdir(exist_ok=True)
                out = stack.enter_context(open(logs / f"node{rank}.out", "w"))
                err = stack.enter_context(open(logs / f"node{rank}.err", "w"))
                procs.append(subprocess.Popen([*launcher(rank, port), *command], cwd=node, stdout=out, stderr=err,
                                              env=env or launcher_env()))
                stack.callback(_end, procs[-1])
            deadline = time.monotonic() + timeout
            while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
                if any(p.poll() not in (None, 0) for p in procs):
                    break  # the other node would wait for this one until its own timeout
                time.sleep(0.2)
            late = time.monotonic() >= deadline
        texts = [((logs / f"node{r}.out").read_text(), (logs / f"node{r}.err").read_text()) for r in range(len(nodes))]
        if attempt == 1 or not any(p.returncode for p in procs) or not any("EADDRINUSE" in e for _, e in texts):
            break
    for rank, (p, (_, err)) in enumerate(zip(procs, texts)):
        ended = f" (killed after {timeout:.0f} s)" if late and p.returncode < 0 else ""
        assert p.returncode == 0, f"node {rank}: exit {p.returncode}{ended}\n{err[-3000:]}"
    return texts


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _steady(row: dict) -> dict:
    """A metrics row without what depends on the wall clock."""
    return {k: v for k, v in row.items() if not (k == "time" or "runtime" in k or k.endswith(("per_s", "per_second")))}


def test_two_nodes_train_as_two_processes_on_one_node_and_node1_writes_nothing(one_node_ddp_run, tiny_model_dir,
                                                                              tmp_path):
    """Two nodes of one process each train the demo into the outputs of two processes on one node, and node 1 writes
    nothing that is rank 0's to write. torchrun's nodes here; accelerate's two-node launch is the grpo test's below
    (the launchers hand every command the same environment, so each is run once, not once per command).

    Each node runs in a working directory of its own with the relative output folder ``run``: the same config, the
    same path string, a different disk, as on nodes with local disks. (With a shared filesystem, the usual layout
    and the one --resume needs, both nodes write into one folder and what node 1 wrote cannot be told apart.) So
    whatever rank 1 writes under its working directory shows in node1/: only its own random-number state in each
    checkpoint (transformers' ``rng_state_1.pth``, which rank 1 reads back on --resume), which the one-node run
    writes too. It also shows that in a fresh run rank 1 reads nothing that rank 0 writes."""
    one_node = one_node_ddp_run[3]
    one_node_stdout = one_node_ddp_run[2].stdout
    config = ddp_demo_config(tmp_path / "ddp.yaml", tiny_model_dir, "run")
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    (out0, err0), (out1, _) = _launch_two_nodes(NODE_LAUNCHERS["torchrun"], ["-m", "lawtune", "train", str(config)],
                                                nodes, tmp_path / "logs")

    # Node 1 wrote rank 1's random-number state and nothing else; the two nodes together, what the one node wrote.
    assert _files(nodes[1]) == ["run/checkpoint-2/rng_state_1.pth", "run/checkpoint-4/rng_state_1.pth"]
    assert sorted(_files(nodes[0]) + _files(nodes[1])) == ["run/" + f for f in _files(one_node)]

    assert out0.count("done: 4 steps") == 1 and out1 == ""  # rank 1 stays quiet
    assert "DDP over 2 processes" in err0 and err0.count("rank 1: ") == 1  # one job: rank 0 reports on rank 1
    loss = re.compile(r"final loss (\S+),")
    assert loss.findall(out0) == loss.findall(one_node_stdout)

    import torch
    from safetensors.torch import load_file

    run = nodes[0] / "run"
    for name in ("data/train.jsonl", "data/eval.jsonl", "lawtune_run.json"):
        assert (run / name).read_bytes() == (one_node / name).read_bytes(), name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(line) for line in (one_node / "metrics.jsonl").read_text().splitlines()]
    assert [_steady(r).keys() for r in rows] == [_steady(r).keys() for r in want]
    for got, expected in zip(rows, want):
        for key, value in _steady(expected).items():
            assert got[key] == (value if isinstance(value, str) else pytest.approx(value, rel=1e-6)), (got["step"], key)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    for name in ("checkpoint-2", "checkpoint-4", "best_model", "final_model"):
        got = load_file(run / name / "adapter_model.safetensors")
        expected = load_file(one_node / name / "adapter_model.safetensors")
        assert got.keys() == expected.keys(), name
        for key in got:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-8, msg=f"{name}: {key}")
    for name in ("best_model", "final_model"):
        assert (run / name / "data_manifest.json").read_text() == (one_node / name / "data_manifest.json").read_text()
        got, expected = (yaml.safe_load((d / name / "lawtune_config.yaml").read_text()) for d in (run, one_node))
        assert got["train"].pop("output_dir") == "run" and got.pop("working_dir") == str(nodes[0])
        expected["train"].pop("output_dir")
        expected.pop("working_dir")
        assert got == expected
    for step in (2, 4):  # rank 1's state, written on node 1, as the one-node run's rank 1 wrote it
        name = f"checkpoint-{step}/rng_state_1.pth"
        got, expected = (torch.load(d / name, weights_only=False) for d in (nodes[1] / "run", one_node))
        torch.testing.assert_close(got["cpu"], expected["cpu"], rtol=0, atol=0)
        assert got["python"] == expected["python"]
    # the comparison is not between two untrained adapters: training moved the weights
    step2, final = (load_file(run / name / "adapter_model.safetensors") for name in ("checkpoint-2", "final_model"))
    assert any(not torch.equal(step2[k], v) for k, v in final.items())


# ----------------------------------------------------------------------------- preemption


def test_sigterm_on_one_rank_stops_both_at_one_step_and_resume_ends_as_the_uninterrupted_run(one_node_ddp_run,
                                                                                            tiny_model_dir, tmp_path):
    """Rank 1 alone gets SIGTERM during step 3 of 4 (checkpoints every 2 steps). Through the all-reduced stop flag
    both ranks end step 3, save it and stop (rank 0 would otherwise go on and wait in step 4's all-reduce for a rank
    that is gone); --resume ends on the adapter of the run that got no signal."""
    from conftest import assert_same_adapter, preempting_script

    out = tmp_path / "run"
    config = ddp_demo_config(tmp_path / "ddp.yaml", tiny_model_dir, out)
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(preempting_script(tmp_path)), "train", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**launcher_env(), "TERM_AT_STEP": "3", "TERM_ON_RANK": "1"})
    try:
        _, err = proc.communicate(timeout=240)
    finally:
        _end(proc)
    assert err.count("SIGTERM: stopping after this optimizer step") == 1, err[-3000:]  # rank 1 only got it
    assert err.count("preempted at step 3; rerun with --resume") == 1  # said once, by rank 0
    # the launcher reports a failed job: a rank's exit code 143 (it may end the other rank itself once that one is done)
    assert proc.returncode != 0 and re.search(r"exitcode\s*:\s*143", err), err[-3000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert sorted(p.name for p in (out / "checkpoint-3").glob("rng_state_*.pth")) == ["rng_state_0.pth",
                                                                                       "rng_state_1.pth"]
    assert not (out / "final_model").exists()

    assert "done: 4 steps" in launch_one_node(config, "--resume").stdout
    assert_same_adapter(out / "final_model", one_node_ddp_run[3] / "final_model")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if "eval_accuracy" in r] == [2, 4]


def test_two_processes_save_a_pissa_run_converted_to_a_lora_of_the_original_base(tiny_model_dir, tmp_path):
    """lora.init=pissa under DDP: rank 0 keeps the starting adapters and converts final_model against them. The
    converted adapter on the original base computes what the last checkpoint (unconverted: peft takes the start
    out of the base again when it loads it) computes."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    launch_one_node(ddp_demo_config(tmp_path / "ddp.yaml", tiny_model_dir, out), "lora.init=pissa", "lora.r=4")
    config = json.loads((out / "final_model" / "adapter_config.json").read_text(encoding="utf-8"))
    assert config["init_lora_weights"] is True and config["r"] == 8
    assert json.loads((out / "checkpoint-4" / "adapter_config.json").read_text(encoding="utf-8"))["init_lora_weights"] == "pissa"
    ids = torch.tensor([list(range(5, 40))])
    logits = []
    for adapter in ("final_model", "checkpoint-4"):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out / adapter).eval()
        with torch.no_grad():
            logits.append(model(input_ids=ids).logits)
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        assert not torch.allclose(base(input_ids=ids).logits, logits[0], atol=1e-3)


# ----------------------------------------------------------------------------- distill

# README.md "Several GPUs": distill on the processes of one node (on GPUs, each rank's model on its own GPU).
DISTILL_LAUNCHERS = {
    "accelerate": lambda: [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file",
                           str(ACCELERATE_DDP), "--num_processes", "2", "--main_process_port", str(_free_port())],
    "torchrun": lambda: [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
}


def _distill_args(model_dir) -> list[str]:
    """distill of the 12 questions of ``distill_questions`` (q.json of the working directory) into traces.jsonl:
    2 questions a batch, so two processes go through 3 rounds of 4 and one process through 6 batches of 2."""
    return ["distill", "--model", str(model_dir), "--data", "q.json", "--output", "traces.jsonl", "--samples", "2",
            "--batch-size", "2", "--max-new-tokens", "24", "model.dtype=float32", "generation.temperature=1.0"]


def _distill_here(directory: Path, model_dir, *command: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``command distill …`` (e.g. ``python -m lawtune``) in ``directory``, its q.json written first."""
    directory.mkdir(exist_ok=True)
    distill_questions(directory / "q.json")
    return subprocess.run([*command, *_distill_args(model_dir)], cwd=directory, capture_output=True, text=True,
                          timeout=240, env=env or launcher_env())


def _distilled(directory: Path) -> dict:
    """What a distill run left in ``directory``: its two files, and its report without the wall times."""
    report = json.loads((directory / "traces.report.json").read_text(encoding="utf-8"))
    for block in ("this_run", "all_runs"):
        for wall_time in ("seconds", "tokens_per_s"):
            report[block].pop(wall_time)
    return {"traces": (directory / "traces.jsonl").read_bytes(),
            "rejected": (directory / "traces.rejected.jsonl").read_bytes(), "report": report}


@pytest.fixture(scope="module")
def one_process_distill(branching_model_dir, tmp_path_factory):
    """The files of distill in one process (``lawtune distill`` itself, no launcher)."""
    directory = tmp_path_factory.mktemp("distill_one")
    proc = _distill_here(directory, branching_model_dir, sys.executable, "-m", "lawtune")
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = _distilled(directory)
    # the comparisons below are not between trivial files: some questions kept, some rejected, split samples
    lines = lambda data: [json.loads(line) for line in data.decode().splitlines()]  # noqa: E731
    rejected = lines(files["rejected"])
    assert 0 < len(lines(files["traces"])) < 12 and rejected
    assert any(r["gold"] in (["A"], ["B"]) for r in rejected)  # both samples wrong, where one in four tries is
    return files


@pytest.mark.parametrize("launcher", sorted(DISTILL_LAUNCHERS))
def test_two_processes_distill_the_files_of_one_process(launcher, branching_model_dir, one_process_distill, tmp_path):
    """The questions split across two ranks (gloo on CPU) give the traces, rejected file and report of one process,
    byte for byte (the report less its wall times); rank 0 alone prints the summary."""
    proc = _distill_here(tmp_path, branching_model_dir, *DISTILL_LAUNCHERS[launcher](), "-m", "lawtune")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("kept traces for") == 1, proc.stdout
    got = _distilled(tmp_path)
    for name in ("traces", "rejected", "report"):
        assert got[name] == one_process_distill[name], name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.json", "traces.jsonl", "traces.rejected.jsonl",
                                                          "traces.report.json"]


# `python <script> <lawtune command line>`: lawtune's command line in a process that sends itself $KILL_SIGNAL (default
# SIGKILL: nothing of it runs on) as it starts sampling its $KILL_AT_BATCH-th batch, on rank $KILL_RANK only.
KILLING_SCRIPT = """
import os, signal, sys

from lawtune import distill
from lawtune.cli import main

real_sampler = distill.local_sampler


def local_sampler(cfg):
    sample, tokenizer, close = real_sampler(cfg)
    batches = []

    def killing(records):
        batches.append(records)
        if len(batches) == int(os.environ["KILL_AT_BATCH"]) and os.environ["RANK"] == os.environ["KILL_RANK"]:
            os.kill(os.getpid(), getattr(signal, os.environ.get("KILL_SIGNAL", "SIGKILL")))
        return sample(records)

    return killing, tokenizer, close


distill.local_sampler = local_sampler
sys.exit(main(sys.argv[1:]))
"""


def _killed(directory: Path, model_dir, rank: int, signal: str = "SIGKILL") -> subprocess.CompletedProcess:
    """distill on two processes (torchrun) in ``directory``, rank ``rank`` sent ``signal`` as it starts its second
    batch."""
    script = directory.parent / "killing.py"
    script.write_text(KILLING_SCRIPT, encoding="utf-8")
    env = {**launcher_env(), "KILL_AT_BATCH": "2", "KILL_RANK": str(rank), "KILL_SIGNAL": signal}
    proc = _distill_here(directory, model_dir, *DISTILL_LAUNCHERS["torchrun"](), str(script), env=env)
    # SIGKILL: the launcher reports that rank's death; SIGTERM: a rank's exit code 143 (the launcher may end the
    # other rank itself once the first has exited)
    died = (rf"rank\s*: {rank} \(local_rank: {rank}\)\n\s*exitcode\s*: -9 " if signal == "SIGKILL" else
            r"exitcode\s*: 143 ")
    assert proc.returncode != 0 and re.search(died, proc.stderr), proc.stderr[-3000:]
    # the first round is in the files whole (rank 0 wrote it), nothing of the second
    ids = lambda name: [json.loads(line)["id"] for line in (directory / name).read_text(encoding="utf-8").splitlines()]  # noqa: E731
    first_round = [json.loads(line)["id"] for line in (directory / "q.json").read_text(encoding="utf-8").splitlines()][:4]
    assert sorted(ids("traces.jsonl") + ids("traces.rejected.jsonl")) == sorted(first_round)
    return proc


def test_rank1_killed_mid_run_then_a_torn_line_and_a_rerun_on_one_process_end_as_the_uninterrupted_run(
        branching_model_dir, one_process_distill, tmp_path):
    """Rank 1 is killed as it starts its second batch: rank 0 says so, and its report counts the first round. The
    traces file's last line is then cut in half (a crash while writing); a rerun on one process goes on from there
    and ends with the files of the uninterrupted run."""
    run = tmp_path / "run"
    proc = _killed(run, branching_model_dir, 1)
    assert "another process of the job ended; the rounds written so far are saved" in proc.stderr
    assert one_process_distill["traces"].startswith((run / "traces.jsonl").read_bytes())
    report = json.loads((run / "traces.report.json").read_text(encoding="utf-8"))
    assert report["all_runs"]["questions_done"] == 4 and report["all_runs"]["uncounted"] == 0

    traces = (run / "traces.jsonl").read_bytes()
    last = traces.rstrip(b"\n").rfind(b"\n") + 1
    assert traces[last:], "the first round kept a trace"
    (run / "traces.jsonl").write_bytes(traces[: last + (len(traces) - last) // 2])  # its last line cut in half
    proc = _distill_here(run, branching_model_dir, sys.executable, "-m", "lawtune")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("skipped 3 already done; ")  # the question of the torn line is sampled again
    got, want = _distilled(run), one_process_distill
    assert got["traces"] == want["traces"] and got["rejected"] == want["rejected"]
    assert got["report"]["by_group"] == want["report"]["by_group"]
    # the report counts the torn question's samples twice: the killed run's and the rerun's
    assert got["report"]["summary"]["completions_sampled"] == want["report"]["summary"]["completions_sampled"] + 2


def test_rank0_killed_mid_run_then_a_rerun_on_two_processes_ends_as_the_uninterrupted_run(
        branching_model_dir, one_process_distill, tmp_path):
    """Rank 0 is killed as it starts its second batch (no report: the rerun's says so); a rerun on two processes
    (accelerate) ends with the files of the uninterrupted run."""
    run = tmp_path / "run"
    _killed(run, branching_model_dir, 0)
    assert not (run / "traces.report.json").exists()
    proc = _distill_here(run, branching_model_dir, *DISTILL_LAUNCHERS["accelerate"](), "-m", "lawtune")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("skipped 4 already done; ") == 1
    got, want = _distilled(run), one_process_distill
    assert got["traces"] == want["traces"] and got["rejected"] == want["rejected"]
    assert got["report"]["summary"]["questions_kept"] == want["report"]["summary"]["questions_kept"]
    assert got["report"]["by_group"] == want["report"]["by_group"]
    assert got["report"]["all_runs"]["uncounted"] == 4 and "4 questions in the files" in got["report"]["note"]


def test_sigterm_on_rank1_stops_both_ranks_after_the_round_with_exit_143(branching_model_dir, tmp_path):
    """SIGTERM on rank 1 alone, as it starts its second batch: it drops its share of the round, tells rank 0 through
    the round's exchange, and both stop (no rank left waiting for the other) with exit code 143; rank 0 says how to
    go on, once, and its report counts the first round."""
    run = tmp_path / "run"
    proc = _killed(run, branching_model_dir, 1, "SIGTERM")
    assert proc.stderr.count("SIGTERM: stopping; every batch sampled so far is saved") == 1
    assert proc.stderr.count("preempted: 4 of the 12 questions left were sampled and saved in traces.jsonl") == 1
    report = json.loads((run / "traces.report.json").read_text(encoding="utf-8"))
    assert report["this_run"]["questions_sampled"] == 4 and report["all_runs"]["uncounted"] == 0


def test_a_usage_error_on_two_processes_is_one_line_and_exit_code_2(branching_model_dir, tmp_path):
    """An output that is a directory, found by rank 0 once the processes have joined: the ranks say it in one
    line each and exit 2 (not the abort of a process that exits with its gloo group alive). torchrun stops the other
    rank with SIGTERM once the first has exited, which may land while that rank is still tearing down, so -15 is
    torchrun's doing and allowed; an abort (-6) or any other signal is not."""
    (tmp_path / "traces.jsonl").mkdir()
    proc = _distill_here(tmp_path, branching_model_dir, *DISTILL_LAUNCHERS["torchrun"](), "-m", "lawtune")
    # torchrun's SIGTERM may also cut a rank short before it prints, so the line is there once or twice.
    assert proc.stderr.count("error: distill.output: traces.jsonl is a directory") in (1, 2), proc.stderr[-3000:]
    assert "terminate called" not in proc.stderr and re.search(r"exitcode\s*: 2 ", proc.stderr)
    assert not re.search(r"exitcode\s*: -(?!15 )", proc.stderr), proc.stderr[-3000:]


# ----------------------------------------------------------------------------- grpo

TESTS = Path(__file__).resolve().parent


def _grpo_args(model_dir, out, per_device: int, *extra: str) -> list[str]:
    """`lawtune grpo` of ``tiny_grpo_settings`` (2 completions a group, 3 steps) with a checkpoint every 2 steps and
    ``per_device`` prompts a process a step: 8 on one process is the global batch of 4 on each of two."""
    from lawtune.demo import demo_data_path

    from conftest import tiny_grpo_settings

    return ["grpo", "--model", str(model_dir), "--data", str(demo_data_path()), "--output-dir", str(out),
            *tiny_grpo_settings(f"grpo.per_device_batch_size={per_device}", "grpo.save_steps=2", *extra)]


def _grpo_env(reward: str, record: Path, **more: str) -> dict:
    """The environment of ``preempting_script`` running grpo with conftest's ``reward``, recording into ``record``."""
    from conftest import RECORD_ENV

    record.mkdir(parents=True, exist_ok=True)
    return {**launcher_env(), "TERM_MODULE": "grpo", "GRPO_REWARD": reward, RECORD_ENV: str(record),
            "LAWTUNE_TESTS": str(TESTS), **more}


def _by_step(calls: list[dict]) -> dict[int, list[dict]]:
    steps: dict[int, list[dict]] = {}
    for call in calls:
        steps.setdefault(call["step"], []).append(call)
    return steps


@pytest.fixture(scope="module")
def one_process_grpo(tiny_model_dir, tmp_path_factory):
    """The grpo run of ``_grpo_args`` in one process (lawtune's main in this one), 8 prompts a step, scored by
    ``recorded_random01``: its output folder and what the reward recorded."""
    from lawtune.cli import main
    from lawtune.train import grpo as grpo_module

    from conftest import RECORD_ENV, recorded, recorded_random01

    root = tmp_path_factory.mktemp("grpo_one")
    (root / "record").mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(grpo_module, "reward_functions", lambda cfg: ([recorded_random01], [1.0]))
        patch.setenv(RECORD_ENV, str(root / "record"))
        assert main(_grpo_args(tiny_model_dir, root / "run", 8)) == 0
    return root / "run", recorded(root / "record")[0]


def test_grpo_on_two_nodes_samples_scores_and_trains_as_one_process(one_process_grpo, tiny_model_dir, tmp_path):
    """grpo as two single-process nodes (accelerate, loopback): each rank samples its half of every step's questions
    with its own engine, and together they see the one-process run's questions in its order with its rewards, log its
    metrics, gather its held-out evaluations and end on its adapter; node 1 writes nothing but rank 1's random state."""
    from conftest import preempting_script, recorded

    one, calls = one_process_grpo
    nodes, record = [tmp_path / "node0", tmp_path / "node1"], tmp_path / "record"
    command = [str(preempting_script(tmp_path)), *_grpo_args(tiny_model_dir, "run", 4)]
    (out0, err0), (out1, _) = _launch_two_nodes(NODE_LAUNCHERS["accelerate"], command, nodes, tmp_path / "logs",
                                                env=_grpo_env("recorded_random01", record))
    assert out0.count("done: 3 steps") == 1 and out1 == "", err0[-3000:]
    assert _files(nodes[1]) == ["run/checkpoint-2/rng_state_1.pth", "run/checkpoint-3/rng_state_1.pth"]

    # the same questions, in the same order, and the same rewards: rank 0 the first half of each step, rank 1 the rest
    ranks, want = recorded(record), _by_step(calls)
    got = [_by_step(ranks[r]) for r in (0, 1)]
    assert sorted(want) == [0, 1, 2] and all(len(got[r][s]) == 1 for r in (0, 1) for s in want)
    for step, (call,) in want.items():
        assert got[0][step][0]["ids"] + got[1][step][0]["ids"] == call["ids"], step
        assert got[0][step][0]["rewards"] + got[1][step][0]["rewards"] == call["rewards"], step
    assert 0 < sum(sum(c["rewards"]) for c in calls) < sum(len(c["rewards"]) for c in calls)  # rewards that teach

    run = nodes[0] / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward" in r] == [1, 2, 3]
    assert [(r["step"], r["eval_n"]) for r in rows if "eval_accuracy" in r] == [(0, 4), (2, 4), (3, 4)]  # gathered
    for got_row, want_row in zip(rows, expected, strict=True):
        for key in ("eval_accuracy", "reward", "reward_std", "frac_reward_zero_std", "completions/mean_length",
                    "loss", "grad_norm", "entropy"):
            if key in want_row:
                assert got_row[key] == pytest.approx(want_row[key], rel=1e-4, abs=1e-6), (want_row["step"], key)
    assert any(r.get("grad_norm", 0) > 0 for r in expected)
    import torch
    from safetensors.torch import load_file

    # AdamW moves each weight by about the learning rate (1e-2) a step whatever its gradient's size, so the rounding
    # of the two-rank gradient average reaches the weights of near-zero gradients: seen up to 6e-5 apart, against
    # 1e-2 that step 3 moves nearly every weight (the last assertion).
    for name in ("checkpoint-2", "final_model"):
        got_w, want_w = (load_file(d / name / "adapter_model.safetensors") for d in (run, one))
        assert got_w.keys() == want_w.keys()
        for key in got_w:
            torch.testing.assert_close(got_w[key], want_w[key], rtol=0, atol=2e-4, msg=f"{name}: {key}")
    step2, final = (load_file(one / name / "adapter_model.safetensors") for name in ("checkpoint-2", "final_model"))
    assert max((final[k] - step2[k]).abs().max().item() for k in final) > 5e-3


def test_dynamic_sampling_on_two_processes_keeps_the_steps_groups_sigterm_on_one_rank_stops_both_and_resume_ends(
        tiny_model_dir, tmp_path):
    """grpo.dynamic_sampling on two processes (torchrun), a reward rigged so that rank 1's own groups of every step
    teach nothing: both ranks draw one extra question each (disjoint, none of the step's), and the step keeps its 4
    groups, dealt 2 to each rank (rank 1 trains one rank 0 sampled). SIGTERM on rank 1 alone as step 2 begins: both
    end step 2, save it and exit 143; --resume on two processes trains step 3 from that checkpoint."""
    from conftest import preempting_script, recorded

    record, out = tmp_path / "record", tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(preempting_script(tmp_path)),
                           *_grpo_args(tiny_model_dir, out, 4, "grpo.dynamic_sampling=true", "grpo.save_steps=10")],
                          capture_output=True, text=True, timeout=240,
                          env=_grpo_env("rank0_teaches_first", record, TERM_AT_STEP="2", TERM_ON_RANK="1"))
    err = proc.stderr
    assert err.count("SIGTERM: stopping after this optimizer step") == 1, err[-3000:]  # rank 1 only got it
    assert err.count("preempted at step 2; rerun with --resume") == 1
    assert proc.returncode != 0 and re.search(r"exitcode\s*:\s*143", err), err[-3000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (out / "final_model").exists()

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward" in r]
    assert [(r["step"], r["groups/sampled"], r["groups/kept"], r["groups/resampled"]) for r in steps] == [
        (1, 6, 4, 2), (2, 6, 4, 2)]
    assert all(r["grad_norm"] > 0 for r in steps)
    ranks = {r: _by_step(calls) for r, calls in recorded(record).items()}
    for step in (0, 1):
        own, extra = ([ranks[r][step][k]["ids"][::2] for r in (0, 1)] for k in (0, 1))
        assert all(len(ids) == 2 for ids in own) and all(len(ids) == 1 for ids in extra)  # 2 calls on each rank
        assert not set(extra[0]) & set(extra[1]) and not set(extra[0] + extra[1]) & set(own[0] + own[1])
    trained = {r: [json.loads(line) for line in (record / f"trained{r}.jsonl").read_text().splitlines()]
               for r in (0, 1)}
    assert [t["in_loss"] for t in trained[0]] == [[True, True]] * 2 == [t["in_loss"] for t in trained[1]]

    # --resume from the two-process checkpoint, as one node of accelerate launches it: step 3 alone, the held-out
    # evaluation that step 2 skipped for the signal first
    proc = subprocess.run([*DISTILL_LAUNCHERS["accelerate"](), str(preempting_script(tmp_path)),
                           *_grpo_args(tiny_model_dir, out, 4, "grpo.dynamic_sampling=true", "grpo.save_steps=10"),
                           "--resume"], capture_output=True, text=True, timeout=240,
                          env=_grpo_env("rank0_teaches_first", record))
    assert proc.returncode == 0 and proc.stdout.count("done: 3 steps") == 1, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["groups/kept"]) for r in rows if "reward" in r] == [(1, 4), (2, 4), (3, 4)]
    assert [r["step"] for r in rows if "eval_accuracy" in r] == [0, 2, 3]
    assert sorted({c["step"] for c in recorded(record)[1]}) == [0, 1, 2]  # step 3 (global step 2) was sampled once more
    assert (out / "final_model" / "adapter_model.safetensors").is_file()
