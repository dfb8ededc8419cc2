"""Every callback of a training run: the stop on SIGTERM, progress and metrics.jsonl, held-out evaluation with the
best model kept, and short garbage-collection pauses."""

from __future__ import annotations

import gc
import json
import logging
import time
from functools import partial
from pathlib import Path

from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback

from ..card import write_card
from ..config import replace as replace_config
from ..dist import any_rank, cpu_group, gather_objects, is_main_process, sum_over_ranks, world_size
from ..generation import engine_holder
from ..preempt import Sigterm
from ..progress import progress
from ..rundir import MANIFEST_FILE, give_weights_default_mode, save_model_dir

log = logging.getLogger("lawtune")


class StopOnSigterm(TrainerCallback):
    """Ends training at the end of the optimizer step in which SIGTERM came (``sigterm``, installed by the command
    around setup and training), on every rank at the same step: the ranks OR their flags after every step, in one
    all-reduce of one integer on the CPU. The step is saved as a checkpoint, unless it is the first step of this
    session (a job ended that soon has nothing worth the time a save takes). Comes before the other callbacks:
    they see ``control.should_training_stop`` and skip what a stopping job has no time for (an evaluation due at
    that step runs first thing when the run is resumed)."""

    def __init__(self, sigterm: Sigterm):
        self.sigterm = sigterm
        self.first_step: int | None = None
        self.stopped_at: int | None = None
        self.saved = False
        self.group = None  # dist.cpu_group(), made at the first look under DDP
        self.grouped = False

    def requested(self) -> bool:
        """Whether some rank received SIGTERM; every rank calls this at the same points."""
        if world_size() > 1 and not self.grouped:
            self.group, self.grouped = cpu_group(), True
        return any_rank(self.sigterm.received, self.group)

    def on_train_begin(self, args, state, control, **kwargs):
        self.first_step = state.global_step + 1

    def on_step_end(self, args, state, control, **kwargs):
        if not self.requested():
            return
        self.stopped_at = state.global_step
        control.should_training_stop = True
        control.should_log = True  # the loss since the last log row is not lost
        if self.first_step is not None and state.global_step > self.first_step:
            control.should_save = True
        self.saved = control.should_save  # the flow callback (first in the list) may save this step anyway


class MetricsCallback(TrainerCallback):
    """Progress bar with loss, lr and tokens/s, and one JSON line per log in metrics.jsonl.

    ``tokens_seen`` counts the whole run: a resumed run goes on from the count saved in its checkpoint. The
    Trainer's ``train_samples_per_second`` counts micro-batches; with a token budget one micro-batch holds many
    examples, so it is replaced by the examples trained per second."""

    def __init__(self, path: Path, append: bool, counter=None):
        self.path = path
        self.counter = counter  # a CountingCollator: tokens counted on the CPU, else the Trainer's count
        self.base = 0  # tokens trained before this session (a resumed run), with a counter
        if not append and path.exists() and is_main_process():
            path.unlink()
        self.bar = None
        self.last = (0, time.time())

    def seen(self, state) -> int:
        """Real tokens trained so far, all ranks together. Every rank calls this at the same points (train
        begin and each loss log), so the sum across ranks is one small all-reduce per log, not per step."""
        if self.counter is None:
            return state.num_input_tokens_seen
        return self.base + sum_over_ranks(self.counter.tokens)

    def write(self, row: dict) -> None:
        if is_main_process():
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")

    def on_train_begin(self, args, state, control, **kwargs):
        if is_main_process():
            self.bar = progress(total=state.max_steps, initial=state.global_step, desc="train", unit="step")
        if self.counter is not None:
            self.base = state.num_input_tokens_seen  # loaded from the checkpoint when resuming, else 0
        self.last = (self.seen(state), time.time())

    def on_save(self, args, state, control, **kwargs):
        if is_main_process():  # the checkpoint the Trainer has just written
            give_weights_default_mode(Path(args.output_dir) / f"checkpoint-{state.global_step}")

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)
        # The flow callback has decided already whether this step saves a checkpoint (every rank alike): the
        # count goes into the state the checkpoint keeps, which is what a resumed run goes on from.
        if self.counter is not None and control.should_save:
            state.num_input_tokens_seen = self.seen(state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        now = time.time()
        tokens, then = self.last
        if "loss" in logs and now > then:
            seen = self.seen(state)
            logs["tokens_per_s"] = round((seen - tokens) / (now - then), 1)
            self.last = (seen, now)
            # cumulative trained tokens (all ranks) and wall time, so any interval's rate can be checked
            logs["tokens_seen"] = seen
            logs["time"] = round(now, 3)
        if "train_samples_per_second" in logs and logs.get("train_runtime") and self.counter is not None:
            logs["train_samples_per_second"] = round(sum_over_ranks(self.counter.examples) / logs["train_runtime"], 3)
        row = {"step": state.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float))}}
        self.write(row)
        if self.bar is not None and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs.get('learning_rate', 0):.2e}",
                                 tok_s=f"{logs.get('tokens_per_s', 0):.0f}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()


