"""The `visalign` command line: `visalign COMMAND [options]`.

Each subcommand lives in a feature module, named in `COMMANDS` as `"package.module:function"` with a one-line help.
Only the chosen subcommand's module is imported, so `visalign --help` imports no model library.

To plug a feature in, give its module two functions and point its `COMMANDS` entry at the second:

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("config", help="YAML recipe")

    def run(args: argparse.Namespace) -> int | None:
        ...  # heavy imports here; return an exit code (None means 0)

Until the module exists, `visalign COMMAND` says the feature is not available yet and exits with code 2.
`main(argv)` returns the exit code instead of exiting, so tests call it in-process.

Errors reach the user as one line, `visalign COMMAND: error: MESSAGE` on stderr, with no traceback (exit code 2 for
a bad argument, config or missing file, 1 otherwise); `--debug` (anywhere on the line) shows the traceback instead.
Runs are quiet: the libraries' loading bars are off (each command shows one labelled bar per phase), and a library
warning repeated word for word is shown once.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings
from types import ModuleType

# subcommand -> ("package.module:function" run by the subcommand, help)
COMMANDS: dict[str, tuple[str, str]] = {
    "score": ("visalign.reward_models.score:run", "score images with one or more reward models"),
    "reno": ("visalign.pipelines.reno_cli:run", "ReNO: optimize the initial noise of a one-step generator per prompt"),
    "train": ("visalign.pipelines.train:run", "align a generator with a method recipe (YAML config)"),
    "bench": ("visalign.benchmarks.cli:run", "evaluate a generator on prompt sets with judges"),
    "demo": ("visalign.pipelines.demo:run", "a few-minute CPU demo: train a shapes-world model and show before/after"),
    "world": ("visalign.world.cli:run", "the shapes world: render data, train its generators and verifiers"),
    "plan": ("visalign.plan:run", "memory per process of a training recipe under DDP, FSDP and ZeRO, per GPU size"),
}

logger = logging.getLogger(__name__)


def _feature_module(command: str) -> ModuleType | None:
    """The module behind `command`, or None when it does not exist yet (errors inside it propagate)."""
    module_name = COMMANDS[command][0].partition(":")[0]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (module_name == e.name or module_name.startswith(e.name + ".")):
            return None
        raise


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; the arguments of `command` (if given and available) are added by its feature module."""
    from visalign import __version__

    parser = argparse.ArgumentParser(prog="visalign", description="Align image and video generators with preferences.")
    parser.add_argument("--version", action="version", version=f"visalign {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (anywhere on the line)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (target, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = _feature_module(name)
            if module is None:
                sub.description = f"{help_text} (not available yet: {target.partition(':')[0]} does not exist)"
            else:
                module.add_arguments(sub)
    return parser


class _Once(logging.Filter):
    """Lets each distinct warning through once (libraries repeat the same warning on every call); other levels
    pass."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING:
            return True
        key = (record.name, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def _quiet() -> None:
    """INFO logs for visalign; library loading bars off; a repeated warning shown once."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    warnings.simplefilter("once")
    once = _Once()
    try:
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging
    except ImportError:  # a command that runs without them
        libraries = []
    else:
        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
        libraries = ["diffusers", "transformers"]
    for name in ["", *libraries]:
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, _Once) for f in handler.filters):
                handler.addFilter(once)


def _error_text(error: BaseException) -> str:
    text = str(error) if not isinstance(error, KeyError) else str(error.args[0] if error.args else error)
    if isinstance(error, (ValueError, OSError)):
        return text
    return f"{type(error).__name__}: {text} (run again with --debug for the traceback)"


def main(argv: list[str] | None = None) -> int:
    """Run `visalign` with `argv` (default `sys.argv[1:]`) and return the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version and usage errors
        return e.code if isinstance(e.code, int) else 2
    if args.command is None:
        parser.print_help()
        return 2
    target = COMMANDS[args.command][0]
    module = _feature_module(args.command)
    if module is None:
        print(
            f"visalign {args.command}: this feature is not available yet ({target.partition(':')[0]} does not exist)",
            file=sys.stderr,
        )
        return 2
    _quiet()
    name = " ".join(filter(None, [args.command, vars(args).get(f"{args.command}_command")]))
    try:
        code = getattr(module, target.partition(":")[2])(args)
    except KeyboardInterrupt:
        print(f"visalign {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        print(f"visalign {name}: error: {_error_text(e)}", file=sys.stderr)
        return 2 if isinstance(e, (ValueError, OSError)) else 1
    return 0 if code is None else int(code)


if __name__ == "__main__":
    sys.exit(main())
