"""`lawtune eval --suite suite.yaml --output page.html`: one model on several benchmarks and modes, one page.

The suite YAML names the model (and adapter), or a served one (``api_url``, ``api_model``, ``tokenizer``: as
``--api-url``, ``--api-model``, ``--tokenizer``), and its runs::

    model: ./DeepSeek-R1-Distill-Qwen-1.5B      # optional: else --model
    adapter: outputs/run/final_model            # optional: else --adapter
    runs:
      - {name: jecqa_direct, data: JEC-QA/dev.json, mode: direct}
      - {name: lawbench12, data: LawBench/data/zero_shot/1-2.json, mode: reasoning, prompt_format: native,
         samples: 4, max_new_tokens: 4096}

A relative path in the suite is read from the suite file's folder, not the current one (``model`` and ``adapter``
where such a folder exists there; else, as a hub id, as written). Every file is loaded, and checked, before the
model, each once (its warnings print once, however many runs score it); a problem names its run.

The model is loaded once; each run's report is written as ``page.<name>.json`` (the report `lawtune eval` writes,
which `compare` reads) and the page holds a table per benchmark (data file), bars per category, and every
question's output one click away. Self-contained HTML: no script or style is fetched.
"""

from __future__ import annotations

import html
from pathlib import Path

from .api_eval import api_client, api_tokenizer, score_api_file
from .config import ConfigError, EvalRun, Suite, SuiteRun, load_suite
from .config import replace as replace_config
from .data import DataError
from .errors import UsageError
from .evaluate import load_eval_file, score_file, with_adapter_base, write_report
from .prompts import check_native
from .rundir import resolve_prompt_format

CATEGORIES = ("single", "multi", "KD", "CA")


def run_config(cfg: EvalRun, run: SuiteRun, folder: Path = Path(".")) -> EvalRun:
    """The eval config of one run: the command's, with the run's data (read from the suite's ``folder``), mode,
    samples and budget."""
    data = run.data if Path(run.data).is_absolute() else str(folder / run.data)
    try:
        ecfg = replace_config(cfg.eval, data=data, suite=None, mode=run.mode or cfg.eval.mode,
                              samples=run.samples or cfg.eval.samples, format=run.format or cfg.eval.format,
                              type=run.type or cfg.eval.type)
        gcfg = replace_config(cfg.generation, max_new_tokens=run.max_new_tokens or cfg.generation.max_new_tokens)
        return replace_config(cfg, eval=ecfg, generation=gcfg)
    except ConfigError as exc:
        raise ConfigError(f"{cfg.eval.suite}: run {run.name}: {exc}") from None


def _local(folder: Path, path: str | None) -> str | None:
    """A model or adapter named in the suite: a folder beside the suite file where one is there, else as written
    (a hub id, or a path of the current folder)."""
    if not path or Path(path).is_absolute() or not (folder / path).exists():
        return path
    return str(folder / path)


