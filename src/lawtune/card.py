"""The model card of a model lawtune wrote: ``README.md`` in the Hugging Face format, in place of the template peft
and TRL write (``base_model: /local/path``, "[More Information Needed]").

Its metadata (``huggingface_hub.ModelCardData``) names the base model where it is a hub id, the library, the training
files, the base's license where it is known locally and, as ``model-index``, the results of the eval reports named;
its text says how the model was trained (config, data files with their sha256, steps, tokens), the held-out curve,
the reports' tables and whether the evaluated questions were in the training split. It is written into every
``final_model/`` and ``best_model/`` of `train` and `grpo`, into a `merge` output, and by `lawtune card`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from . import __version__
from .compare import load_report
from .config import MODEL_DIR, MUTATING_INITS, WORKING_DIR, looks_like_hub_id, read_from
from .data import DataError, load_records, sha256_file
from .errors import UsageError
from .rundir import CONFIG_FILE, FINAL_STEPS, MANIFEST_FILE, merge_info, training_overlap

CARD_FILE = "README.md"
CURVES_FILE = "curves.png"
METRICS_FILE = "metrics.jsonl"
# What the metadata's model-index calls the task every report scores.
TASK = ("multiple-choice", "Chinese legal exam questions (exact-set scoring)")


def _read_json(path: Path) -> dict:
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _read_run_config(directory: Path) -> dict:
    """The raw lawtune_config.yaml of a model directory ({} where there is none), read leniently as every release
    wrote it."""
    path = directory / CONFIG_FILE
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, yaml.YAMLError):
        return {}
    return raw if isinstance(raw, dict) else {}


def _metrics_rows(run_dir: Path | None) -> list[dict]:
    path = run_dir / METRICS_FILE if run_dir else None
    if path is None or not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a line cut off when a process was killed while writing it
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def base_license(base: str) -> str | None:
    """The license the base model's own card declares, where that card is on this machine (a local folder's
    README.md, or a hub id's README.md in the Hugging Face cache); nothing is downloaded."""
    from huggingface_hub import ModelCard, try_to_load_from_cache

    readme: Any = Path(base) / CARD_FILE
    if not readme.is_file():
        readme = try_to_load_from_cache(base, CARD_FILE) if looks_like_hub_id(base) else None
    if not isinstance(readme, (str, Path)) or not Path(readme).is_file():
        return None
    try:
        found = ModelCard.load(Path(readme)).data.license
    except Exception:  # a base card whose front matter huggingface_hub cannot read: the license stays unknown
        return None
    return found if isinstance(found, str) and found else None


def _report_format(summary: dict, data: Path | None) -> str:
    """jecqa, agieval or lawbench: what the report says, else what its data file is read as."""
    if summary.get("format") in ("jecqa", "agieval", "lawbench"):
        return str(summary["format"])
    if "lawbench_score" in summary:
        return "lawbench"
    if data is not None:
        try:
            records = load_records(data, require_answer=False, max_samples=1).records
        except DataError:
            records = []
        if records:
            return records[0].format
    return "jecqa"


def _report_data(summary: dict, report_path: Path) -> Path | None:
    """The report's data file, where it is still here: as written (from the current folder), else beside the
    report."""
    written = summary.get("data")
    if not isinstance(written, str) or not written:
        return None
    for candidate in (Path(written), report_path.parent / written):
        if candidate.is_file():
            return candidate
    return None


def _pct(value: Any) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, (int, float)) else "–"


def _acc(part: Any) -> str:
    if not isinstance(part, dict) or not part.get("n"):
        return "–"
    return f"{_pct(part.get('accuracy'))} (n={part['n']})"


def run_holding(model_dir: Path) -> Path | None:
    """The training run's folder a model folder is in (its final_model/ or best_model/), else None."""
    parent = model_dir.parent
    return parent if (parent / METRICS_FILE).is_file() or (parent / "final_model").is_dir() else None


