"""`lawtune` command line: a thin dispatcher to functions that take config objects.

Each command has its own config (``config.COMMANDS``); ``FLAGS`` below is the one place where its flags map
onto that config's keys, and each flag's help is the documentation of its field. Any command also takes
``key=value`` overrides anywhere on the line, ``--config FILE`` and ``--print-config``.

Every problem a user can cause (bad config key, malformed data line, unusable model directory)
ends in one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from .config import COMMANDS, ConfigError, config_to_yaml, field_docs, load_config, sections_of

EXIT_USAGE = 2

# command -> [(flag, config key)]. A flag whose key's field is a bool switches it on; a list field's flag
# may be repeated. A flag without a dash is positional.
FLAGS: dict[str, list[tuple[str, str]]] = {
    "demo": [("--model", "model.path"), ("--data", "data.train"), ("--output-dir", "train.output_dir")],
    "train": [("--model", "model.path"), ("--data", "data.train"), ("--output-dir", "train.output_dir")],
    "eval": [("--model", "model.path"), ("--adapter", "adapter.path"), ("--prompt-format", "adapter.prompt_format"), ("--force", "adapter.force"),
             ("--data", "eval.data"), ("--output", "eval.output"), ("--mode", "eval.mode"),
             ("--batch-size", "eval.batch_size"), ("--max-samples", "eval.max_samples"), ("--format", "eval.format"),
             ("--shuffle-options", "eval.shuffle_options"), ("--max-new-tokens", "generation.max_new_tokens"),
             ("--samples", "eval.samples"), ("--suite", "eval.suite")],
    "predict": [("--model", "model.path"), ("--adapter", "adapter.path"), ("--prompt-format", "adapter.prompt_format"), ("--force", "adapter.force"),
                ("--data", "predict.data"), ("--output", "predict.output"), ("--mode", "predict.mode"),
                ("--batch-size", "predict.batch_size"), ("--max-new-tokens", "generation.max_new_tokens"),
                ("--sample", "generation.do_sample")],
    "ask": [("--model", "model.path"), ("--adapter", "adapter.path"), ("--prompt-format", "adapter.prompt_format"), ("--force", "adapter.force"),
            ("--question", "ask.question"), ("--option", "ask.option"), ("--record", "ask.record"),
            ("--mode", "ask.mode"), ("--max-new-tokens", "generation.max_new_tokens"),
            ("--sample", "generation.do_sample")],
    "serve": [("--model", "model.path"), ("--adapter", "adapter.path"), ("--prompt-format", "adapter.prompt_format"), ("--force", "adapter.force"),
              ("--host", "serve.host"), ("--port", "serve.port"), ("--max-new-tokens", "generation.max_new_tokens"),
              ("--sample", "generation.do_sample")],
    "merge": [("--model", "merge.model"), ("--adapter", "merge.adapter"), ("--output", "merge.output"),
              ("--dtype", "merge.dtype"), ("--force", "merge.force"),
              ("--force-base", "merge.force_base")],
    "data check": [("file", "check.file"), ("--tokenizer", "check.tokenizer"),
                   ("--prompt-format", "check.prompt_format"), ("--json", "check.json"), ("--format", "check.format")],
    "data overlap": [("file_a", "overlap.a"), ("file_b", "overlap.b"), ("--json", "overlap.json")],
    "compare": [("report_a", "compare.report_a"), ("report_b", "compare.report_b"), ("--html", "compare.html")],
    "grpo": [("--model", "model.path"), ("--adapter", "grpo.adapter"), ("--force", "grpo.force"),
             ("--data", "data.train"), ("--output-dir", "grpo.output_dir"), ("--max-steps", "grpo.max_steps"),
             ("--rollout", "grpo.rollout")],
    "distill": [("--model", "model.path"), ("--adapter", "adapter.path"), ("--force", "adapter.force"),
                ("--data", "distill.data"), ("--output", "distill.output"), ("--samples", "distill.samples"),
                ("--pick", "distill.pick"), ("--batch-size", "distill.batch_size"),
                ("--max-new-tokens", "generation.max_new_tokens"), ("--teacher-url", "distill.teacher_url"),
                ("--teacher-model", "distill.teacher_model"), ("--retry-rejected", "distill.retry_rejected")],
}
# The example override each command's help shows: a key that command reads.
EXAMPLE_OVERRIDE = {"demo": "train.max_steps=20", "train": "train.max_steps=100", "eval": "generation.top_p=0.9",
                    "predict": "generation.top_p=0.9", "ask": "generation.temperature=0.6",
                    "serve": "serve.max_prompt_tokens=4096", "merge": "merge.dtype=bfloat16",
                    "data check": "check.prompt_format=plain", "compare": "compare.html=cmp.html",
                    "distill": "generation.temperature=0.7", "data overlap": "overlap.json=true",
                    "grpo": "grpo.num_generations=16"}
HELP = {"demo": "offline CPU demo: tiny random model trained on bundled questions",
        "train": "LoRA SFT from a YAML config",
        "eval": "score a model (and adapter) on a JEC-QA file",
        "predict": "answer every question of a file without answers (JSON Lines, resumable)",
        "ask": "answer one question, streaming the reasoning (interactive without --question)",
        "serve": "OpenAI-compatible HTTP API and a question page at /",
        "merge": "merge a LoRA adapter into its base model (plain transformers directory)",
        "data check": "validate a question file (JEC-QA, AGIEval, LawBench) and print what it holds",
        "data overlap": "how many questions of file B are in file A (normalised statements, any formats)",
        "compare": "compare two eval reports (flips, McNemar, bootstrap CIs)",
        "distill": "sample reasoning per question, keep the traces that reach the gold answer (to train on)",
        "grpo": "GRPO on the exact-set reward (TRL), continuing an SFT adapter or a fresh LoRA"}


class ArgumentParser(argparse.ArgumentParser):
    """argparse, except that a usage mistake is one line naming the command's valid flags (exit 2)."""

    def error(self, message: str):
        flags = sorted({o for a in self._actions for o in a.option_strings if o.startswith("--")})
        valid = f"; valid flags: {', '.join(flags)}" if flags and "unrecognized" in message else ""
        sys.stderr.write(f"error: {self.prog}: {message}{valid}\n")
        sys.exit(EXIT_USAGE)


