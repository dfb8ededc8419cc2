"""Shared fixtures: tiny Qwen2 models with a local tokenizer, and JEC-QA-shaped data written by us."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lawtune.config import load_config
from lawtune.demo import build_tiny_model, build_tokenizer, corpus_texts, demo_data_path

# Under pytest-xdist (`pytest -n auto`) each worker is one of several processes sharing the cores: torch's own
# thread pool (one thread per core in every process) would oversubscribe them.
if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))

SHARED = Path(__file__).resolve().parents[2] / "shared" / "deepseek-r1-distill-qwen-1.5b"
TOKENIZER_ENV = "LAWTUNE_TOKENIZER"

# The synthetic task: the statement names one topic, and each topic has its own answer set (single
# and multi), so the answer depends on the question's content and is never a constant letter.
TOPIC_ANSWERS = {"合同": "A", "物权": "B", "侵权": "CD", "继承": "AC", "婚姻": "BD", "刑法": "ABC", "诉讼": "D", "行政": "BCD"}
# What the rigged answering model (``answering_model_dir``) thinks before it answers 答案：A.
REASONING = "依据民法典"
FILLER = ["甲", "乙", "丙", "丁", "公司", "法院", "当事人", "债权人", "房屋", "车辆", "证据", "期限"]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def synthetic_records(n: int, seed: int = 0) -> list[dict]:
    """A learnable multiple-choice task: the topic word in the statement decides the answer set."""
    rng = random.Random(seed)
    topics = sorted(TOPIC_ANSWERS)
    rows = []
    for i in range(n):
        topic = topics[i % len(topics)]
        words = rng.sample(FILLER, 3)
        statement = f"{topic}问题：{words[0]}与{words[1]}的{topic}纠纷（{topic}），涉及{words[2]}。下列哪些{topic}规则适用？"
        options = {letter: "".join(rng.sample(FILLER, 2)) + "的情形" for letter in "ABCD"}
        rows.append({"id": f"{i % 2}_{i}", "statement": statement, "option_list": options,
                     "answer": list(TOPIC_ANSWERS[topic]), "type": str(i % 2)})
    return rows


def lora_tiny_model(tokenizer, attn: str = "sdpa"):
    """A tiny random model with LoRA (r 8) whose B matrices are non-zero, so LoRA gradients reach A too."""
    import torch

    from lawtune.compat import set_attn_implementation
    from lawtune.config import LoraSection
    from lawtune.model import add_lora

    torch.manual_seed(0)
    base = build_tiny_model(tokenizer)
    set_attn_implementation(base.config, attn)
    model = add_lora(base, LoraSection(r=8, alpha=16))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    texts = corpus_texts([demo_data_path()])
    texts += [r["statement"] + "".join(r["option_list"].values()) for r in synthetic_records(200)]
    return build_tokenizer(texts, vocab_size=1500)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A saved tiny random Qwen2 model + tokenizer directory, usable as --model."""
    directory = tmp_path_factory.mktemp("tiny_model")
    build_tiny_model(tiny_tokenizer, hidden_size=64, layers=2).save_pretrained(directory)
    tiny_tokenizer.save_pretrained(directory)
    return directory


def ddp_demo_config(path: Path, model_dir, output_dir) -> Path:
    """The run of the multi-process tests (tests/test_distributed.py): the demo questions, 4 steps, a checkpoint and a
    held-out evaluation every 2. ``output_dir`` may be relative: it then lies under each launcher's working directory."""
    import yaml

    path.write_text(f"# lawtune train {path.name}\n" + yaml.safe_dump({
        "model": {"path": str(model_dir), "dtype": "float32"},
        "data": {"train": str(demo_data_path()), "eval_fraction": 0.15, "max_length": 512},
        "train": {"output_dir": str(output_dir), "max_steps": 4, "save_steps": 2, "logging_steps": 1, "eval_steps": 2,
                  "optim": "adamw_torch", "report_to": ["none"], "warmup_steps": 0, "ddp_bucket_cap_mb": 3},
        "eval": {"batch_size": 4},
    }), encoding="utf-8")
    return path


def tiny_grpo_settings(*extra) -> list[str]:
    """`lawtune grpo` settings for a few quick steps of the tiny model on the demo questions: 2 groups of 2
    completions of at most 8 tokens a step, 3 steps, held-out accuracy on 4 questions at step 0, 2 and 3."""
    return ["model.dtype=float32", "data.eval_fraction=0.15", "data.eval_max_samples=4", "data.max_length=512",
            "grpo.num_generations=2", "grpo.per_device_batch_size=4", "grpo.gradient_accumulation_steps=1",
            "grpo.max_completion_length=8", "grpo.eval_max_new_tokens=8", "grpo.eval_batch_size=4",
            "grpo.max_steps=3", "grpo.save_steps=10", "grpo.eval_steps=2", "grpo.beta=0", "grpo.learning_rate=1e-2",
            "grpo.gradient_checkpointing=false", "grpo.report_to=[none]", *extra]


