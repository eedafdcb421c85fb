"""`dllama-api`: the original Distributed Llama's API server command name, the same as `dllama api`."""

from __future__ import annotations

import sys

from dllama.cli.main import main as dllama_main


def main(argv: list[str] | None = None) -> int:
    return dllama_main(["api", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