def _field(key: str, command: str) -> dataclasses.Field:
    section, name = key.split(".")
    cls = sections_of(COMMANDS[command])[section]
    return next(f for f in dataclasses.fields(cls) if f.name == name)


def _add_flags(p: argparse.ArgumentParser, command: str) -> None:
    for flag, key in FLAGS[command]:
        f = _field(key, command)
        section = sections_of(COMMANDS[command])[key.split(".")[0]]
        help_text = f"{field_docs(section).get(f.name, '')} ({key})".replace("%", "%%")
        kind = str(f.type)
        if not flag.startswith("-"):
            p.add_argument(flag, help=help_text)
            continue
        kwargs: dict = {"dest": key, "default": argparse.SUPPRESS, "help": help_text}
        if kind == "bool":
            kwargs["action"] = "store_true"
        else:
            kwargs["metavar"] = f.name.upper()
        if kind.startswith("list"):
            kwargs["action"] = "append"
        elif "int" in kind:
            kwargs["type"] = int
        elif "float" in kind:
            kwargs["type"] = float
        p.add_argument(flag, **kwargs)
    if command in ("train", "grpo"):
        p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the output dir")
        p.add_argument("--overwrite", action="store_true", help="start over in an output dir that holds a run")
    if command != "train":  # train's YAML is its positional argument
        p.add_argument("--config", help="YAML whose sections this command reads are the starting point "
                                        "(e.g. an adapter's lawtune_config.yaml)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help=f"config overrides, anywhere on the line, e.g. {EXAMPLE_OVERRIDE[command]}")


def command_parser(command: str) -> ArgumentParser:
    p = ArgumentParser(prog=f"lawtune {command}", description=HELP[command])
    if command == "train":
        p.add_argument("config", help="YAML config file (see configs/)")
    _add_flags(p, command)
    return p


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser (help and the list of commands)."""
    parser = ArgumentParser(prog="lawtune", description="LoRA fine-tuning and evaluation on JEC-QA")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    for command in ("demo", "train", "grpo", "eval", "predict", "ask", "serve", "merge", "compare", "distill"):
        sub.add_parser(command, help=HELP[command], add_help=False)
    data = sub.add_parser("data", help="data utilities")
    data_commands = data.add_subparsers(dest="data_command", required=True, parser_class=ArgumentParser)
    for name in ("check", "overlap"):
        data_commands.add_parser(name, help=HELP[f"data {name}"], add_help=False)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command's own parser reads the rest of the line, flags and key=value overrides in any order
    (argparse's intermixed parsing, which works on a parser without subcommands)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] in (["data", "check"], ["data", "overlap"]):
        command, rest = " ".join(argv[:2]), argv[2:]
    elif argv and argv[0] in FLAGS:
        command, rest = argv[0], argv[1:]
    else:
        build_parser().parse_args(argv)  # help, or the error that names what is missing
        raise SystemExit(EXIT_USAGE)
    args = command_parser(command).parse_intermixed_args(rest)
    args.command = command
    return args


def resolve_config(args):
    """The command's config: its YAML, then key=value overrides, then flags."""
    command = args.command
    run_cls = COMMANDS[command]
    settings = {key: getattr(args, key) for _, key in FLAGS[command] if key in vars(args)}
    settings.update({key: getattr(args, flag) for flag, key in FLAGS[command]
                     if not flag.startswith("-") and getattr(args, flag, None) is not None})
    if command in ("train", "grpo"):  # their YAML is a whole run: every section in it must be one they read
        path, lend = args.config, False
    elif command == "demo":
        from .demo import demo_config_path

        path, lend = args.config or demo_config_path(), False
    else:
        path, lend = args.config, True
    return load_config(path, list(args.overrides), run_cls=run_cls, lend=lend, settings=settings)


def _setup_logging() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    from .dist import is_main_process

    # Deprecation notices from the HF stack are for lawtune's developers, not its users.
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", level=logging.WARNING)
    # In a distributed job only rank 0 talks; the others report warnings and errors only.
    logging.getLogger("lawtune").setLevel(logging.INFO if is_main_process() else logging.WARNING)
    for noisy in ("bitsandbytes", "transformers", "peft", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        # Weight loading takes a second; its bar would only split a one-line error in two.
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


# ----------------------------------------------------------------------------- commands


def cmd_demo(cfg, args) -> int:
    from .demo import run_demo

    run_demo(cfg)
    return 0


def cmd_train(cfg, args) -> int:
    from .dist import main_print, shutdown
    from .train import train

    result = train(cfg, resume=args.resume, overwrite=args.overwrite)
    main_print(f"done: {result.steps} steps, final loss {result.final_loss:.4f}, adapter in {result.final_model}")
    shutdown()
    return 0


def cmd_grpo(cfg, args) -> int:
    from .dist import main_print, shutdown
    from .train.grpo import grpo

    r = grpo(cfg, resume=args.resume, overwrite=args.overwrite)
    held = (f"held-out accuracy (reasoning) {r.start_eval_accuracy:.3f} at the start, best {r.best_eval_accuracy:.3f}, "
            f"final {r.final_eval_accuracy:.3f}; " if r.start_eval_accuracy is not None else "")
    main_print(f"done: {r.steps} steps, {held}adapter in {r.final_model}")
    shutdown()
    return 0


def cmd_data_check(cfg, args) -> int:
    from .data import data_stats, load_records

    c = cfg.check
    loaded = load_records(c.file, require_answer=False, fmt=c.format)
    lengths = None
    if c.tokenizer:
        from .model import load_tokenizer
        from .prompts import encode_example, render_prompt

        tokenizer = load_tokenizer(c.tokenizer)
        lengths = []
        for r in loaded.records:
            if r.answer is not None:
                lengths.append(len(encode_example(r, tokenizer, c.prompt_format, 10**9).input_ids))
            else:
                lengths.append(len(tokenizer(render_prompt(r, tokenizer, c.prompt_format), add_special_tokens=False)["input_ids"]))
    stats = data_stats(loaded, lengths)
    if c.json:
        print(json.dumps(stats, ensure_ascii=False))
        return 0
    print(f"{c.file}: {stats['records']} usable records")
    for reason, count in stats["skipped"].items():
        print(f"  skipped: {count} ({reason})")
    print(f"  single-answer {stats['single']}, multi-answer {stats['multi']}, "
          f"without answer {stats['records'] - stats['single'] - stats['multi']}")
    print("  by type: " + ", ".join(f"{k} {v}" for k, v in stats["by_type"].items()))
    print(f"  repeated statements: {stats['repeated_statements']}")
    if "token_length" in stats:
        t = stats["token_length"]
        print(f"  tokens per example ({c.prompt_format}): p50 {t['p50']}, p95 {t['p95']}, max {t['max']}")
    return 0


def cmd_data_overlap(cfg, args) -> int:
    from .data import find_overlap, load_records

    o = cfg.overlap
    a, b = load_records(o.a, require_answer=False).records, load_records(o.b, require_answer=False).records
    pairs = find_overlap(a, b)
    examples = [{"b_id": rb.id, "a_id": ra.id, "statement": rb.statement[:80]} for rb, ra in pairs[:5]]
    if o.json:
        print(json.dumps({"b_records": len(b), "overlap": len(pairs), "examples": examples}, ensure_ascii=False))
        return 0
    print(f"{len(pairs)} of {len(b)} questions of {o.b} are in {o.a} ({100 * len(pairs) / len(b):.1f}%; statements "
          f"compared folded to half width, without whitespace, punctuation or options)")
    for e in examples:
        print(f"  {e['b_id']} = {e['a_id']}: {e['statement']}")
    return 0


def cmd_eval(cfg, args) -> int:
    from .evaluate import run_eval

    report = run_eval(cfg)
    if cfg.eval.suite:
        for name, s in report["runs"].items():
            print(f"{name}: {s['mode']} accuracy {s['accuracy']:.4f} on {s['n']} questions ({s['data']})")
        print(f"page -> {report['page']}")
        return 0
    s = report["summary"]
    print(f"{s['mode']}: accuracy {s['accuracy']:.4f} on {s['n']} questions (single {s['single']['accuracy']:.4f}, "
          f"multi {s['multi']['accuracy']:.4f}), invalid {s['invalid']}, forced {s['forced']}, "
          f"{s['questions_per_s']} questions/s -> {cfg.eval.output}")
    return 0


def cmd_compare(cfg, args) -> int:
    from .compare import compare_reports, format_comparison, load_report, write_html

    c = cfg.compare
    if Path(c.html).is_dir():  # checked before the work, which is then not lost
        raise ValueError(f"compare.html: {c.html} is a directory; give a file (e.g. {Path(c.html) / 'compare.html'})")
    result = compare_reports(load_report(c.report_a), load_report(c.report_b))
    print(format_comparison(result, c.report_a, c.report_b))
    write_html(result, c.report_a, c.report_b, c.html)
    print(f"HTML report -> {c.html}")
    return 0


def cmd_ask(cfg, args) -> int:
    from .infer import run_ask

    run_ask(cfg)
    return 0


def cmd_predict(cfg, args) -> int:
    from .infer import run_predict

    s = run_predict(cfg)
    print(f"{s['generated']} answered ({s['unreadable']} unreadable), {s['already_done']} already in {s['output']}, "
          f"{s['records']} records in {cfg.predict.data}")
    return 0


def cmd_merge(cfg, args) -> int:
    from .merge import merge_adapter

    m = cfg.merge
    info = merge_adapter(m)
    print(f"merged {m.adapter} into {m.model} ({info['dtype']}, {info['tensors']} tensors, no LoRA keys, "
          f"reloaded and checked) -> {info['output']}")
    return 0


def cmd_distill(cfg, args) -> int:
    from .distill import run_distill

    r = run_distill(cfg)
    print(f"kept traces for {r['questions_kept']} of {r['questions']} questions ({r['completions_kept']} of "
          f"{r['completions_sampled']} completions kept, pass@{r['samples']} {r['pass_at_k']:.3f}) -> "
          f"{cfg.distill.output}; report {r['report_file']}")
    return 0


def cmd_serve(cfg, args) -> int:
    from .serve import run_serve

    run_serve(cfg)
    return 0


HANDLERS = {"demo": cmd_demo, "train": cmd_train, "eval": cmd_eval, "compare": cmd_compare, "ask": cmd_ask,
            "predict": cmd_predict, "merge": cmd_merge, "serve": cmd_serve, "data check": cmd_data_check,
            "distill": cmd_distill, "data overlap": cmd_data_overlap, "grpo": cmd_grpo}


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as exc:  # a usage error (one line on stderr already) or --help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    _setup_logging()
    from .data import DataError
    from .model import ModelError

    try:
        cfg = resolve_config(args)
        if args.print_config:
            print(config_to_yaml(cfg), end="")
            return 0
        return HANDLERS[args.command](cfg, args)
    except (ConfigError, DataError, ModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, ValueError) as exc:
        print(f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
