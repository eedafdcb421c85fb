"""Opening a model for a front end: model file, tokenizer, root (and its workers)."""

from __future__ import annotations

import os
import sys
import time

from dllama.errors import DllamaError
from dllama.model.default import resolve_model
from dllama.model.gguf_model import GGUFModel
from dllama.runtime.session import Session


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def open_session(args) -> Session:
    """Loads everything the front ends need; the caller closes `session.root` (and its local workers)."""
    from dllama.runtime.root import Root
    from dllama.tokenizer import Tokenizer

    path = resolve_model(args.model)
    t0 = time.perf_counter()
    model = GGUFModel(path)
    tokenizer = Tokenizer.from_gguf(path, reader=model.reader)
    workers = list(getattr(args, "workers", []) or [])
    secret = getattr(args, "secret", None) or os.environ.get("DLLAMA_SECRET")
    local = None
    if args.nthreads is None:  # local workers share this machine's cores: oversubscribing them costs ~30 %
        args.nthreads = max(1, (os.cpu_count() or 1) // (1 + max(0, getattr(args, "local_workers", 0))))
    if getattr(args, "local_workers", 0):
        if args.local_workers < 0:
            raise DllamaError("--local-workers must be >= 0")
        from dllama.runtime.local_workers import LocalWorkers

        local = LocalWorkers(args.local_workers, nthreads=1)
        workers += local.addresses
        secret = local.secret if not secret else secret
        if secret != local.secret:
            local.close()
            raise DllamaError("--secret cannot be combined with --local-workers (they use their own secret)")
    try:
        root = Root(
            model,
            nthreads=args.nthreads,
            max_seq=args.max_seq_len,
            workers=workers,
            weights=getattr(args, "weights", None),
            buffer_type=getattr(args, "buffer_float_type", "q80"),
            secret=secret,
            log=log,
        )
    except BaseException:
        if local:
            local.close()
        raise
    root.local_workers = local
    cfg = model.config
    log(
        f"model: {os.path.basename(path)} ({cfg.name or cfg.arch}, {cfg.n_layers} layers, dim {cfg.dim}, "
        f"{cfg.n_heads}/{cfg.n_kv_heads} heads, vocab {cfg.vocab_size}); context {root.max_seq}; "
        f"{root.n_nodes} node(s) x {args.nthreads} thread(s); loaded in {time.perf_counter() - t0:.1f} s"
    )
    return Session(root, tokenizer)


def close_session(session: Session) -> None:
    session.root.close()
    local = getattr(session.root, "local_workers", None)
    if local:
        local.close()
