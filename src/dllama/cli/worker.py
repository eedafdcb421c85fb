"""`dllama worker`: a worker node. It needs no model file; it serves one root at a time, forever."""

from __future__ import annotations

import ipaddress
import os
import socket
import sys

from dllama.cli import options
from dllama.errors import DllamaError
from dllama.model.default import resolve_model
from dllama.runtime.threads import default_threads


def register(sub) -> None:
    p = sub.add_parser("worker", help="run a worker node that computes its slice of every layer for a root")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 = every interface)")
    p.add_argument("--port", type=int, default=9990, help="port to listen on (0 = any free port)")
    p.add_argument("--nthreads", type=options.positive_int, default=default_threads(),
                   help="compute threads (default: the CPUs this process may use: affinity and cgroup quota)")
    p.add_argument("--secret", help="cluster secret the root must prove it knows (default: $DLLAMA_SECRET)")
    p.add_argument("--model", help="a local copy of the model: the slice is read from it instead of received")
    options.add_encrypt_arg(p, worker=True)
    p.add_argument("--kv-cache-dir", help="directory of the KV cache file when a root asks for disk storage "
                   "(default: the temporary directory)")  # fmt: skip
    p.set_defaults(run=run)


def _is_loopback(host: str) -> bool:
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
    except (OSError, ValueError):
        return False


def run(args) -> int:
    from dllama.runtime.worker_server import WorkerServer

    if not 0 <= args.port <= 65535:
        raise DllamaError("--port must be 0..65535")
    secret = args.secret or os.environ.get("DLLAMA_SECRET")
    if not _is_loopback(args.host) and not secret:
        print(
            "WARNING: listening on a non-loopback address WITHOUT a cluster secret: anyone who can reach "
            f"{args.host}:{args.port} can use this machine. Set --secret or DLLAMA_SECRET.",
            file=sys.stderr,
            flush=True,
        )
    server = WorkerServer(args.host, args.port, nthreads=args.nthreads, secret=secret,
                          model_path=resolve_model(args.model) if args.model else None, kv_dir=args.kv_cache_dir,
                          encrypt=args.encrypt)  # fmt: skip
    try:
        port = server.bind()
    except OSError as e:
        raise DllamaError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    print(f"listening on {args.host}:{port}", flush=True)
    server.log(f"waiting for a root ({args.nthreads} threads)")
    try:
        server.serve_forever()
    finally:
        server.stop()
    return 0
