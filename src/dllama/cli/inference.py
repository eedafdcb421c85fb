"""`dllama inference`: generate from a prompt, streaming the text, then print timing like the original's
benchmark mode (per token: total, compute, network time and kB sent / received by the root)."""

from __future__ import annotations

import sys

from dllama.cli import options
from dllama.runtime.stats import Stats
from dllama.sampling.sampler import Sampler
from dllama.service import Runtime, RuntimeConfig


def register(sub) -> None:
    p = sub.add_parser("inference", help="generate text from a prompt and print timing")
    options.add_model_args(p)
    options.add_cluster_args(p)
    options.add_sampling_args(p)
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--steps", type=options.positive_int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--per-token", action="store_true", help="print one timing line per generated token")
    p.add_argument("--dry-run", action="store_true",
                   help="only plan: print each node's share and the memory it needs, load nothing, then exit")  # fmt: skip
    p.set_defaults(run=run)


def dry_run(args) -> int:
    from dllama.model.gguf_model import GGUFModel
    from dllama.runtime.memory import available_bytes
    from dllama.runtime.root import Root
    from dllama.service.runtime import model_path

    model = GGUFModel(model_path(RuntimeConfig.from_args(args)))
    workers = list(args.workers) + [f"local:{i}" for i in range(args.local_workers)]
    root = Root(model, nthreads=args.nthreads or 1, max_seq=args.max_seq_len, workers=workers, split_weights=args.weights,
                sync=args.buffer_float_type, kv_storage=args.kv_cache_storage, kv_dir=args.kv_cache_dir,
                kv_type=args.kv_cache_type,
                dry_run=True)  # fmt: skip
    print(root.describe())
    need = root.memory[0]
    avail = available_bytes()
    print(f"this machine (the root) has {avail / 1e6:.0f} MB available: the root needs {need.describe()}: "
          f"{'fits' if need.total <= avail else 'DOES NOT FIT'}")  # fmt: skip
    return 0 if need.total <= avail else 1


def run(args) -> int:
    if args.dry_run:
        return dry_run(args)
    with Runtime(RuntimeConfig.from_args(args)) as rt:
        session, tok = rt.session, rt.tokenizer
        ids = tok.encode(args.prompt)
        rt.check_prompt(ids)
        sampler = Sampler(args.temperature, args.topp, args.seed)
        dec = tok.stream_decoder()
        out = sys.stdout
        out.write(args.prompt)
        out.flush()
        for t in session.generate(ids, sampler, args.steps, stop_ids=tok.stop_ids):
            out.write(dec.push(t))
            out.flush()
        out.write(dec.flush() + "\n")
        print_stats(session.stats, len(ids), args.per_token, session.finish_reason)
    return 0


def print_stats(stats: Stats, n_prompt: int, per_token: bool, finish: str | None) -> None:
    p, g = stats.prompt, stats.gen
    w = sys.stdout.write
    w("\n")
    if per_token and g:
        w(
            f"{'token':>6} {'total ms':>9} {'compute ms':>11} {'network ms':>11} {'sent kB':>8} {'recv kB':>8}\n"
        )
        for i, s in enumerate(g, 1):
            w(f"{i:>6} {s.total_s * 1e3:>9.2f} {s.compute_s * 1e3:>11.2f} {s.network_s * 1e3:>11.2f} "
              f"{s.sent / 1e3:>8.1f} {s.recv / 1e3:>8.1f}\n")  # fmt: skip
    pt = sum(s.total_s for s in p)
    w(f"prompt:     {n_prompt} tokens in {pt * 1e3:.1f} ms -> {Stats.tokens_per_s(p):.1f} tokens/s\n")
    if g:
        n = len(g)
        avg = lambda attr: sum(getattr(s, attr) for s in g) / n  # noqa: E731
        w(
            f"generation: {n} tokens (+1 sampled from the prompt's logits); per token: total {avg('total_s') * 1e3:.2f} ms, "
            f"compute {avg('compute_s') * 1e3:.2f} ms, network {avg('network_s') * 1e3:.2f} ms, "
            f"sent {avg('sent') / 1e3:.1f} kB, received {avg('recv') / 1e3:.1f} kB\n"
        )
        w(f"generation: {Stats.tokens_per_s(g):.1f} tokens/s\n")
    if finish == "length":
        w("(stopped: --steps reached or context full)\n")