def random01(prompts, completions, **_):
    """A seeded random 0/1 reward: completions of one group differ in it, so a tiny random model learns something."""
    return [float(random.Random(f"{p}\x1f{c}").random() < 0.5) for p, c in zip(prompts, completions)]


# $GRPO_RECORD: the folder where the rewards below write, per process (rank<RANK>.jsonl), one line per scoring call.
RECORD_ENV = "GRPO_RECORD"


def _record(rewards: list[float], ids: list[str], trainer_state) -> list[float]:
    folder = os.environ.get(RECORD_ENV)
    if folder:
        with open(Path(folder) / f"rank{os.environ.get('RANK', '0')}.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": trainer_state.global_step, "ids": ids, "rewards": rewards}) + "\n")
    return rewards


def recorded_random01(prompts, completions, id, trainer_state, **_):  # noqa: A002 (TRL passes the dataset's columns)
    """``random01``, each scoring call's question ids and rewards recorded (``RECORD_ENV``)."""
    return _record(random01(prompts, completions), id, trainer_state)


_FIRST_CALLS: set[int] = set()


def rank0_teaches_first(prompts, completions, id, trainer_state, **_):  # noqa: A002
    """A rigged reward for dynamic sampling on two processes: the first scoring call of a step on rank 1 scores every
    completion 0 (its groups teach nothing); every other group scores 1, 0, 1, 0, ... (they all teach). Recorded as
    ``recorded_random01``."""
    step = trainer_state.global_step
    alike = os.environ.get("RANK", "0") == "1" and step not in _FIRST_CALLS
    _FIRST_CALLS.add(step)
    return _record([0.0 if alike else float(i % 2 == 0) for i in range(len(completions))], id, trainer_state)


def recorded(folder: Path) -> dict[int, list[dict]]:
    """What the recording rewards wrote in ``folder``: per rank, its scoring calls in order."""
    return {int(p.stem[4:]): [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines()]
            for p in sorted(folder.glob("rank*.jsonl"))}


def launcher_env() -> dict:
    """The environment of a launched job: one thread a process (the tests' CPU is shared)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def launch_one_node(config, *extra) -> subprocess.CompletedProcess:
    """lawtune train in two processes on this machine, as the README's one-node torchrun command does."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lawtune", "train", str(config), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=launcher_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def one_node_ddp_run(tiny_model_dir, tmp_path_factory):
    """``ddp_demo_config`` trained by two processes on one node: (config, output dir, the launcher's result, a copy
    of the output dir as the run left it). Tests may go on in the output dir (--resume); the copy stays as it was."""
    root = tmp_path_factory.mktemp("one_node")
    out = root / "run"
    config = ddp_demo_config(root / "ddp.yaml", tiny_model_dir, out)
    proc = launch_one_node(config)
    snapshot = root / "as_trained"
    shutil.copytree(out, snapshot)
    return config, out, proc, snapshot


# `python <script> <lawtune command line>`: lawtune's command line in a process that sends itself SIGTERM as optimizer
# step $TERM_AT_STEP begins (on rank $TERM_ON_RANK only, where set; never where unset), through a callback that `train`
# (`grpo` with $TERM_MODULE=grpo) adds to its Trainer. The signal comes at a known step, not after a wall-clock wait.
# With $GRPO_REWARD, `grpo` scores with that function of this file instead of its rewards, and with $GRPO_RECORD set
# each dynamic-sampling batch a rank trains is recorded there too (trained<RANK>.jsonl: per step, which of its groups
# carry loss).
PREEMPTING_SCRIPT = """
import importlib, json, os, signal, sys

from transformers import TrainerCallback

from lawtune.cli import main

step, rank = int(os.environ.get("TERM_AT_STEP", "0")), os.environ.get("TERM_ON_RANK")
module = importlib.import_module("lawtune.train." + os.environ.get("TERM_MODULE", "sft"))
if os.environ.get("GRPO_REWARD"):
    sys.path.insert(0, os.environ["LAWTUNE_TESTS"])
    import conftest

    module.reward_functions = lambda cfg: ([getattr(conftest, os.environ["GRPO_REWARD"])], [1.0])


class TermAtStep(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == step and rank in (None, os.environ.get("RANK", "0")):
            os.kill(os.getpid(), signal.SIGTERM)


def recording(trainer):
    dynamic_batch = trainer.dynamic_batch

    def record(inputs, dynamic):
        batch = dynamic_batch(inputs, dynamic)
        in_loss = batch["completion_mask"].sum(dim=1).view(-1, trainer.num_generations) > 0
        path = os.path.join(os.environ["GRPO_RECORD"], "trained" + os.environ.get("RANK", "0") + ".jsonl")
        with open(path, "a") as fh:
            fh.write(json.dumps({"step": trainer.state.global_step, "in_loss": in_loss.any(dim=1).tolist()}) + "\\n")
        return batch

    trainer.dynamic_batch = record


real_setup = module.setup


def setup(*args, **kwargs):
    run = real_setup(*args, **kwargs)
    run.trainer.add_callback(TermAtStep())
    if os.environ.get("GRPO_RECORD") and getattr(run.trainer, "dynamic", None) is not None:
        recording(run.trainer)
    return run


module.setup = setup
sys.exit(main(sys.argv[1:]))
"""