class _Source:
    """What a model directory says about how it was made: its own run files, or for a merged model those of the
    adapter it was merged from (where that folder is still here)."""

    def __init__(self, model_dir: Path, run_dir: Path | None):
        self.model_dir = model_dir
        self.merge = merge_info(model_dir)
        self.adapter_dir = model_dir
        if self.merge:
            adapter = read_from(self.merge.get(WORKING_DIR) or os.getcwd(), str(self.merge.get("adapter") or ""),
                                MODEL_DIR)
            self.adapter_dir = Path(adapter)
            run_dir = run_dir or run_holding(self.adapter_dir)
        self.run_dir = run_dir
        self.config = _read_run_config(self.adapter_dir)
        self.manifest = _read_json(self.adapter_dir / MANIFEST_FILE)
        self.is_adapter = (model_dir / "adapter_config.json").is_file()
        self.command = "grpo" if "grpo" in self.config else "train" if "train" in self.config else None

    def base(self) -> str | None:
        """The base model as its run recorded it (a relative path read from the run's folder)."""
        if self.merge and self.merge.get("base_model"):
            return read_from(self.merge.get(WORKING_DIR) or os.getcwd(), str(self.merge["base_model"]), MODEL_DIR)
        written = (self.config.get("model") or {}).get("path")
        if not isinstance(written, str) or not written:
            written = _read_json(self.model_dir / "adapter_config.json").get("base_model_name_or_path")
            if not isinstance(written, str) or not written:
                return None
        return read_from(self.config.get(WORKING_DIR) or os.getcwd(), written, MODEL_DIR)

    def steps(self) -> int | None:
        best = self.manifest.get("best") or {}
        for value in (self.manifest.get(FINAL_STEPS), best.get("step") if isinstance(best, dict) else None):
            if isinstance(value, int):
                return value
        return None

    def training_files(self) -> list[dict]:
        return [f for f in self.manifest.get("files") or [] if isinstance(f, dict) and f.get("role") in ("train", "mix")]


def _eval_results(reports: list[tuple[Path, dict]]):
    from huggingface_hub import EvalResult

    results = []
    for path, report in reports:
        s = report["summary"]
        data = _report_data(s, path)
        name = Path(str(s.get("data") or path)).name
        # huggingface_hub groups results by task, dataset type, config, split and revision (not by name): the file's
        # sha256 (else its name) as the revision keeps two files of one format apart
        common = dict(task_type=TASK[0], task_name=TASK[1], dataset_type=_report_format(s, data), dataset_name=name,
                      dataset_revision=str(s.get("data_sha256") or name), metric_config=s.get("mode"))
        results.append(EvalResult(metric_type="accuracy", metric_name="exact-set accuracy",
                                  metric_value=s["accuracy"], **common))
        if isinstance(s.get("lawbench_score"), (int, float)):
            results.append(EvalResult(metric_type="lawbench_score", metric_name="LawBench score",
                                      metric_value=s["lawbench_score"], **common))
        k = s.get("samples")
        if isinstance(k, int) and isinstance(s.get(f"maj@{k}"), (int, float)):
            results.append(EvalResult(metric_type=f"maj@{k}", metric_name=f"majority vote of {k} samples",
                                      metric_value=s[f"maj@{k}"], **common))
    return results


def lora_variant(lora: dict) -> str:
    """The LoRA variant of a run's lora section, as the card's LoRA row ends ('' for plain LoRA)."""
    parts = [name for key, name in (("use_dora", "DoRA"), ("use_rslora", "rsLoRA")) if lora.get(key)]
    init = lora.get("init") or "default"
    if init != "default":
        parts.append(f"{init} init" + (" (saved converted to a LoRA of the original base)"
                                       if init in MUTATING_INITS else ""))
    if lora.get("modules_to_save"):
        parts.append(f"trained in full: {', '.join(lora['modules_to_save'])}")
    return "; " + "; ".join(parts) if parts else ""