def run_suite(cfg: EvalRun) -> dict:
    """Score every run of the suite with one loaded model (or the served one: ``api_url``); write each report and the
    page."""
    from .model import load_for_inference, quiet_loading

    suite_file = cfg.eval.suite or ""
    suite, folder = load_suite(suite_file), Path(suite_file).parent
    page = Path(cfg.eval.output if cfg.eval.output != "report.json" else "suite.html")
    if page.is_dir():
        raise UsageError(f"eval.output: {page} is a directory; give the page's file (e.g. {page / 'suite.html'})")
    if suite.api_url or cfg.eval.api_url:
        cfg = served_config(cfg, suite, folder)
        adapter, model_cfg = None, cfg.model
    else:
        adapter = _local(folder, suite.adapter) or cfg.adapter.path
        model_cfg = with_adapter_base(replace_config(cfg.model, path=_local(folder, suite.model) or cfg.model.path),
                                      adapter)
        cfg = replace_config(cfg, model=model_cfg, adapter=replace_config(cfg.adapter, path=adapter))
        if not model_cfg.path:
            raise ConfigError(f"{suite_file}: no model (give model: in the suite or --model)")
    runs = [(run, run_config(cfg, run, folder)) for run in suite.runs]
    files: dict[tuple, tuple] = {}  # every file checked first, each once
    for run, rc in runs:
        key = (rc.eval.data, rc.eval.format, rc.eval.type)
        if key not in files:
            try:
                files[key] = load_eval_file(rc.eval.data, rc.eval, adapter)
            except DataError as exc:
                raise DataError([f"{suite_file}: run {run.name}: {p}" for p in exc.problems]) from None
    # a served model's format: the one given, else a merged model's (its folder given as the tokenizer), else chat
    model_dir = (cfg.eval.tokenizer or "") if cfg.eval.api_url else model_cfg.path
    formats = [resolve_prompt_format(model_dir, adapter, run.prompt_format or cfg.adapter.prompt_format)
               for run, _ in runs]
    for (run, rc), fmt in zip(runs, formats):
        check_native(fmt, files[(rc.eval.data, rc.eval.format, rc.eval.type)][0], f"{suite_file}: run {run.name}: "
                     f"{rc.eval.data}")
    reports = {}

    def report_of(run: SuiteRun) -> Path:
        return page.with_name(f"{page.stem}.{run.name}.json")

    if cfg.eval.api_url and cfg.eval.api_model:
        tokenizer = api_tokenizer(cfg)
        with api_client(cfg, cfg.eval.api_url, cfg.eval.api_model) as client:
            for (run, rc), fmt in zip(runs, formats):
                records, skipped, overlap = files[(rc.eval.data, rc.eval.format, rc.eval.type)]
                report = score_api_file(client, tokenizer, records, skipped, overlap, rc, fmt, report_of(run))
                reports[run.name] = _written(report, run, report_of(run))
        title = f"{cfg.eval.api_model} at {cfg.eval.api_url}"
    else:
        quiet_loading()
        model, tokenizer = load_for_inference(model_cfg, adapter, force=cfg.adapter.force, fold=cfg.adapter.fold)
        for (run, rc), fmt in zip(runs, formats):
            records, skipped, overlap = files[(rc.eval.data, rc.eval.format, rc.eval.type)]
            report = score_file(model, tokenizer, records, skipped, overlap, rc, fmt)
            reports[run.name] = _written(report, run, report_of(run))
        title = model_cfg.path
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(render_page(reports, title, adapter), encoding="utf-8")
    return {"runs": {name: r["summary"] for name, r in reports.items()}, "page": str(page)}


def _written(report: dict, run: SuiteRun, path: Path) -> dict:
    report["summary"]["run"] = run.name
    write_report(report, path)
    return report


def served_config(cfg: EvalRun, suite: Suite, folder: Path) -> EvalRun:
    """The command's config for a suite of a served model: the suite's api_url, api_model and tokenizer (a folder
    beside the suite file where one is there), else the command's."""
    suite_file = cfg.eval.suite
    if suite.model or suite.adapter:
        key = "model" if suite.model else "adapter"
        raise ConfigError(f"{suite_file}: {key}: the served model (api_url) is scored; leave {key} out of the suite")
    e = cfg.eval
    try:
        cfg = replace_config(cfg, eval=replace_config(e, api_url=suite.api_url or e.api_url,
                                                      api_model=suite.api_model or e.api_model,
                                                      tokenizer=_local(folder, suite.tokenizer) or e.tokenizer))
    except ConfigError as exc:
        raise ConfigError(f"{suite_file}: {exc}") from None
    if not cfg.eval.tokenizer and not cfg.eval.api_chat:
        raise ConfigError(f"{suite_file}: tokenizer: the served model's tokenizer (in the suite, or --tokenizer)")
    return cfg


