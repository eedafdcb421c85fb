"""`dllama <command>`: one entry point for every front end."""

from __future__ import annotations

import argparse
import sys

from dllama import __version__
from dllama.errors import DllamaError

COMMANDS = ("inference", "perplexity", "convert", "worker", "chat", "api", "download", "models")


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is reported on one line (no usage dump) and exits with 2."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="dllama", description="Run an LLM on one or several computers at once.")
    parser.add_argument("--version", action="version", version=f"dllama {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    import importlib

    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"dllama.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"dllama.cli.{name}":
                continue  # front end not built yet
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except DllamaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
