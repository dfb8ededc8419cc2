"""`lawtune` command line: a thin dispatcher to functions that take config objects.

Every problem a user can cause (bad config key, malformed data line, unusable model directory)
ends in one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

EXIT_USAGE = 2


def _setup_logging() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    # Deprecation notices from the HF stack are for lawtune's developers, not its users.
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", level=logging.WARNING)
    # In a distributed job only rank 0 talks; the others report warnings and errors only.
    rank0 = int(os.environ.get("RANK", "0")) == 0
    logging.getLogger("lawtune").setLevel(logging.INFO if rank0 else logging.WARNING)
    for noisy in ("bitsandbytes", "transformers", "peft", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        # Weight loading takes a second; its bar would only split a one-line error in two.
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _common_flags(p: argparse.ArgumentParser, data_help: str = "JEC-QA file") -> None:
    p.add_argument("--model", help="base model directory or hub id (sets model.path)")
    p.add_argument("--data", help=data_help)
    p.add_argument("--output-dir", help="output directory")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.max_steps=100")


def _generation_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by the commands that generate answers for new questions (ask, predict)."""
    p.add_argument("--max-new-tokens", type=int, help="token budget (default: 8 direct, 2048 reasoning)")
    p.add_argument("--sample", action="store_true", help="sample (temperature 0.6, top-p 0.95) instead of greedy")
    p.add_argument("--prompt-format", choices=["chat", "plain"], help="default: the adapter's, else chat")
    p.add_argument("--config", help="YAML config whose model/eval sections are the starting point")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.dtype=bfloat16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lawtune", description="LoRA fine-tuning and evaluation on JEC-QA")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="offline CPU demo: tiny random model trained on bundled questions")
    _common_flags(p)

    p = sub.add_parser("train", help="LoRA SFT from a YAML config")
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the output dir")
    _common_flags(p, "training file (sets data.train)")

    p = sub.add_parser("data", help="data utilities")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    c = data_sub.add_parser("check", help="validate a JEC-QA file and print what it holds")
    c.add_argument("file")
    c.add_argument("--tokenizer", help="tokenizer directory: also report token lengths of training examples")
    c.add_argument("--prompt-format", default="chat", choices=["chat", "plain"])
    c.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("eval", help="score a model (and adapter) on a JEC-QA file")
    p.add_argument("--adapter", help="LoRA adapter directory (e.g. outputs/run/final_model)")
    p.add_argument("--mode", choices=["direct", "reasoning", "choice"], help="default: direct")
    p.add_argument("--output", default="report.json", help="report file (default report.json)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-new-tokens", type=int, help="reasoning-mode token budget (default 2048)")
    p.add_argument("--max-samples", type=int, help="score only the first N questions")
    p.add_argument("--shuffle-options", action="store_true", help="re-letter options with a fixed seed")
    p.add_argument("--sample", action="store_true", help="sample (temperature 0.6, top-p 0.95) instead of greedy")
    p.add_argument("--prompt-format", choices=["chat", "plain"], help="default: the adapter's, else chat")
    p.add_argument("--config", help="YAML config whose model/eval sections are the starting point")
    _common_flags(p, "JEC-QA file with answers")

    p = sub.add_parser("compare", help="compare two eval reports (flips, McNemar, bootstrap CIs)")
    p.add_argument("report_a")
    p.add_argument("report_b")
    p.add_argument("--html", default="compare.html", help="HTML report path (default compare.html)")

    p = sub.add_parser("ask", help="answer one question, streaming the reasoning (interactive without --question)")
    p.add_argument("--model", help="base model directory or hub id (sets model.path)")
    p.add_argument("--adapter", help="LoRA adapter directory (e.g. outputs/run/final_model)")
    p.add_argument("--question", help="the question; trailing lines 'A. …' are read as its options")
    p.add_argument("--option", action="append", default=[], metavar="A=TEXT", help="an option (repeat for each)")
    p.add_argument("--record", metavar="JSON", help="one JEC-QA record as JSON (statement, option_list)")
    p.add_argument("--mode", choices=["direct", "reasoning"], default="direct", help="default: direct")
    _generation_flags(p)

    p = sub.add_parser("predict", help="answer every question of a file without answers (JSON Lines, resumable)")
    p.add_argument("--model", help="base model directory or hub id (sets model.path)")
    p.add_argument("--adapter", help="LoRA adapter directory")
    p.add_argument("--data", required=True, help="JEC-QA file (answers not needed, e.g. 0_test.json)")
    p.add_argument("--output", required=True, help="predictions file; a rerun skips the ids already in it")
    p.add_argument("--mode", choices=["direct", "reasoning"], default="direct", help="default: direct")
    p.add_argument("--batch-size", type=int, help="questions per batch (default 64)")
    _generation_flags(p)

    p = sub.add_parser("merge", help="merge a LoRA adapter into its base model (plain transformers directory)")
    p.add_argument("--model", required=True, help="base model directory or hub id")
    p.add_argument("--adapter", required=True, help="LoRA adapter directory")
    p.add_argument("--output", required=True, help="directory for the merged model")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="saved dtype (default: the base's)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP API and a question page at /")
    p.add_argument("--model", help="base model directory or hub id (sets model.path)")
    p.add_argument("--adapter", help="LoRA adapter directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    p.add_argument("--max-new-tokens", type=int, help="reasoning-mode budget when a request sets none (default 2048)")
    p.add_argument("--prompt-format", choices=["chat", "plain"], help="default: the adapter's, else chat")
    p.add_argument("--config", help="YAML config whose model/eval sections are the starting point")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.dtype=bfloat16")
    return parser


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.output_dir or "outputs/demo", _with_flags(args, skip_output=True))
    return 0


