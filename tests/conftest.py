"""Shared fixtures: the default model, derived model files, and real worker processes on 127.0.0.1."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from dllama.model.default import default_model_path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def default_model() -> str:
    return default_model_path()


@pytest.fixture(scope="session")
def default_f32(tmp_path_factory, default_model) -> str:
    """The default model with every matrix in F32: no activation quantization, so splits must be exact."""
    from dllama.model.convert import convert

    path = str(tmp_path_factory.mktemp("models") / "smol-f32.gguf")
    convert(default_model, path, "f32")
    return path


@pytest.fixture(scope="session")
def tiny8(tmp_path_factory):
    """Synthetic models with 8 KV heads (so 2..8 nodes are possible): {'f32': path, 'q4_0': path}."""
    from dllama.testing.synthetic import SHAPES, write_synthetic_gguf

    d = tmp_path_factory.mktemp("tiny8")
    return {wt: write_synthetic_gguf(str(d / f"tiny8-{wt}.gguf"), **SHAPES["tiny-8kv"], weight_type=wt, seed=3)
            for wt in ("f32", "q4_0")}  # fmt: skip


class WorkerProc:
    """A real `dllama worker` process listening on 127.0.0.1 (port chosen by the worker)."""

    def __init__(self, secret: str | None = "test-secret", extra: list[str] | None = None, env=None):
        e = {k: v for k, v in os.environ.items() if k != "DLLAMA_SECRET"}  # only what the test passes
        e.update(env or {})
        args = [
            sys.executable,
            "-m",
            "dllama",
            "worker",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--nthreads",
            "1",
        ]
        if secret:
            args += ["--secret", secret]
        self.proc = subprocess.Popen(args + (extra or []), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, env=e, text=True)  # fmt: skip
        line = self.proc.stdout.readline()
        m = re.match(r"listening on (\S+)", line)
        if not m:
            raise RuntimeError(f"worker did not start: {line!r} {self.proc.stderr.read()}")
        self.address = m.group(1)
        self.port = int(self.address.rsplit(":", 1)[1])
        self.secret = secret

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> str:
        """Terminates the worker; returns what it logged."""
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.stderr.read() if self.proc.stderr else ""


@pytest.fixture
def workers():
    """workers(k, **kw) starts k worker processes; all are stopped after the test."""
    started: list[WorkerProc] = []

    def start(k: int = 1, **kw) -> list[WorkerProc]:
        new = [WorkerProc(**kw) for _ in range(k)]
        started.extend(new)
        return new

    yield start
    for w in started:
        w.stop()


def wait_for(cond, timeout=10.0, step=0.02) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(step)
    return cond()
