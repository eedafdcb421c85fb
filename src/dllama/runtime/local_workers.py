"""`--local-workers K`: start K worker processes on 127.0.0.1 so a new user sees distributed mode in one
command. Each worker picks a free port itself and reports it; they share a random secret."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time

from dllama.errors import DllamaError

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: the kernel sends SIGTERM when the root dies, even by kill -9 (Linux)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class LocalWorkers:
    def __init__(self, k: int, nthreads: int = 1, timeout: float = 60.0, encrypt: bool = False):
        self.secret = secrets.token_hex(16)
        self.procs: list[subprocess.Popen] = []
        self.addresses: list[str] = []
        env = dict(os.environ, DLLAMA_SECRET=self.secret)
        try:
            for _ in range(k):
                p = subprocess.Popen(
                    [sys.executable, "-m", "dllama", "worker", "--host", "127.0.0.1", "--port", "0",
                     "--nthreads", str(nthreads), *(["--encrypt"] if encrypt else [])],
                    stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env, text=True,
                    start_new_session=True,  # Ctrl-C in the terminal must not kill the workers
                    preexec_fn=_die_with_parent,  # ... but the root's death must: no orphans
                )  # fmt: skip
                self.procs.append(p)
            deadline = time.monotonic() + timeout
            for p in self.procs:
                line = p.stdout.readline()  # "listening on HOST:PORT"
                if not line.startswith("listening on ") or time.monotonic() > deadline:
                    raise DllamaError(f"a local worker failed to start (exit code {p.poll()})")
                self.addresses.append(line.split()[-1])
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.stdout:
                p.stdout.close()
        self.procs = []
