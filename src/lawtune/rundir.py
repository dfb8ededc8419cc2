"""Reading and writing a run directory: model directories (adapter, tokenizer, config, manifest), what an
adapter says about how it was trained, and whether evaluated questions were trained on.

A model directory written by lawtune holds ``lawtune_config.yaml`` (the resolved run config and the working directory
its relative paths are read from) and ``data_manifest.json`` (files, sha256, split, prompt format, the hashed
questions trained on); a merged model holds ``lawtune_merge.json`` (base, adapter and the sha256 of the adapter's
weights, so that the adapter is not applied to it a second time).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from .config import (
    MODEL_DIR,
    MUTATING_INITS,
    WORKING_DIR,
    DecidesWeights,
    GrpoRun,
    looks_like_hub_id,
    path_fields,
    read_from,
    save_config,
    sections_of,
)
from .data import Record, legacy_statement_key, question_key, sha256_file, statement_key
from .errors import UsageError

log = logging.getLogger("lawtune")

CONFIG_FILE = "lawtune_config.yaml"
MANIFEST_FILE = "data_manifest.json"
MERGE_INFO = "lawtune_merge.json"
# The adapters of a run with lora.init pissa or olora as they started (before any step): what the saved adapters are
# converted against, to a plain LoRA of the original base.
INITIAL_ADAPTER = "initial_adapter"


# A manifest's ``train_statements_key`` says which key its ``train_statements_sha256`` are hashes of: the statement
# and the option texts (now), the folded statement alone (``normalized-1``), or, where it says nothing, the
# whitespace-free statement.
STATEMENT_KEY_VERSION = "statement-options-1"
STATEMENT_ONLY_VERSIONS = ("normalized-1", None)
_KEYS = {STATEMENT_KEY_VERSION: question_key, "normalized-1": statement_key, None: legacy_statement_key}


def statement_hash(record: Record, version: str | None = STATEMENT_KEY_VERSION) -> str:
    """A short hash of a record's key (of that manifest version): what a manifest keeps of the questions trained on."""
    return hashlib.sha256(_KEYS[version](record).encode("utf-8")).hexdigest()[:16]


def default_file_mode() -> int:
    """The mode a file created now gets: 0666 less the umask (0644 under the usual 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def give_weights_default_mode(directory: str | Path) -> None:
    """safetensors (0.8 and later) writes a file through a temporary one, created 0600, and renames it: the weights
    lawtune has just written in ``directory`` get the mode of the other files it writes."""
    mode = default_file_mode()
    for file in Path(directory).glob("*.safetensors"):
        os.chmod(file, mode)


WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def adapter_sha256(adapter: str | Path) -> str | None:
    """sha256 of an adapter's weights file (None where it has none)."""
    return next((sha256_file(Path(adapter) / name) for name in WEIGHT_FILES if (Path(adapter) / name).is_file()), None)


def merge_info(model_path: str | Path | None) -> dict:
    """A merged model's lawtune_merge.json ({} for any other model)."""
    info = Path(model_path) / MERGE_INFO if model_path else None
    if info is None or not info.is_file():
        return {}
    try:
        found = json.loads(info.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return {}
    return found if isinstance(found, dict) else {}


def save_model_dir(model, tokenizer, cfg, manifest: dict, dest: Path, trainer=None,
                   card: Callable[[Path], object] | None = None) -> Path:
    """Write adapter + tokenizer + config + manifest atomically: a crash never leaves half a model. ``card`` writes
    the folder's README.md (lawtune's model card, over peft's and TRL's template) before it is published.

    With a trainer, every rank must call this: Trainer.save_model gathers sharded (FSDP) weights
    collectively and writes on the main process only.
    """
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp")
    if trainer is not None:
        if trainer.is_world_process_zero() and tmp.exists():
            shutil.rmtree(tmp)
        trainer.accelerator.wait_for_everyone()
        trainer.save_model(str(tmp))
        if not trainer.is_world_process_zero():
            trainer.accelerator.wait_for_everyone()
            return dest
        (tmp / "training_args.bin").unlink(missing_ok=True)
        # only the main process wrote the starting adapters (and only it converts)
        initial = initial_adapter(cfg, dest.parent)
        if initial is not None:
            save_converted(trainer.model, tmp, initial)
    else:
        if tmp.exists():
            shutil.rmtree(tmp)
        initial = initial_adapter(cfg, dest.parent)
        if initial is not None:
            save_converted(model, tmp, initial)
        else:
            model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    give_weights_default_mode(tmp)
    save_config(cfg, tmp / CONFIG_FILE)
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, ensure_ascii=False, indent=1), encoding="utf-8")
    if card is not None:
        card(tmp)
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old)
    else:
        os.replace(tmp, dest)
    if trainer is not None:
        trainer.accelerator.wait_for_everyone()
    return dest


