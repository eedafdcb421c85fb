"""`dllama convert IN OUT --type q40|q41|q80|f16|f32`: write a converted GGUF once, when the user asks.

IN may be a GGUF file (re-typed), a Hugging Face model folder (config.json + safetensors + tokenizer), or a
Distributed Llama `.m` file (with its `.t` tokenizer given by --tokenizer)."""

from __future__ import annotations

import os
import sys

from dllama.errors import DllamaError
from dllama.model.convert import TARGETS


def register(sub) -> None:
    p = sub.add_parser(
        "convert", help="write a GGUF from a GGUF, a Hugging Face model folder or a Distributed Llama .m file"
    )
    p.add_argument("input", help="source: GGUF file, Hugging Face model folder, or .m file")
    p.add_argument("output", help="GGUF file to write")
    p.add_argument("--type", required=True, choices=sorted(TARGETS), help="weight type of the matrices")
    p.add_argument("--tokenizer", help="tokenizer (.t) of a Distributed Llama .m model (written into the GGUF)")
    p.set_defaults(run=run)


def run(args) -> int:
    src = args.input
    if os.path.abspath(src) == os.path.abspath(args.output):
        raise DllamaError("output file must differ from the input")
    if os.path.isdir(src):
        from dllama.model.hf_convert import convert_hf

        info = convert_hf(src, args.output, args.type)
    elif src.endswith(".m"):
        from dllama.model.original_format import convert_original

        info = convert_original(src, args.output, args.type, args.tokenizer, progress=True)
    else:
        if args.tokenizer:
            raise DllamaError("--tokenizer only applies to a .m model")
        from dllama.model.convert import convert

        info = convert(src, args.output, args.type)
    print(f"wrote {args.output}: {info['tensors']} tensors, {info['bytes'] / 1e6:.1f} MB", file=sys.stderr)
    return 0
