"""The commands: one registry entry each (its config, the function that runs it, its help and flags), and one
module each holding that function (``run_<name>``: the work of the command, then what it prints).

The command line (``lawtune.cli``) builds every parser from this registry and the config schema; library modules
never import from here. A new command is one entry below and one module beside this file.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .. import config as c


@dataclass(frozen=True)
class Command:
    config: type[c.Run]
    section: str
    """The command's own section: each of its fields is a flag (``max_steps`` -> ``--max-steps``)."""
    run: str
    """``module:function`` in this package: the function takes the config (and ``options``) and returns an exit code."""
    help: str
    example: str
    """A ``key=value`` override the command reads, shown in its help."""
    positional: tuple[str, ...] = ()
    """Fields of the own section given as positional arguments instead of flags."""
    run_file: bool = False
    """The YAML (positional or --config) is the whole run: every section in it must be one the command reads.
    Otherwise a file given with --config is a run file lending the sections the command reads."""
    options: dict[str, str] = field(default_factory=dict)
    """Switches that change how the command treats its output folder, not the run itself (not saved with it)."""
    default_file: Callable[[], Path] | None = None

    def handler(self) -> Callable[..., int]:
        module, function = self.run.split(":")
        return getattr(importlib.import_module(f"{__name__}.{module}"), function)

    def flags(self) -> dict[str, str]:
        """Flag (or positional argument) -> the config key it sets: the shared sections' flags the command's config
        has, and one for every field of its own section."""
        keys = c.valid_keys(self.config)
        own = [f"{self.section}.{name}" for name in c.sections_of(self.config)[self.section].model_fields]
        return {**{flag: key for key, flag in SHARED_FLAGS.items() if key in keys},
                **{(name if name in self.positional else FLAG_NAMES.get(name, "--" + name.replace("_", "-"))): key
                   for key, name in ((key, key.split(".")[1]) for key in own)}}


def demo_config_path() -> Path:
    return Path(str(resources.files("lawtune") / "assets" / "demo.yaml"))


# The flags of the sections several commands share, where a command's config has them.
SHARED_FLAGS = {"model.path": "--model", "adapter.path": "--adapter", "adapter.force": "--force",
                "adapter.prompt_format": "--prompt-format", "generation.max_new_tokens": "--max-new-tokens",
                "generation.do_sample": "--sample", "data.train": "--data", "data.format": "--format"}
FLAG_NAMES = {"as_json": "--json"}  # a field called json would hide pydantic's BaseModel.json
RUN_FOLDER = {"--resume": "continue from the newest checkpoint in the output folder (only the run that wrote it)",
              "--overwrite": "start over in an output folder that holds a run (its outputs are removed first)"}

COMMANDS: dict[str, Command] = {
    "demo": Command(c.TrainRun, "train", "demo:run_demo", "offline CPU demo: tiny random model trained on bundled "
                    "questions", "train.max_steps=20", run_file=True, default_file=demo_config_path,
                    options={"--overwrite": RUN_FOLDER["--overwrite"]}),
    "train": Command(c.TrainRun, "train", "train:run_train", "LoRA SFT from a YAML config", "train.max_steps=100",
                     run_file=True, options=RUN_FOLDER),
    "grpo": Command(c.GrpoRun, "grpo", "grpo:run_grpo", "GRPO on the exact-set reward (TRL), continuing an SFT "
                    "adapter or a fresh LoRA", "grpo.num_generations=16", run_file=True, options=RUN_FOLDER),
    "eval": Command(c.EvalRun, "eval", "eval:run_eval", "score a model (and adapter) on a JEC-QA, AGIEval or LawBench "
                    "file", "generation.top_p=0.9"),
    "predict": Command(c.PredictRun, "predict", "infer:run_predict", "answer every question of a file without "
                       "answers (JSON Lines, resumable)", "generation.top_p=0.9"),
    "ask": Command(c.AskRun, "ask", "infer:run_ask", "answer one question, streaming the reasoning (interactive "
                   "without --question)", "generation.temperature=0.6"),
    "serve": Command(c.ServeRun, "serve", "serve:run_serve", "OpenAI-compatible HTTP API and a question page at /",
                     "serve.max_prompt_tokens=4096"),
    "distill": Command(c.DistillRun, "distill", "distill:run_distill", "sample reasoning per question, keep the "
                       "traces that reach the gold answer (to train on)", "generation.temperature=0.7"),
    "merge": Command(c.MergeRun, "merge", "merge:run_merge", "merge a LoRA adapter into its base model (plain "
                     "transformers directory)", "merge.dtype=bfloat16",
                     options={"--overwrite": "replace a non-empty output directory"}),
    "compare": Command(c.CompareRun, "compare", "compare:run_compare", "compare two eval reports (flips, McNemar, "
                       "bootstrap CIs)", "compare.html=cmp.html", positional=("report_a", "report_b")),
    "data check": Command(c.CheckRun, "check", "data:run_check", "validate a question file (JEC-QA, AGIEval, "
                          "LawBench) and print what it holds", "check.prompt_format=plain", positional=("file",)),
    "data overlap": Command(c.OverlapRun, "overlap", "data:run_overlap", "how many questions of file B are in file A "
                            "(statement and options, any formats); --exclude-output writes B without them", "overlap.as_json=true", positional=("a", "b")),
}
# Flags that were renamed, and what a user who still types them is told.
RENAMED = {"--force-base": "--force (skip the adapter/base check; --overwrite replaces the output)"}


def run(name: str, cfg: Any, **options: Any) -> int:
    return COMMANDS[name].handler()(cfg, **options) or 0