def initial_adapter(cfg, out: Path) -> Path | None:
    """Where a run whose LoRA starts from the base weights (lora.init pissa or olora) keeps its adapters as they
    started; None for any other run."""
    lora = getattr(cfg, "lora", None)
    if lora is None or lora.init not in MUTATING_INITS:
        return None
    path = Path(out) / INITIAL_ADAPTER
    if not (path / "adapter_config.json").is_file():
        raise UsageError(f"{path}: missing (lora.init={lora.init} saves its adapters converted against it); "
                         f"start the run again with --overwrite")
    return path


def save_converted(model, dest: Path, initial: Path) -> None:
    """Save a lora.init pissa or olora adapter as a plain LoRA of the original base (peft's conversion: the trained
    adapters beside the starting ones negated, twice the rank), which loads and merges on that base exactly."""
    with warnings.catch_warnings():
        # peft loads the starting adapters beside the trained ones to convert, and warns that pissa/olora do not mix
        # with other adapters: the warning the conversion answers
        warnings.filterwarnings("ignore", message=".*changes the base weights", category=UserWarning)
        model.save_pretrained(dest, path_initial_model_for_weight_conversion=str(initial))


def save_initial_adapter(model, out: Path, resume: bool) -> None:
    """Keep the adapters of a lora.init pissa or olora run as they start, for ``save_model_dir`` to convert the
    trained ones against (peft's path_initial_model_for_weight_conversion). Saved as peft documents it: with
    init_lora_weights True, so that loading it does not take the start out of the base again. A resumed run keeps
    the one its first session saved."""
    path = Path(out) / INITIAL_ADAPTER
    if resume and (path / "adapter_config.json").is_file():
        return
    config = model.peft_config["default"]
    init, config.init_lora_weights = config.init_lora_weights, True
    try:
        model.save_pretrained(path)
    finally:
        config.init_lora_weights = init
    give_weights_default_mode(path)


def _run_config(directory: str | Path | None) -> dict:
    """The raw lawtune_config.yaml of a model directory ({} where there is none). Read leniently: adapters
    written by every lawtune release must still load."""
    if not directory:
        return {}
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        return {}
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return raw if isinstance(raw, dict) else {}


def adapter_prompt_format(adapter: str | None) -> str | None:
    """The prompt format an adapter was trained with, where it says."""
    return (_run_config(adapter).get("data") or {}).get("prompt_format")


def adapter_quantization(adapter: str | None) -> str:
    """none, or 4bit for a QLoRA adapter."""
    return str((_run_config(adapter).get("model") or {}).get("quantization") or "none")


def resolve_prompt_format(model_path: str, adapter: str | None, override: str | None = None) -> str:
    """The format given, else the adapter's, else a merged model's, else chat."""
    return override or adapter_prompt_format(adapter) or merge_info(model_path).get("prompt_format") or "chat"