def _with_flags(args, skip_output: bool = False) -> list[str]:
    overrides = list(args.overrides)
    if getattr(args, "model", None):
        overrides.append(f"model.path={args.model}")
    if getattr(args, "data", None):
        overrides.append(f"data.train={args.data}")
    if getattr(args, "output_dir", None) and not skip_output:
        overrides.append(f"train.output_dir={args.output_dir}")
    return overrides


def cmd_train(args) -> int:
    from .config import load_config
    from .train import train

    cfg = load_config(args.config, _with_flags(args))
    result = train(cfg, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"done: {result['steps']} steps, final loss {result['final_loss']:.4f}, adapter in {result['final_model']}")
    return 0


def cmd_data_check(args) -> int:
    from .data import data_stats, load_records

    loaded = load_records(args.file, require_answer=False)
    lengths = None
    if args.tokenizer:
        from .model import load_tokenizer
        from .prompts import encode_example, render_prompt

        tokenizer = load_tokenizer(args.tokenizer)
        lengths = []
        for r in loaded.records:
            if r.answer is not None:
                lengths.append(len(encode_example(r, tokenizer, args.prompt_format, 10**9).input_ids))
            else:
                lengths.append(len(tokenizer(render_prompt(r, tokenizer, args.prompt_format), add_special_tokens=False)["input_ids"]))
    stats = data_stats(loaded, lengths)
    if args.json:
        print(json.dumps(stats, ensure_ascii=False))
        return 0
    print(f"{args.file}: {stats['records']} usable records")
    for reason, count in stats["skipped"].items():
        print(f"  skipped: {count} ({reason})")
    print(f"  single-answer {stats['single']}, multi-answer {stats['multi']}, "
          f"without answer {stats['records'] - stats['single'] - stats['multi']}")
    print("  by type: " + ", ".join(f"{k} {v}" for k, v in stats["by_type"].items()))
    print(f"  repeated statements: {stats['repeated_statements']}")
    if "token_length" in stats:
        t = stats["token_length"]
        print(f"  tokens per example ({args.prompt_format}): p50 {t['p50']}, p95 {t['p95']}, max {t['max']}")
    return 0


def cmd_eval(args) -> int:
    from .config import load_config
    from .evaluate import run_eval

    overrides = list(args.overrides)
    if args.model:
        overrides.append(f"model.path={args.model}")
    for flag, key in (("mode", "mode"), ("batch_size", "batch_size"), ("max_new_tokens", "max_new_tokens")):
        if getattr(args, flag) is not None:
            overrides.append(f"eval.{key}={getattr(args, flag)}")
    if args.shuffle_options:
        overrides.append("eval.shuffle_options=true")
    if args.sample:
        overrides.append("eval.do_sample=true")
    cfg = load_config(args.config, overrides)
    if not args.data:
        raise SystemExit("error: --data is required")
    report = run_eval(cfg.model, cfg.eval, args.data, args.output, adapter=args.adapter,
                      prompt_format=args.prompt_format, max_samples=args.max_samples)
    s = report["summary"]
    print(f"{s['mode']}: accuracy {s['accuracy']:.4f} on {s['n']} questions (single {s['single']['accuracy']:.4f}, "
          f"multi {s['multi']['accuracy']:.4f}), invalid {s['invalid']}, forced {s['forced']}, "
          f"{s['questions_per_s']} questions/s -> {args.output}")
    return 0