def _training_section(src: _Source, base: str | None) -> list[str]:
    cfg, manifest = src.config, src.manifest
    if not cfg and not manifest:
        return ["## Training", "", "This folder records no lawtune training run (no lawtune_config.yaml)."]
    own = cfg.get(src.command or "train") or {}
    lora, data, model = cfg.get("lora") or {}, cfg.get("data") or {}, cfg.get("model") or {}
    method = {"grpo": "GRPO on the exact-set reward (`lawtune grpo`, TRL)",
              "train": "LoRA supervised fine-tuning (`lawtune train`)"}.get(src.command or "", "unknown")
    rows = [("method", method), ("base model", f"`{base}`" if base else "–"),
            ("LoRA", f"r={lora.get('r')}, alpha={lora.get('alpha')}, dropout={lora.get('dropout')}, "
                     f"modules {', '.join(lora.get('target_modules') or [])}" + lora_variant(lora)),
            ("quantization", model.get("quantization", "none")),
            ("prompt format", data.get("prompt_format")), ("max length", data.get("max_length"))]
    keys = ["learning_rate", "lr_scheduler_type", "warmup_steps", "max_steps", "per_device_batch_size",
            "gradient_accumulation_steps", "batch_tokens", "packing", "optim", "seed"]
    keys += ["adapter", "num_generations", "temperature", "top_p", "max_completion_length", "beta", "loss_type",
             "reward_f1_weight", "reward_format_weight"] if src.command == "grpo" else []
    rows += [(f"{src.command}.{k}", own[k]) for k in keys if own.get(k) is not None]
    steps = src.steps()
    rows.append(("optimizer steps", steps if steps is not None else "–"))
    # tokens_seen: lawtune's count (train); num_tokens: TRL's (grpo)
    counts = [r.get("tokens_seen", r.get("num_tokens")) for r in _metrics_rows(src.run_dir)
              if steps is None or r["step"] <= steps]
    tokens = [t for t in counts if isinstance(t, (int, float))]
    rows.append(("tokens trained", f"{int(tokens[-1]):,}" if tokens else "–"))
    out = ["## Training", "", f"Trained with lawtune; the whole config is `{CONFIG_FILE}` beside this card.", "",
           "| setting | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]
    files = manifest.get("files") or []
    if files:
        out += ["### Data", "", f"From `{MANIFEST_FILE}`:", "", "| role | file | records | sha256 |", "|---|---|---|---|"]
        out += [f"| {f.get('role')} | {Path(str(f.get('path'))).name} | {f.get('records')} | `{f.get('sha256')}` |"
                for f in files if isinstance(f, dict)]
        split = manifest.get("split") or {}
        how = ("the eval file, its questions dropped from training" if any(f.get("role") == "eval" for f in files)
               else f"split off the training file by question with seed {manifest.get('split_seed', '–')}")
        out += ["", f"Split: {split.get('train', '–')} training / {split.get('eval', '–')} held-out questions ({how})."]
        dropped = manifest.get("dropped_train_overlapping_eval")
        if dropped is not None:
            out.append(f"Training records dropped because their question is in the held-out file: {dropped}.")
        out.append("")
    return out


def _curve_section(src: _Source) -> list[str]:
    rows = [r for r in _metrics_rows(src.run_dir) if "eval_accuracy" in r]
    curves = src.run_dir / CURVES_FILE if src.run_dir else None
    if not rows and not (curves and curves.is_file()):
        return []
    out = ["## Held-out curve", ""]
    if curves and curves.is_file():
        shutil.copyfile(curves, src.model_dir / CURVES_FILE)
        out += [f"![training curve and held-out accuracy]({CURVES_FILE})", ""]
    if rows:
        best = (src.manifest.get("best") or {}).get("step")
        out += ["| step | held-out accuracy | invalid | questions | mode |", "|---|---|---|---|---|"]
        out += [f"| {r['step']}{' (this model)' if r['step'] == best else ''} | {_pct(r['eval_accuracy'])} | "
                f"{r.get('eval_invalid', '–')} | {r.get('eval_n', '–')} | {r.get('eval_mode', '–')} |" for r in rows]
        out.append("")
    return out


def _contamination(src: _Source, path: Path, summary: dict) -> str:
    """How many of a report's questions are in this model's training split: counted here from the report's data
    file (where it is here, unchanged) against the manifest's hashed questions, else as the report recorded it."""
    name = Path(str(summary.get("data") or path)).name
    data = _report_data(summary, path)
    if data is not None and src.manifest.get("train_statements_sha256") \
            and summary.get("data_sha256") in (None, sha256_file(data)):
        n = summary.get("n")
        try:
            records = load_records(data, require_answer=False, max_samples=n if isinstance(n, int) and n else None,
                                   fmt=summary.get("format")).records
        except DataError:
            records = []
        if records:
            count, version = training_overlap(str(src.adapter_dir), records)
            compared = "statement and options" if version == "statement-options-1" else "statement only"
            return (f"- {name}: {count} of {len(records)} questions are in this model's training split "
                    f"({compared} compared, checked when this card was written)")
    recorded = summary.get("train_overlap")
    if isinstance(recorded, int):
        return (f"- {name}: {recorded} of {summary.get('n', '–')} questions were in the training split of the adapter "
                f"the report was made with ({summary.get('adapter') or 'none'}), as the report recorded it")
    return f"- {name}: not checked (the data file is not here and the report records no overlap)"


def _reports_section(src: _Source, reports: list[tuple[Path, dict]]) -> list[str]:
    if not reports:
        return ["## Evaluation", "", "No eval report named yet: `lawtune card RUN_DIR --report report.json` adds "
                "them (model-index results and the tables below).", ""]
    out = ["## Evaluation", "", "Exact-set accuracy: a question counts only when the predicted letter set equals the "
           "gold set (JEC-QA's rule).", "",
           "| file | format | mode | n | accuracy | single | multi | KD | CA | LawBench score | avg@K | maj@K | pass@K |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for path, report in reports:
        s = report["summary"]
        by_type, k = s.get("by_type") or {}, s.get("samples")
        sampled = [_pct(s.get(f"{m}@{k}")) for m in ("avg", "maj", "pass")] if isinstance(k, int) else ["–"] * 3
        out.append(f"| {Path(str(s.get('data') or path)).name} | {_report_format(s, _report_data(s, path))} | "
                   f"{s.get('mode', '–')} | {s.get('n', '–')} | {_pct(s.get('accuracy'))} | {_acc(s.get('single'))} | "
                   f"{_acc(s.get('multi'))} | {_acc(by_type.get('KD'))} | {_acc(by_type.get('CA'))} | "
                   f"{_pct(s.get('lawbench_score'))} | {' | '.join(sampled)} |")
    out += ["", "K: samples per question where a report sampled them (maj@K: the answer set most samples gave)."]
    out += ["", "## Contamination check", "", "Evaluated questions found in the training split (the manifest keeps a "
            "hash of every training question):", ""]
    out += [_contamination(src, path, report["summary"]) for path, report in reports]
    return [*out, ""]


def build_card(model_dir: str | Path, reports: list[str] | tuple[str, ...] = (), run_dir: str | Path | None = None,
               name: str | None = None):
    """The ``huggingface_hub.ModelCard`` of ``model_dir``. ``run_dir``: the training run's folder (its metrics.jsonl
    and curves.png; default the model directory's parent where that holds a run, a merged adapter's parent for a
    merged model); ``name``: the model's name in the card (default the run's folder name, or the model folder's)."""
    from huggingface_hub import ModelCard, ModelCardData

    model_dir = Path(model_dir)
    loaded = [(Path(p), load_report(p)) for p in reports]
    for path, report in loaded:
        if not isinstance(report["summary"].get("accuracy"), (int, float)):
            raise UsageError(f"{path}: the report's summary has no accuracy")
    in_run = run_dir or run_holding(model_dir)
    src = _Source(model_dir, Path(in_run) if in_run else None)
    name = name or (src.run_dir.name if src.run_dir and not src.merge else model_dir.name)
    base = src.base()
    hub_id = base if base and looks_like_hub_id(base) and not os.path.isdir(base) else None
    tags = ["lawtune", "legal", "chinese-law", "jec-qa", "reasoning"]
    tags += ["lora", "grpo" if src.command == "grpo" else "sft"] if src.command else []
    tags += ["merged-lora"] if src.merge else []
    datasets = [Path(str(f.get("path"))).name for f in src.training_files()]
    results = _eval_results(loaded)
    data = ModelCardData(base_model=hub_id, library_name="peft" if src.is_adapter else "transformers",
                         datasets=datasets or None, tags=tags, license=base_license(base) if base else None,
                         language=["zh"], pipeline_tag="text-generation", model_name=name,
                         eval_results=results or None)
    what = ("a LoRA adapter" if src.is_adapter else "a model merged from a LoRA adapter" if src.merge else "a model")
    where = f"{name}" if not base else f"`{base}`"
    body = [f"# {name}", "", f"{what[0].upper()}{what[1:]} for Chinese legal exam questions (JEC-QA style), on {where}, "
            f"written by lawtune {__version__}.", ""]
    if src.merge:
        body += [f"Merged from the adapter `{src.merge.get('adapter')}` (weights sha256 "
                 f"`{src.merge.get('adapter_sha256')}`) in {src.merge.get('dtype')}.", ""]
    body += _training_section(src, base) + _curve_section(src) + _reports_section(src, loaded)
    folder = "path/to/this/folder"
    body += ["## Use", "", "```bash",
             f"lawtune eval --{'adapter' if src.is_adapter else 'model'} {folder} --data questions.json",
             f"hf upload YOUR_ORG/{name} {folder} .   # upload this folder to the Hugging Face hub",
             "```", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


def write_card(model_dir: str | Path, reports: list[str] | tuple[str, ...] = (), run_dir: str | Path | None = None,
               name: str | None = None) -> Path:
    """Write (or refresh) ``model_dir``/README.md: the card of ``build_card``. Returns its path."""
    card = build_card(model_dir, reports, run_dir=run_dir, name=name)
    path = Path(model_dir) / CARD_FILE
    tmp = path.with_name(f".{CARD_FILE}.tmp")
    card.save(tmp)
    os.replace(tmp, path)
    return path


def refresh_cards(run_dir: str | Path) -> list[Path]:
    """Write again the cards of a training run's final_model/ and best_model/ (at the end of the run, once its
    curves.png is drawn). Returns the cards written."""
    return [write_card(Path(run_dir) / name, run_dir=run_dir) for name in ("final_model", "best_model")
            if (Path(run_dir) / name).is_dir()]
