"""`lawtune` command line: a thin dispatcher. Every parser is built from the command registry
(``lawtune.commands.COMMANDS``) and the config schema: a flag's type and help are its config field's. Any command also
takes ``key=value`` overrides anywhere on the line, ``--config FILE`` and ``--print-config``.

What a user did wrong (``errors.UsageError``: a bad config key, a malformed data line, an unusable model directory)
ends in one line on stderr and exit code 2; a command stopped by SIGTERM after saving its work
(``preempt.Preempted``) in one line and exit code 143; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn, get_origin

from .commands import COMMANDS, RENAMED, run
from .config import config_to_yaml, load_config, sections_of
from .errors import UsageError
from .logs import setup_logging
from .preempt import EXIT_PREEMPTED, Preempted

EXIT_USAGE = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse, except that a usage mistake is one line naming the command's valid flags (exit 2)."""

    def error(self, message: str) -> NoReturn:
        flags = sorted({o for a in self._actions for o in a.option_strings if o.startswith("--")})
        renamed = "".join(f"; {old} is now {new}" for old, new in RENAMED.items() if old in message)
        valid = f"; valid flags: {', '.join(flags)}" if flags and "unrecognized" in message else ""
        self.exit(EXIT_USAGE, f"error: {self.prog}: {message}{renamed}{valid}\n")


def command_parser(name: str) -> ArgumentParser:
    """A command's parser: each flag's destination is the config key it sets, its help the field's docstring."""
    command = COMMANDS[name]
    p = ArgumentParser(prog=f"lawtune {name}", description=command.config.__doc__)
    for flag, key in command.flags().items():
        section, field = key.split(".")
        info = sections_of(command.config)[section].model_fields[field]
        text = f"{info.description} ({key}; default {info.get_default(call_default_factory=True)})".replace("%", "%%")
        if not flag.startswith("-"):
            p.add_argument(key, metavar=field, help=text)
        elif info.annotation is bool:
            p.add_argument(flag, dest=key, default=argparse.SUPPRESS, action="store_true", help=text)
        else:  # the value is validated (and converted) by the schema, as a YAML value would be
            action = "append" if get_origin(info.annotation) is list else "store"
            p.add_argument(flag, dest=key, default=argparse.SUPPRESS, action=action, metavar=field.upper(), help=text)
    p.add_argument("--config", help="the run's YAML (also positional)" if command.run_file else "a YAML whose sections "
                   "this command reads are the starting point (e.g. an adapter's lawtune_config.yaml)")
    for option, text in {**command.options, "--print-config": "print the resolved config and exit"}.items():
        p.add_argument(option, action="store_true", help=text)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, anywhere on the line, e.g. "
                   + command.example + (" (and the run's YAML file)" if command.run_file else ""))
    return p


def parse_args(argv: list[str]) -> tuple[str, argparse.Namespace]:
    """The command and its arguments. The command's own parser reads the rest of the line, flags and key=value
    overrides in any order (argparse's intermixed parsing)."""
    name = next((known for known in COMMANDS if argv[:len(known.split())] == known.split()), None)
    if name is None:  # help, or the error that names what is missing
        parser = ArgumentParser(prog="lawtune", description="LoRA fine-tuning and honest evaluation of reasoning "
                                "LLMs on Chinese legal exam questions")
        sub = parser.add_subparsers(dest="command", required=True, metavar="command")
        for known, command in COMMANDS.items():
            sub.add_parser(known, help=command.config.__doc__, add_help=False)
        parser.parse_args(argv[:1])
        raise SystemExit(EXIT_USAGE)
    command, parser = COMMANDS[name], command_parser(name)
    args = parser.parse_intermixed_args(argv[len(name.split()):])
    # A training command's YAML may come positionally, among the overrides.
    files = [item for item in args.overrides if "=" not in item]
    if files and not command.run_file:
        parser.error(f"override {files[0]!r}: expected key=value (e.g. {command.example})")
    if len(files) + bool(args.config) > 1:
        parser.error("give the run's YAML once (positionally or with --config)")
    args.config = args.config or next(iter(files), command.default_file)
    if name == "train" and args.config is None:
        parser.error("give the run's YAML (e.g. lawtune train configs/demo.yaml)")
    args.overrides = [item for item in args.overrides if "=" in item]
    return name, args


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code: 2 for what the user did wrong (one line on stderr)."""
    try:
        name, args = parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # a usage error (one line on stderr already) or --help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    setup_logging()
    command = COMMANDS[name]
    # The flags' destinations are the config keys they set (dotted); the output-folder options are not config.
    settings = {key: value for key, value in vars(args).items() if "." in key}
    try:
        cfg = load_config(args.config, args.overrides, command.config, lend=not command.run_file, settings=settings)
        if args.print_config:
            print(config_to_yaml(cfg), end="")
            return 0
        return run(name, cfg, **{option.lstrip("-"): getattr(args, option.lstrip("-")) for option in command.options})
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