def term_at_step(step: int):
    """A Trainer callback that sends this process SIGTERM as optimizer step ``step`` begins, in a test process: only
    while lawtune's handler is installed (the default action would end pytest)."""
    import signal

    from transformers import TrainerCallback

    class TermAtStep(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step + 1 == step:
                assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None)
                os.kill(os.getpid(), signal.SIGTERM)

    return TermAtStep()


def preempting_script(directory: Path) -> Path:
    path = directory / "preempting.py"
    path.write_text(PREEMPTING_SCRIPT, encoding="utf-8")
    return path


def adapter_weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "adapter_model.safetensors"))


def assert_same_adapter(a: Path, b: Path) -> None:
    import torch

    wa, wb = adapter_weights(a), adapter_weights(b)
    assert set(wa) == set(wb)
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-6)


def file_states(root: Path) -> dict:
    """Every file under ``root``: its size and modification time (what a command that writes nothing leaves)."""
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file()}


@pytest.fixture
def tiny_config(tiny_model_dir, tmp_path):
    """A config that trains the tiny model for a few steps on the bundled questions, CPU, fp32."""

    def make(*overrides: str):
        return load_config(None, [
            f"model.path={tiny_model_dir}", "model.dtype=float32", f"data.train={demo_data_path()}",
            "data.max_length=512", "data.eval_fraction=0.1", f"train.output_dir={tmp_path / 'run'}",
            "train.max_steps=4", "train.save_steps=2", "train.logging_steps=1", "train.eval_steps=0",
            "train.warmup_steps=0", "train.learning_rate=1e-3", "train.optim=adamw_torch",
            "train.report_to=[none]", "eval.batch_size=16", *overrides,
        ])

    return make


@pytest.fixture(scope="session")
def answering_model_dir(tiny_tokenizer, tmp_path_factory):
    """A tiny model rigged to answer: its layers add nothing, so it is a bigram table, and the table is set
    so that after the prompt it writes "答案：A" (direct) or "依据民法典</think>\\n\\n答案：A" (reasoning)."""

    from lawtune.infer import record_from_fields
    from lawtune.prompts import render_prompt

    tok = tiny_tokenizer
    model = build_tiny_model(tok)
    record = record_from_fields("题干", {"A": "甲", "B": "乙"})
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    direct_end = ids(render_prompt(record, tok, "chat", think=False))[-1]
    think_end = ids(render_prompt(record, tok, "chat", think=True))[-1]
    answer = ids("答案：A") + [tok.eos_token_id]
    chains = [[direct_end, *answer], [think_end, *ids(REASONING), *ids("</think>"), direct_end]]
    links = [link for chain in chains for link in zip(chain, chain[1:])]
    return save_bigram_model(model, tok, links, tmp_path_factory.mktemp("answering"))


@pytest.fixture(scope="session")
def branching_model_dir(tiny_tokenizer, tmp_path_factory):
    """A tiny bigram model (as ``answering_model_dir``) that in reasoning mode writes "依据民法典</think>", then
    "答案：" and A or B with equal odds: which of a question's samples reach its gold answer depends on their seeds."""

    from lawtune.infer import record_from_fields
    from lawtune.prompts import render_prompt

    tok = tiny_tokenizer
    model = build_tiny_model(tok)
    record = record_from_fields("题干", {"A": "甲", "B": "乙"})
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    direct_end = ids(render_prompt(record, tok, "chat", think=False))[-1]
    think_end = ids(render_prompt(record, tok, "chat", think=True))[-1]
    chain = [think_end, *ids(REASONING), *ids("</think>"), direct_end, *ids("答案：")]
    links = list(zip(chain, chain[1:]))
    for last in (ids("A"), ids("B")):
        assert len(last) == 1, "each branch is one token of the tiny tokenizer"
        links += [(chain[-1], last[0]), (last[0], tok.eos_token_id)]
    return save_bigram_model(model, tok, links, tmp_path_factory.mktemp("branching"))


