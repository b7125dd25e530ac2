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
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from types import ModuleType

# subcommand -> ("package.module:function" run by the subcommand, help)
COMMANDS: dict[str, tuple[str, str]] = {
    "score": ("visalign.reward_models.score:run", "score images with one or more reward models"),
    "reno": ("visalign.pipelines.reno:run", "ReNO: optimize the initial noise of a one-step generator per prompt"),
    "train": ("visalign.pipelines.train:run", "align a generator with a method recipe (YAML config)"),
    "bench": ("visalign.benchmarks.runner:run", "evaluate a generator on prompt sets with judges"),
    "demo": ("visalign.demo:run", "a few-minute CPU demo: align a shapes-world model and show before/after"),
    "world": ("visalign.world.cli:run", "the shapes world: render data, train its generators and verifiers"),
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


def main(argv: list[str] | None = None) -> int:
    """Run `visalign` with `argv` (default `sys.argv[1:]`) and return the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    code = getattr(module, target.partition(":")[2])(args)
    return 0 if code is None else int(code)


if __name__ == "__main__":
    sys.exit(main())