# ----------------------------------------------------------------------------- the page


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _bars(summary: dict) -> str:
    parts = []
    for cat in CATEGORIES:
        block = summary.get(cat) if cat in ("single", "multi") else (summary.get("by_type") or {}).get(cat)
        if not block or not block.get("n"):
            continue  # a category without questions is left out, not drawn as 0%
        acc = block["accuracy"]
        parts.append(f'<div class="bar"><span class="label">{cat} (n={block["n"]})</span>'
                     f'<span class="track"><span class="fill" style="width:{100 * acc:.1f}%"></span></span>'
                     f'<span class="value">{_pct(acc)}</span></div>')
    return "".join(parts)


def _questions(name: str, report: dict) -> str:
    rows = []
    for s in report["samples"]:
        mark = "✓" if s["correct"] else "✗"
        rows.append(f"<tr><td>{html.escape(str(s['id']))}</td><td>{''.join(s['gold'])}</td>"
                    f"<td>{''.join(s['pred']) or '–'}</td><td>{mark}</td>"
                    f"<td><details><summary>output</summary><pre>{html.escape(s.get('output') or '')}</pre>"
                    f"</details></td></tr>")
    return (f'<details class="questions" id="q-{html.escape(name)}"><summary>{html.escape(name)}: every question '
            f'({len(report["samples"])})</summary><table><tr><th>id</th><th>gold</th><th>answer</th><th></th>'
            f'<th></th></tr>{"".join(rows)}</table></details>')


def render_page(reports: dict, model: str, adapter: str | None) -> str:
    by_data: dict[str, list[tuple[str, dict]]] = {}
    for name, report in reports.items():
        by_data.setdefault(report["summary"]["data"], []).append((name, report))
    sections = []
    for data, items in by_data.items():
        head = ("<tr><th>run</th><th>mode</th><th>prompt</th><th>n</th><th>accuracy</th><th>LawBench score</th>"
                "<th>abstention</th><th>invalid</th><th>forced</th><th>avg / maj / pass@K</th></tr>")
        rows, bars, questions = [], [], []
        for name, report in items:
            s = report["summary"]
            k = s.get("samples")
            sampled = (f"{_pct(s[f'avg@{k}'])} / {_pct(s[f'maj@{k}'])} / {_pct(s[f'pass@{k}'])} (K={k})"
                       if k else "–")
            rows.append(f'<tr data-run="{html.escape(name)}"><td>{html.escape(name)}</td><td>{s["mode"]}</td>'
                        f'<td>{s["prompt_format"]}</td><td>{s["n"]}</td><td class="accuracy">{_pct(s["accuracy"])}</td>'
                        f'<td class="lawbench">{_pct(s.get("lawbench_score"))}</td>'
                        f'<td>{_pct(s.get("abstention_rate"))}</td><td>{s["invalid"]}</td><td>{s["forced"]}</td>'
                        f"<td>{sampled}</td></tr>")
            bars.append(f'<div class="bars"><h4>{html.escape(name)}</h4>{_bars(s)}</div>')
            questions.append(_questions(name, report))
        note = next((r["summary"]["lawbench_rule"] for _, r in items if r["summary"].get("lawbench_rule")), None)
        sections.append(f'<section><h2>{html.escape(Path(data).name)}</h2><p class="path">{html.escape(data)}</p>'
                        f'<table class="runs">{head}{"".join(rows)}</table>'
                        + (f'<p class="note">{html.escape(note)}</p>' if note else "")
                        + f'{"".join(bars)}{"".join(questions)}</section>')
    style = ("body{font-family:sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse;margin:.5em 0}"
             "td,th{border:1px solid #ccc;padding:.2em .5em;text-align:left;vertical-align:top}"
             ".bar{display:flex;align-items:center;gap:.5em;margin:.1em 0}.label{width:9em}"
             ".track{display:inline-block;width:20em;height:.8em;background:#eee}"
             ".fill{display:block;height:100%;background:#4a7}pre{white-space:pre-wrap;max-width:50em}"
             ".note,.path{color:#555;font-size:.9em}")
    title = f"lawtune: {model}" + (f" + {adapter}" if adapter else "")
    return (f'<!doctype html><html lang="zh"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{''.join(sections)}</body></html>")