def distill_questions(path: Path) -> Path:
    """12 questions for ``branching_model_dir``: a third answered A, a third B, a third something it never writes."""
    rows = synthetic_records(12, seed=2)
    for i, row in enumerate(rows):
        row["answer"] = [["A"], ["B"], row["answer"] if len(row["answer"]) > 1 else ["C", "D"]][i % 3]
    return write_jsonl(path, rows)


def save_bigram_model(model, tok, links: list[tuple[int, int]], directory: Path) -> Path:
    """``model`` made a bigram table (its layers add nothing) whose token ``cur`` is followed by each ``nxt`` of the
    ``(cur, nxt)`` links (several: equal odds), saved with ``tok`` in ``directory``."""
    import torch

    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        head.zero_()
        for cur, nxt in links:
            head[nxt] += 20 * emb[cur] / emb[cur].norm()
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def voting_model_dir(tiny_tokenizer, tmp_path_factory):
    """A tiny bigram model (as ``answering_model_dir``) that in direct mode writes "答案：" and then A, B or 无 (which
    reads as no answer) with equal odds: sampled K times, its questions get split votes, ties and unreadable
    samples."""

    from lawtune.infer import record_from_fields
    from lawtune.prompts import render_prompt

    tok = tiny_tokenizer
    model = build_tiny_model(tok)
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    direct_end = ids(render_prompt(record_from_fields("题干", {"A": "甲", "B": "乙"}), tok, "chat", think=False))[-1]
    prefix = ids("答案：")
    links = list(zip([direct_end, *prefix], prefix))
    for last in (ids("A"), ids("B"), ids("无")):
        assert len(last) == 1, "each branch is one token of the tiny tokenizer"
        links += [(prefix[-1], last[0]), (last[0], tok.eos_token_id)]
    return save_bigram_model(model, tok, links, tmp_path_factory.mktemp("voting"))


@pytest.fixture
def chromium(tmp_path, monkeypatch):
    """A headless Debian Chromium driven by Selenium (skips where it is not installed)."""
    if not Path("/usr/bin/chromium").exists():
        pytest.skip("Debian's chromium is not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # never let Selenium Manager look for downloads
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
    try:
        yield driver
    finally:
        driver.quit()


def real_tokenizer_dir() -> Path | None:
    """The folder of DeepSeek-R1-Distill's tokenizer: the one LAWTUNE_TOKENIZER names (which must hold it), else
    ../shared/deepseek-r1-distill-qwen-1.5b where that holds it, else None."""
    named = os.environ.get(TOKENIZER_ENV)
    if named:
        if not (Path(named) / "tokenizer_config.json").is_file():
            pytest.fail(f"{TOKENIZER_ENV}={named}: no tokenizer_config.json there")
        return Path(named)
    return SHARED if (SHARED / "tokenizer_config.json").is_file() else None


@pytest.fixture
def real_tokenizer():
    directory = real_tokenizer_dir()
    if directory is None:
        pytest.skip(f"no real tokenizer: set {TOKENIZER_ENV} to its folder or put it in {SHARED}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


def make_adapter(model, directory, seed=0):
    """A LoRA adapter with non-zero B matrices, so it really changes what the model says."""
    import torch
    from peft import LoraConfig, get_peft_model

    from lawtune.config import PROJECTIONS

    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(PROJECTIONS),
                                                  task_type="CAUSAL_LM"))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.3)
    peft_model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    return make_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path_factory.mktemp("adapter"))


@pytest.fixture(scope="module")
def foreign_adapter_dir(tiny_tokenizer, tmp_path_factory):
    """An adapter trained on a model with another hidden size (32 instead of 64)."""
    return make_adapter(build_tiny_model(tiny_tokenizer, hidden_size=32), tmp_path_factory.mktemp("foreign"))


@contextmanager
def stub(answer):
    """A server whose every POST is answered by ``answer(path, body, calls)`` -> (status, JSON, headers)."""
    calls = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            calls.append((self.path, body, self.headers.get("Authorization")))
            status, payload, headers = answer(self.path, body, calls)
            data = json.dumps(payload).encode()
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", calls
    finally:
        server.shutdown()
        server.server_close()