def adapter_base(adapter: str | Path) -> tuple[str, Path]:
    """(the base model an adapter records, the file that records it): its lawtune_config.yaml's model.path, else
    peft's base_model_name_or_path in adapter_config.json. A relative path is read from the folder of the run that
    wrote it (the run file's working_dir; the current directory for a run file written before it was recorded)."""
    directory = Path(adapter)
    if not directory.is_dir():
        raise UsageError(f"{adapter}: adapter directory does not exist (pass --adapter DIR, e.g. outputs/RUN/final_model)")
    raw = _run_config(directory)
    recorded = raw.get(WORKING_DIR)
    folder = recorded if isinstance(recorded, str) else os.getcwd()
    found = [(directory / CONFIG_FILE, "model.path", (raw.get("model") or {}).get("path"))]
    peft_file = directory / "adapter_config.json"
    if peft_file.is_file():
        try:
            peft_config = json.loads(peft_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            peft_config = {}
        found.append((peft_file, "base_model_name_or_path", peft_config.get("base_model_name_or_path")))
    for file, key, written in found:
        if not isinstance(written, str) or not written:
            continue
        base = read_from(folder, written, MODEL_DIR)
        if not os.path.exists(base) and not looks_like_hub_id(base):
            relative = f" (relative to {folder})" if base != written else ""
            raise UsageError(f"{file}: {key} {written}{relative}: model directory does not exist; pass --model DIR")
        return base, file
    raise UsageError(f"model.path: no base model given and {adapter} records none (pass --model DIR)")


def training_overlap(adapter: str | None, records: list[Record]) -> tuple[int, str | None]:
    """(how many evaluated questions are in the adapter's training split, the manifest's key version). A manifest
    of a version in ``STATEMENT_ONLY_VERSIONS`` holds statements alone: it is checked by statement."""
    if not adapter:
        return 0, None
    manifest_path = Path(adapter) / MANIFEST_FILE
    if not manifest_path.is_file():
        return 0, None
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    trained = set(manifest.get("train_statements_sha256", []))
    version = manifest.get("train_statements_key")
    if version not in _KEYS:
        log.warning("%s: statement key %r is not one this lawtune knows (%s); the training-split check is skipped",
                    manifest_path, version, ", ".join(str(v) for v in _KEYS if v))
        return 0, version
    return sum(statement_hash(r, version) in trained for r in records), version


# ----------------------------------------------------------------------------- a training run's output folder

def weight_fields(cfg) -> list[tuple[str, Any, DecidesWeights]]:
    """(dotted key, value, marker) of every field marked as deciding a training run's weights."""
    out = []
    for name in sections_of(type(cfg)):
        section = getattr(cfg, name)
        for key, f in type(section).model_fields.items():
            out += [(f"{name}.{key}", getattr(section, key), m) for m in f.metadata if isinstance(m, DecidesWeights)]
    return out


def resolve_output_dir(cfg) -> Path:
    """A training run's output folder (``train.output_dir``, or ``grpo.output_dir`` for `lawtune grpo`)."""
    chosen = cfg.grpo.output_dir if isinstance(cfg, GrpoRun) else cfg.train.output_dir
    if chosen:
        return Path(chosen)
    stem = Path(cfg.source).stem if cfg.source else "run"
    return Path("outputs") / stem


RUN_FILE = "lawtune_run.json"
# What training writes into its output folder (a fresh run with --overwrite removes these, nothing else).
RUN_OUTPUTS = ("final_model", "best_model", "metrics.jsonl", "curves.png", "runs", "data", INITIAL_ADAPTER, RUN_FILE)


def run_fingerprint(cfg) -> dict:
    """What decides a training run's weights: every config field marked so (``config.DecidesWeights``: the base
    model, the data files by content, the split, LoRA, the prompt format, a continued adapter). A checkpoint
    continues only the run it came from. A path is recorded absolute (a hub id as written): the same run started
    from another folder is the same run."""
    out: dict = {}
    paths = path_fields(type(cfg))
    for key, value, mark in weight_fields(cfg):
        if mark.value:
            out[key] = read_from(os.getcwd(), value, paths[key]) if key in paths and isinstance(value, str) else value
        if mark.content is not None:
            path = Path(value) / mark.content if value and mark.content else Path(value) if value else None
            out[f"{key} sha256"] = sha256_file(path) if path and path.is_file() else None
    return out


def holds_a_run(out: Path) -> bool:
    """Checkpoints or a final model: what --resume would continue from or a new run would mix with."""
    return out.is_dir() and (any(out.glob("checkpoint-*")) or (out / "final_model").exists())


def prepare_run_dir(out: Path, cfg, resume: bool, overwrite: bool, main: bool = True) -> None:
    """Refuse to mix two runs in one folder: a fresh run into a folder that holds one needs --overwrite (which
    removes the old run's outputs first); --resume needs the same fingerprint as the run it continues."""
    fingerprint = run_fingerprint(cfg)
    from .config import ConfigError

    if resume and overwrite:
        raise ConfigError("train: --resume continues the run in the output folder, --overwrite replaces it: give one")
    if resume:
        path = out / RUN_FILE
        if path.is_file():
            before = json.loads(path.read_text(encoding="utf-8"))
            # a key that an older run file lacks (a field added since) compares as the field's default
            defaults = run_fingerprint(type(cfg)())
            before = {**defaults, **before}
            # an older run file holds paths as given: read from the current folder, as that run read them
            for key, mark in path_fields(type(cfg)).items():
                if isinstance(before.get(key), str):
                    before[key] = read_from(os.getcwd(), before[key], mark)
            differs = [k for k in fingerprint if before.get(k) != fingerprint[k]]
            if differs:
                raise ConfigError(f"{out}: --resume would continue a run with another {', '.join(differs)} "
                                  f"(was {before.get(differs[0])!r}, now {fingerprint[differs[0]]!r}); "
                                  f"use another output folder or --overwrite")
    elif holds_a_run(out):
        if not overwrite:
            raise ConfigError(f"{out}: holds a run already (checkpoints or final_model); pass --resume to continue "
                              f"it or --overwrite to start over there")
        if main:
            for old in [*out.glob("checkpoint-*"), *(out / name for name in RUN_OUTPUTS)]:
                if old.is_dir():
                    shutil.rmtree(old)
                elif old.exists():
                    old.unlink()
    if main:
        out.mkdir(parents=True, exist_ok=True)
        text = json.dumps(fingerprint, ensure_ascii=False, indent=1)
        path = out / RUN_FILE
        if not path.is_file() or path.read_text(encoding="utf-8") != text:  # a resumed run leaves it as it was
            path.write_text(text, encoding="utf-8")


TRAINER_STATE = "trainer_state.json"  # what the Trainer writes last into a checkpoint
FINAL_STEPS = "trained_steps"  # final_model's manifest: the optimizer steps it was trained for


class RunFinished(Exception):
    """--resume of a run that has reached its max_steps: nothing to do. The message says so."""


def checkpoint_step(checkpoint: str | Path | None) -> int:
    """The optimizer step a Trainer checkpoint was saved at (0 for none)."""
    if checkpoint is None:
        return 0
    return int(json.loads((Path(checkpoint) / TRAINER_STATE).read_text(encoding="utf-8"))["global_step"])


def newest_checkpoint(out: Path, say: bool = False) -> Path | None:
    """The newest whole checkpoint in ``out``. One without the Trainer's state was cut short while saving (the
    process was killed): it is passed over (and, with ``say``, said)."""
    numbered = sorted(((int(p.name.split("-", 1)[1]), p) for p in out.glob("checkpoint-*")
                       if p.is_dir() and p.name.split("-", 1)[1].isdigit()), reverse=True)
    for _, path in numbered:
        if (path / TRAINER_STATE).is_file():
            return path
        if say:
            log.warning("%s: incomplete (no %s: its save was cut short); passed over", path, TRAINER_STATE)
    return None


def finished_step(out: Path) -> int | None:
    """The step a run in ``out`` ended at, once its final model was written from its newest checkpoint; None while
    training (or writing the final model) is left to do."""
    manifest = out / "final_model" / MANIFEST_FILE
    if not manifest.is_file():
        return None
    newest = checkpoint_step(newest_checkpoint(out))
    # final models written before lawtune recorded their steps: the newest checkpoint's
    trained = json.loads(manifest.read_text(encoding="utf-8")).get(FINAL_STEPS, newest)
    return trained if trained >= newest else None


def resume_checkpoint(out: Path, resume: bool) -> str | None:
    """The checkpoint ``--resume`` continues from: the newest whole one in ``out`` (None, said, where there is
    none)."""
    if not resume:
        return None
    checkpoint = newest_checkpoint(out, say=True) if out.is_dir() else None
    if checkpoint:
        log.info("resuming from %s", checkpoint)
    else:
        log.warning("--resume: no checkpoint in %s, starting from scratch", out)
    return str(checkpoint) if checkpoint else None


def append_jsonl(path: Path, rows: list[dict]) -> None:
    """Rows appended to a JSON Lines file and synced to disk: a crash loses at most the rows being written (the
    resumable outputs of distill and of eval on a served model)."""
    with open(path, "a", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
