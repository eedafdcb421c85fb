"""`dllama convert IN OUT --type q40|q41|q80|f16|f32`: write a converted GGUF once, when the user asks."""

from __future__ import annotations

import sys

from dllama.model.convert import TARGETS, convert


def register(sub) -> None:
    p = sub.add_parser("convert", help="write a copy of a GGUF model with its matrices in another type")
    p.add_argument("input", help="source GGUF file")
    p.add_argument("output", help="GGUF file to write")
    p.add_argument("--type", required=True, choices=sorted(TARGETS), help="weight type of the matrices")
    p.set_defaults(run=run)


def run(args) -> int:
    info = convert(args.input, args.output, args.type)
    print(f"wrote {args.output}: {info['tensors']} tensors, {info['bytes'] / 1e6:.1f} MB", file=sys.stderr)
    return 0
