"""`dllama download NAME[:q40|q80] | OWNER/REPO:FILE`: fetch a model into the Hugging Face cache."""

from __future__ import annotations

import shlex
import sys


def register(sub) -> None:
    p = sub.add_parser(
        "download",
        help="download a model from the Hugging Face Hub (catalog name, or OWNER/REPO:FILE)",
        description="Download a model into the Hugging Face cache (HF_HOME / HF_HUB_CACHE; HF_ENDPOINT and "
        "HF_TOKEN are honoured). An interrupted download resumes where it stopped; every file is checked "
        "against the hub's sha256. See `dllama models` for the catalog.",
    )
    p.add_argument("model", metavar="NAME[:q40|q80] | OWNER/REPO:FILE",
                   help="a catalog name (optionally with the quantization), or a repository and a file name or "
                        "glob; the first part of a split GGUF brings all its parts")  # fmt: skip
    p.add_argument("--revision", default="main", help="branch, tag or commit (default: main)")
    p.add_argument("--no-verify", action="store_true",
                   help="trust files already in the cache instead of re-checking their sha256")  # fmt: skip
    p.set_defaults(run=run)


def run(args) -> int:
    from dllama.hub.download import download

    target, paths = download(args.model, revision=args.revision, verify_cached=not args.no_verify)
    variant = target.variant
    if variant is not None and variant.format != "gguf":
        print(f"downloaded {target.repo} to {paths[0].parent}", file=sys.stderr)
        print("these are the original Distributed Llama .m/.t files; dllama runs GGUF files: "
              f"`dllama download {target.name.split(':')[0]}`", file=sys.stderr)  # fmt: skip
        return 0
    first = str(paths[0])
    model_arg = target.name if target.name else first
    if target.name is None and target.revision == "main" and len(paths) == 1:
        model_arg = f"{target.repo}:{target.files[0]}"
    print(f"downloaded {len(paths)} file(s) to {paths[0].parent}", file=sys.stderr)
    print("run it with:", file=sys.stderr)
    print(f"dllama chat --model {shlex.quote(model_arg)}")
    return 0