def cmd_compare(args) -> int:
    from .compare import compare_reports, format_comparison, load_report, write_html

    result = compare_reports(load_report(args.report_a), load_report(args.report_b))
    print(format_comparison(result, args.report_a, args.report_b))
    write_html(result, args.report_a, args.report_b, args.html)
    print(f"HTML report -> {args.html}")
    return 0


def cmd_ask(args) -> int:
    from .data import DataError
    from .infer import ask, config_from_args, load_engine, parse_options_arg, record_from_fields, record_from_json
    from .infer import record_from_lines, record_from_text

    given = [flag for flag in ("question", "record") if getattr(args, flag)]
    if len(given) > 1:
        raise ValueError("ask: give --question (with --option) or --record, not both")
    if args.option and not args.question:
        raise ValueError("ask: --option needs --question")
    record = None  # checked before the model loads, so a typo costs no loading time
    if args.record:
        record = record_from_json(args.record)
    elif args.question and args.option:
        record = record_from_fields(args.question, parse_options_arg(args.option), where="--question")
    elif args.question:
        record = record_from_text(args.question, where="--question")
    cfg = config_from_args(args)
    engine = load_engine(cfg.model, cfg.eval, args.adapter, args.prompt_format)
    if record is not None:
        ask(engine, record, args.mode)
        return 0
    interactive = sys.stdin.isatty()
    while True:  # a question, then its options, one per line; an empty line asks it
        if interactive:
            print("题目和选项（每行一个，空行提问，Ctrl-D 退出）：", file=sys.stderr)
        lines = []
        for line in sys.stdin:
            if not line.strip():
                break
            lines.append(line)
        if not lines:
            return 0
        try:
            record = record_from_lines(lines)
        except DataError as exc:
            if not interactive:
                raise
            print(f"error: {exc}", file=sys.stderr)
            continue
        ask(engine, record, args.mode)


def cmd_predict(args) -> int:
    from .infer import config_from_args, run_predict

    cfg = config_from_args(args)
    s = run_predict(cfg.model, cfg.eval, args.data, args.output, adapter=args.adapter, prompt_format=args.prompt_format)
    print(f"{s['generated']} answered ({s['unreadable']} unreadable), {s['already_done']} already in {s['output']}, "
          f"{s['records']} records in {args.data}")
    return 0


def cmd_merge(args) -> int:
    from .merge import merge_adapter

    info = merge_adapter(args.model, args.adapter, args.output, dtype=args.dtype, force=args.force)
    print(f"merged {args.adapter} into {args.model} ({info['dtype']}, {info['tensors']} tensors, no LoRA keys, "
          f"reloaded and checked) -> {info['output']}")
    return 0


def cmd_serve(args) -> int:
    from .infer import config_from_args, load_engine
    from .serve import MODEL_ID, make_server

    cfg = config_from_args(args)
    engine = load_engine(cfg.model, cfg.eval, args.adapter, args.prompt_format)
    try:
        server = make_server(engine, args.host, args.port)
    except OSError as exc:
        raise ValueError(f"serve: cannot listen on {args.host}:{args.port} ({exc.strerror or exc})") from None
    host, port = server.server_address[:2]
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host} without authentication", file=sys.stderr)
    print(f"serving model id {MODEL_ID!r} on http://{host}:{port}/ (API: http://{host}:{port}/v1); Ctrl-C stops",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


COMMANDS = {"demo": cmd_demo, "train": cmd_train, "eval": cmd_eval, "compare": cmd_compare, "ask": cmd_ask,
            "predict": cmd_predict, "merge": cmd_merge, "serve": cmd_serve}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging()
    from .config import ConfigError
    from .data import DataError
    from .model import ModelError

    handler = cmd_data_check if args.command == "data" else COMMANDS[args.command]
    try:
        return handler(args)
    except (ConfigError, DataError, ModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
