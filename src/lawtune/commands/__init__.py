"""The commands: one registry entry each (its config, whose docstring is its help, its own section and flags), and
one module each holding the function that runs it (``run_<name>``: the work of the command, then what it prints;
``data check`` and ``data overlap`` share ``data.py``).

The command line (``lawtune.cli``) builds every parser from this registry and the config schema; library modules
never import from here. A new command is its config class, one entry below and one module beside this file.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import config as c
from ..demo import demo_config_path


@dataclass(frozen=True)
class Command:
    """A command: its config, whose docstring is the command's help, and how the command line reads it. It runs as
    ``run_<the last word of its name>`` in the module named by the first word (``data check``: ``data.run_check``):
    the function takes the config (and ``options``) and returns an exit code. The last word of the config's title
    names the command's own section: each of its fields is a flag (``max_steps`` -> ``--max-steps``)."""

    config: type[c.Run]
    example: str
    """A ``key=value`` override the command reads, shown in its help."""
    positional: tuple[str, ...] = ()
    """Fields of the own section given as positional arguments instead of flags."""
    run_file: bool = False
    """The YAML (positional or --config) is the whole run: every section in it must be one the command reads.
    Otherwise a file given with --config is a run file lending the sections the command reads."""
    options: dict[str, str] = field(default_factory=dict)
    """Switches that change how the command treats its output folder, not the run itself (not saved with it)."""
    default_file: Path | None = None
    """The YAML read when none is given."""

    def flags(self) -> dict[str, str]:
        """Flag (or positional argument) -> the config key it sets: the shared sections' flags the command's config
        has, and one for every field of its own section."""
        section = str(self.config.model_config.get("title")).split()[-1]
        own = {name if name in self.positional else FLAG_NAMES.get(name, "--" + name.replace("_", "-")):
               f"{section}.{name}" for name in c.sections_of(self.config)[section].model_fields}
        return {flag: key for key, flag in SHARED_FLAGS.items() if key in c.valid_keys(self.config)} | own


# The flags of the sections several commands share, where a command's config has them.
SHARED_FLAGS = {"model.path": "--model", "adapter.path": "--adapter", "adapter.force": "--force",
                "adapter.prompt_format": "--prompt-format", "generation.max_new_tokens": "--max-new-tokens",
                "generation.do_sample": "--sample", "data.train": "--data", "data.format": "--format",
                "data.type": "--type"}
FLAG_NAMES = {"as_json": "--json"}  # a field called json would hide pydantic's BaseModel.json
RUN_FOLDER = {"--resume": "continue from the newest checkpoint in the output folder (only the run that wrote it)",
              "--overwrite": "start over in an output folder that holds a run (its outputs are removed first)"}

COMMANDS: dict[str, Command] = {
    "demo": Command(c.DemoRun, "train.max_steps=20", run_file=True, default_file=demo_config_path(),
                    options={"--overwrite": RUN_FOLDER["--overwrite"]}),
    "train": Command(c.TrainRun, "train.max_steps=100", run_file=True, options=RUN_FOLDER),
    "grpo": Command(c.GrpoRun, "grpo.num_generations=16", run_file=True, options=RUN_FOLDER),
    "eval": Command(c.EvalRun, "generation.top_p=0.9"),
    "predict": Command(c.PredictRun, "generation.top_p=0.9"),
    "ask": Command(c.AskRun, "generation.temperature=0.6"),
    "serve": Command(c.ServeRun, "serve.max_prompt_tokens=4096"),
    "distill": Command(c.DistillRun, "generation.temperature=0.7"),
    "merge": Command(c.MergeRun, "merge.dtype=bfloat16", options={"--overwrite": "replace a non-empty output directory"}),
    "compare": Command(c.CompareRun, "compare.html=cmp.html", positional=("report_a", "report_b")),
    "card": Command(c.CardRun, "card.report=[a.json,b.json]", positional=("path",)),
    "data check": Command(c.CheckRun, "check.prompt_format=plain", positional=("file",)),
    "data overlap": Command(c.OverlapRun, "overlap.as_json=true", positional=("a", "b")),
}
# Flags that were renamed, and what a user who still types them is told.
RENAMED = {"--force-base": "--force (skip the adapter/base check; --overwrite replaces the output)"}


def run(name: str, cfg: Any, **options: Any) -> int:
    module = importlib.import_module(f"{__name__}.{name.split()[0]}")
    return getattr(module, f"run_{name.split()[-1]}")(cfg, **options) or 0
