"""`dllama models`: the catalog, with what is already downloaded."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("models", help="list the model catalog and mark what is downloaded")
    p.add_argument("--all", action="store_true", help="also list the original Distributed Llama .m files")
    p.set_defaults(run=run)


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def run(args) -> int:
    from dllama.hub.catalog import load_catalog
    from dllama.hub.download import cache_dir, variant_paths

    rows = [("NAME", "PARAMS", "QUANT", "FILE TYPE", "SIZE", "REPOSITORY", "")]
    for model in load_catalog().values():
        for key, v in model.variants.items():
            if v.format != "gguf" and not args.all:
                continue
            name = model.name if key == model.default else f"{model.name}:{key}"
            done = variant_paths(v) is not None
            parts = f" ({len(v.files)} parts)" if v.format == "gguf" and len(v.files) > 1 else ""
            if not v.confirmed:
                parts += " (name unconfirmed)"
            rows.append((name, model.params, key, v.quant + parts, _size(v.size), v.repo,
                         "downloaded" if done else ""))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    print(f"\ncache: {cache_dir()}   download: dllama download NAME   run: dllama chat --model NAME")
    return 0
