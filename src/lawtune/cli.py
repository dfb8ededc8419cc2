"""`lawtune` command line: a thin dispatcher. Every parser is built from the command registry
(``lawtune.commands.COMMANDS``) and the config schema: a flag's type and help are its config field's. Any command also
takes ``key=value`` overrides anywhere on the line, ``--config FILE`` and ``--print-config``.

What a user did wrong (``errors.UsageError``: a bad config key, a malformed data line, an unusable model directory)
ends in one line on stderr and exit code 2; a command stopped by SIGTERM after saving its work
(``preempt.Preempted``) in one line and exit code 143; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import NoReturn, get_origin

from .commands import COMMANDS, RENAMED, run
from .config import config_to_yaml, field_doc, load_config, sections_of
from .errors import UsageError
from .preempt import EXIT_PREEMPTED, Preempted

EXIT_USAGE = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse, except that a usage mistake is one line naming the command's valid flags (exit 2)."""

    def error(self, message: str) -> NoReturn:
        flags = sorted({o for a in self._actions for o in a.option_strings if o.startswith("--")})
        renamed = [f"; {old} is now {new}" for old, new in RENAMED.items() if old in message]
        valid = f"; valid flags: {', '.join(flags)}" if flags and "unrecognized" in message else ""
        sys.stderr.write(f"error: {self.prog}: {message}{''.join(renamed)}{valid}\n")
        sys.exit(EXIT_USAGE)


def command_parser(name: str) -> ArgumentParser:
    command = COMMANDS[name]
    sections = sections_of(command.config)
    p = ArgumentParser(prog=f"lawtune {name}", description=command.help)
    for flag, key in command.flags().items():
        section, field = key.split(".")
        info = sections[section].model_fields[field]
        default = info.get_default(call_default_factory=True)
        text = f"{field_doc(sections[section], field)} ({key}; default {default})".replace("%", "%%")
        if not flag.startswith("-"):
            p.add_argument(flag, help=text)
        elif info.annotation is bool:
            p.add_argument(flag, dest=key, default=argparse.SUPPRESS, action="store_true", help=text)
        else:  # the value is validated (and converted) by the schema, as a YAML value would be
            action = "append" if get_origin(info.annotation) is list else "store"
            p.add_argument(flag, dest=key, default=argparse.SUPPRESS, action=action, metavar=field.upper(), help=text)
    for option, text in command.options.items():
        p.add_argument(option, action="store_true", help=text)
    p.add_argument("--config", help="the run's YAML (also positional)" if command.run_file else
                   "a YAML whose sections this command reads are the starting point (e.g. an adapter's "
                   "lawtune_config.yaml)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help=f"config overrides, anywhere on the line, e.g. {command.example}" +
                   (" (and the run's YAML file)" if command.run_file else ""))
    return p


def parse_args(argv: list[str] | None = None) -> tuple[str, argparse.Namespace]:
    """The command and its arguments. The command's own parser reads the rest of the line, flags and key=value
    overrides in any order (argparse's intermixed parsing)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    name = " ".join(argv[:2]) if " ".join(argv[:2]) in COMMANDS else argv[0] if argv and argv[0] in COMMANDS else None
    if name is None:
        parser = ArgumentParser(prog="lawtune", description="LoRA fine-tuning and honest evaluation of reasoning "
                                "LLMs on Chinese legal exam questions")
        sub = parser.add_subparsers(dest="command", required=True, metavar="command")
        for known, command in COMMANDS.items():
            sub.add_parser(known, help=command.help, add_help=False)
        parser.parse_args(argv[:1])  # help, or the error that names what is missing
        raise SystemExit(EXIT_USAGE)
    parser = command_parser(name)
    args = parser.parse_intermixed_args(argv[len(name.split()):])
    # A training command's YAML may come positionally, among the overrides.
    files = [item for item in args.overrides if "=" not in item]
    if files and not COMMANDS[name].run_file:
        parser.error(f"override {files[0]!r}: expected key=value (e.g. {COMMANDS[name].example})")
    if len(files) + bool(args.config) > 1:
        parser.error("give the run's YAML once (positionally or with --config)")
    args.config = args.config or (files[0] if files else None)
    args.overrides = [item for item in args.overrides if "=" in item]
    return name, args


def resolve_config(name: str, args: argparse.Namespace):
    """The command's config: its YAML, then key=value overrides, then flags."""
    command = COMMANDS[name]
    flags = command.flags()
    settings = {key: getattr(args, key) for key in flags.values() if key in vars(args)}
    settings.update({key: getattr(args, flag) for flag, key in flags.items() if not flag.startswith("-")})
    path = args.config or (command.default_file() if command.default_file else None)
    if name == "train" and path is None:
        raise UsageError("lawtune train: give the run's YAML (e.g. lawtune train configs/demo.yaml)")
    return load_config(path, args.overrides, run_cls=command.config, lend=not command.run_file, settings=settings)


def setup_logging() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from .dist import is_main_process

    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", level=logging.WARNING)
    # In a distributed job only rank 0 talks; the others report warnings and errors only.
    logging.getLogger("lawtune").setLevel(logging.INFO if is_main_process() else logging.WARNING)
    for noisy in ("bitsandbytes", "transformers", "peft", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # weight loading takes a second; its bar would split a one-line error in two


def main(argv: list[str] | None = None) -> int:
    try:
        name, args = parse_args(argv)
    except SystemExit as exc:  # a usage error (one line on stderr already) or --help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    setup_logging()
    try:
        cfg = resolve_config(name, args)
        if args.print_config:
            print(config_to_yaml(cfg), end="")
            return 0
        options = {option.lstrip("-"): getattr(args, option.lstrip("-")) for option in COMMANDS[name].options}
        return run(name, cfg, **options)
    except UsageError as exc:
        print(f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return EXIT_USAGE
    except Preempted as exc:
        from .dist import is_main_process, shutdown

        if is_main_process():
            print(exc, file=sys.stderr)
        shutdown()
        return EXIT_PREEMPTED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
