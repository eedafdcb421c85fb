"""`dllama perplexity --file TEXT [--ctx N]`: the perplexity llama.cpp's `llama-perplexity -c N` reports for the
same text and model (definition in dllama.runtime.perplexity), on one node or split across workers."""

from __future__ import annotations

import sys
import time

from dllama.cli import options
from dllama.errors import DllamaError
from dllama.runtime.perplexity import evaluate, make_plan
from dllama.runtime.root import DEFAULT_MAX_BATCH
from dllama.service import Runtime, RuntimeConfig
from dllama.service.runtime import log

DEFAULT_CTX = 512  # the context size llama.cpp's published perplexities use


def register(sub) -> None:
    p = sub.add_parser(
        "perplexity", help="perplexity of a text file (the value llama.cpp's llama-perplexity gives)"
    )
    options.add_model_args(p)
    options.add_cluster_args(p)
    p.add_argument("--file", required=True, help="the text (UTF-8)")
    p.add_argument("--ctx", type=options.positive_int, default=DEFAULT_CTX,
                   help=f"tokens per chunk, like llama-perplexity -c (default {DEFAULT_CTX})")  # fmt: skip
    p.add_argument("--batch", type=options.positive_int, default=DEFAULT_MAX_BATCH,
                   help=f"tokens per forward pass for each chunk's unscored half (default {DEFAULT_MAX_BATCH})")  # fmt: skip
    p.add_argument("--chunks", type=options.positive_int, help="score only the first N chunks (default: all)")
    p.set_defaults(run=run)


def read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise DllamaError(f"--file: file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DllamaError(f"--file: cannot read {path} as UTF-8 text: {e}") from None


def run(args) -> int:
    from tqdm import tqdm

    text = read_text(args.file)
    if args.ctx < 4:
        raise DllamaError(f"--ctx must be >= 4, got {args.ctx}")
    if args.max_seq_len is not None and args.max_seq_len < args.ctx:
        raise DllamaError(f"--max-seq-len {args.max_seq_len} is smaller than --ctx {args.ctx}")
    args.max_seq_len = args.max_seq_len or args.ctx  # the KV cache needs one chunk, no more
    args.batch = min(args.batch, args.ctx)
    with Runtime(RuntimeConfig.from_args(args)) as rt:
        if rt.max_seq < args.ctx:
            raise DllamaError(f"--ctx {args.ctx} does not fit: the context holds {rt.max_seq} tokens")
        tok = rt.tokenizer
        tokens = tok.encode(text)
        plan = make_plan(tokens, args.ctx, tok.bos_id if tok.add_bos else None, args.chunks)
        log(f"perplexity: {len(tokens)} tokens -> {plan.n_chunks} chunks of {plan.n_ctx}, "
            f"{plan.scored_per_chunk} scored per chunk (the second half), BOS {'on' if plan.bos_id is not None else 'off'}")  # fmt: skip
        t0 = time.perf_counter()
        est = None
        with tqdm(total=plan.n_chunks, unit="chunk", file=sys.stderr, dynamic_ncols=True) as bar:
            for _, est in evaluate(rt.root.run, plan, args.batch):
                bar.set_postfix_str(f"ppl {est.ppl:.4f} +/- {est.err:.4f}", refresh=False)
                bar.update(1)
        dt = time.perf_counter() - t0
        n_eval = plan.n_chunks * (plan.n_ctx - 1)
        log(f"{est.count} tokens scored, {n_eval} evaluated in {dt:.1f} s ({n_eval / dt:.1f} tokens/s) "
            f"on {rt.n_nodes} node(s)")  # fmt: skip
        print(f"perplexity: {est.ppl:.4f} +/- {est.err:.5f}")
    return 0
