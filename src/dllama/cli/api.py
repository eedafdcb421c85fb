"""`dllama api`: the OpenAI-compatible HTTP server (and the web chat page at /)."""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import sys

from dllama.cli import options
from dllama.errors import DllamaError
from dllama.service import Runtime, RuntimeConfig
from dllama.service.runtime import log


def register(sub) -> None:
    p = sub.add_parser("api", help="serve an OpenAI-compatible API and a web chat page")
    options.add_model_args(p)
    options.add_cluster_args(p)
    options.add_sampling_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 = every interface)")
    p.add_argument("--port", type=int, default=9990, help="port to listen on (0 = any free port)")
    p.add_argument(
        "--api-key", help="require 'Authorization: Bearer KEY' (default: $DLLAMA_API_KEY, or none)"
    )
    p.add_argument(
        "--max-tokens",
        type=options.positive_int,
        help="default answer length limit when a request sets none (default: until the context is full)",
    )
    p.set_defaults(run=run)


def _listen(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart at once after a stop
        sock.bind((host, port))
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise DllamaError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run(args) -> int:
    import uvicorn

    from dllama.api.server import Defaults, create_app

    if not 0 <= args.port <= 65535:
        raise DllamaError("--port must be 0..65535")
    api_key = args.api_key or os.environ.get("DLLAMA_API_KEY") or None
    # Bind before loading the model: a busy port should fail at once, not after a long load.
    sock = _listen(args.host, args.port)
    try:
        rt = Runtime(RuntimeConfig.from_args(args))
    except BaseException:
        sock.close()
        raise
    try:
        model_id = rt.model_id
        defaults = Defaults(args.temperature, args.topp, args.seed, args.max_tokens)
        app = create_app(rt, model_id=model_id, api_key=api_key, defaults=defaults, log=log)
        host, port = sock.getsockname()[:2]
        url = f"http://{f'[{host}]' if ':' in host else host}:{port}/"
        if not api_key and not _is_loopback(args.host):
            log(
                f"WARNING: serving on {args.host} without --api-key: anyone who can reach it can use the model"
            )
        log(f"dllama api: serving {model_id} at {url} (OpenAI API under {url}v1)")
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=3)

        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame) -> None:
                # uvicorn waits for open responses to finish before it shuts the app down: end the running
                # generation first, so that streams close at once instead of running to their end.
                app.state.stop_generation()
                super().handle_exit(sig, frame)

        # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal: make SIGTERM an
        # exception too, so that `finally` still stops the local workers.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            Server(config).run(sockets=[sock])
        except KeyboardInterrupt:
            pass
        log("dllama api: stopped")
    finally:
        sock.close()
        rt.close()
    return 0