class HeldOutEvalCallback(TrainerCallback):
    """Score the live model in-process on the held-out split; keep the best adapter."""

    def __init__(self, cfg, records: list, tokenizer, metrics: MetricsCallback, out: Path, manifest: dict):
        self.cfg, self.records, self.tokenizer = cfg, records, tokenizer
        self.metrics, self.out, self.manifest = metrics, out, manifest
        self.best = -1.0
        self.history: list[dict] = []
        self.trainer: Trainer | None = None  # set once the Trainer exists; saving goes through it (FSDP gathers there)
        # The evaluations' generation engine, kept from one to the next and closed when training ends (GRPO's
        # rollouts share it: one engine with the rows of both).
        self.engines = engine_holder(tokenizer, self.settings()[1], fold=self.folds())

    def _run(self, state, model) -> None:
        from ..evaluate import evaluate_sharded

        was_training = model.training
        model.eval()
        ecfg, gcfg = self.settings()
        _, summary = evaluate_sharded(model, self.tokenizer, self.records, ecfg, gcfg, self.cfg.data.prompt_format,
                                      engines=self.engines)
        if was_training:
            model.train()
        row = {"step": state.global_step, "eval_accuracy": summary["accuracy"], "eval_invalid": summary["invalid"],
               "eval_n": summary["n"], "eval_mode": ecfg.mode}
        self.history.append(row)
        self.metrics.write(row)
        state.log_history.append(dict(row))
        if is_main_process():
            tqdm.write(f"[eval] step {state.global_step}: accuracy {summary['accuracy']:.3f} "
                       f"on {summary['n']} held-out questions ({ecfg.mode}), invalid {summary['invalid']}")
        # Every rank holds the same gathered summary, so every rank takes the same branch here.
        if summary["accuracy"] > self.best:
            self.best = summary["accuracy"]
            manifest = {**self.manifest, "best": {"step": state.global_step, "eval_accuracy": self.best}}
            save_model_dir(model, self.tokenizer, self.cfg, manifest, self.out / "best_model", trainer=self.trainer,
                           card=partial(write_card, run_dir=self.out))

    def settings(self):
        """(EvalConfig, GenerationConfig) of the evaluation. Reasoning runs thousands of tokens a question: during SFT
        the cheap modes are used."""
        mode = self.cfg.eval.mode if self.cfg.eval.mode != "reasoning" else "direct"
        return replace_config(self.cfg.eval, mode=mode), self.cfg.generation

    def folds(self) -> bool:
        """Whether the engine samples the adapter folded into an inference copy (``EngineHolder``'s ``fold``): SFT's
        evaluations use the cheap modes, a few tokens a question, where the copy would cost more than it saves."""
        return False

    def interval(self) -> int:
        """Steps between evaluations; 0 = only at the end."""
        return self.cfg.train.eval_steps

    def due(self, step: int, max_steps: int) -> bool:
        """Whether an evaluation is due at ``step`` before the end (the one at the end is ``final``'s)."""
        steps = self.interval()
        return bool(steps) and 0 < step < max_steps and step % steps == 0

    def evaluated(self, step: int) -> bool:
        return any(row["step"] == step for row in self.history)

    def restore(self, step: int) -> None:
        """A resumed run's evaluations up to its checkpoint's ``step`` (metrics.jsonl) and the accuracy best_model/
        holds, as rank 0 reads them: the summary and the best adapter cover the whole run, not this session."""
        if step == 0:
            return
        history: list[dict] = []
        best = -1.0
        if is_main_process():
            rows = {}
            if self.metrics.path.is_file():
                for line in self.metrics.path.read_text(encoding="utf-8").splitlines():
                    try:
                        row = json.loads(line)
                    except ValueError:  # a line cut off when a process was killed while writing it
                        continue
                    if "eval_accuracy" in row and row["step"] <= step:  # later rows: steps this run does again
                        rows[row["step"]] = row
            history = [rows[k] for k in sorted(rows)]
            best = max((row["eval_accuracy"] for row in history), default=-1.0)
            kept = self.out / "best_model" / MANIFEST_FILE
            if kept.is_file():
                saved = json.loads(kept.read_text(encoding="utf-8")).get("best") or {}
                if saved.get("step", step + 1) <= step:
                    best = saved["eval_accuracy"]
        self.history, self.best = gather_objects((history, best))[0]

    def final(self, state, model) -> None:
        """The evaluation at the end of the run (where the last step has none yet)."""
        if self.records and not self.evaluated(state.global_step):
            self._run(state, model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.restore(state.global_step)
        # a resumed run whose last session stopped on SIGTERM before the evaluation of its last step runs it now
        if self.records and self.due(state.global_step, state.max_steps) and not self.evaluated(state.global_step):
            self._run(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # should_training_stop: the last step (``final`` evaluates it) or a stop on SIGTERM
        if self.records and not control.should_training_stop and self.due(state.global_step, state.max_steps):
            self._run(state, model)

    def close(self) -> None:
        """Give the evaluations' engine back (its cache, graphs and model reference)."""
        self.engines.close()


class GcPauses(TrainerCallback):
    """Keeps Python's full garbage collections short during training, and says on rank 0 how long they were.

    A full (generation-2) collection stops its process for as long as it takes to walk every tracked object:
    the tokenized data set, the model's modules, the optimizer's state and, with ``train.compile``, the
    compiled graphs. In a DDP run of the 1.5B model on two H100s each rank ran two; the longest, during the
    first (compiling) step, took 691 and 591 ms. Under DDP the other ranks wait for such a pause in the next
    all-reduce. What is alive when training starts, and what the first step builds, lives until training
    ends, so it is collected once and frozen (``gc.freeze``: left out of later collections, which then walk
    only what training allocates since); unfrozen when training ends.
    """

    def __init__(self) -> None:
        self.pauses: list[tuple[int, float]] = []  # (optimizer step, milliseconds)
        self.step, self.frozen, self.forced = 0, False, False
        self.started: float | None = None
        self.first_step: int | None = None

    def _on_gc(self, phase: str, info: dict) -> None:
        if info.get("generation") != 2 or self.forced:  # only the collections Python started itself
            return
        if phase == "start":
            self.started = time.perf_counter()
        elif self.started is not None:
            self.pauses.append((self.step, 1000 * (time.perf_counter() - self.started)))
            self.started = None

    def _freeze(self) -> None:
        self.forced = True
        gc.collect()
        self.forced = False
        gc.freeze()
        self.frozen = True

    def on_train_begin(self, args, state, control, **kwargs):
        self.step = self.first_step = state.global_step
        self._freeze()
        gc.callbacks.append(self._on_gc)

    def on_step_end(self, args, state, control, **kwargs):
        self.step = state.global_step
        if self.first_step is not None and self.step == self.first_step + 1:  # compiled graphs and optimizer state exist now
            self._freeze()

    def on_train_end(self, args, state, control, **kwargs):
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        if self.frozen:
            gc.unfreeze()
            self.frozen = False
        ranks = gather_objects(self.pauses)
        if is_main_process():
            for rank, pauses in enumerate(ranks):
                longest = ", ".join(f"{ms:.0f} ms at step {step}" for step, ms in sorted(pauses, key=lambda p: -p[1])[:3])
                log.info("%s%d full Python garbage collections during training%s",
                         f"rank {rank}: " if len(ranks) > 1 else "", len(pauses), f" (longest: {longest})" if pauses else "")
