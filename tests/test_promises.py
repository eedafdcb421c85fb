"""README promises that had no test: failures reported by name within seconds (a hung worker, an unreachable
address), the secret (a rogue worker that cannot prove it, `$DLLAMA_SECRET`, the non-loopback warning), weights
shipped to a worker whose model file differs, and `--weights` on the command line."""

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from dllama.errors import DllamaError
from dllama.model.gguf_model import GGUFModel
from dllama.net import messages as M
from dllama.net import protocol as P
from dllama.runtime.root import Root

QUIET = {"log": lambda *a: None}
DLLAMA = [sys.executable, "-m", "dllama"]


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def one_line_error(err: str) -> str:
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def test_hung_worker_is_reported_within_5s(default_model, workers):
    """SIGSTOP: the process lives and its sockets stay open, only a timeout can notice (README: within seconds)."""
    ws = workers(2)
    cmd = [*DLLAMA, "inference", "--prompt", "Once upon a time", "--steps", "100000", "--max-seq-len", "4096",
           "--temperature", "0", "--nthreads", "1", "--secret", "test-secret", "--workers", *[w.address for w in ws]]
    root = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert root.stdout.read(len("Once upon a time,")) == "Once upon a time,"  # generating now
        for _ in range(8):  # a few tokens more: the step timeout is learned from the measured time per token
            root.stdout.read(1)
        os.kill(ws[1].proc.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        try:
            root.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        elapsed = time.monotonic() - t0
    finally:
        os.kill(ws[1].proc.pid, signal.SIGCONT)
        if root.poll() is None:
            root.kill()
            root.wait()
    err = root.stderr.read()
    print(f"root exited {elapsed:.2f} s after worker 2 was stopped: {err.strip().splitlines()[-1:]}")
    assert root.returncode not in (0, None)
    assert "worker 2" in one_line_error(err)
    assert elapsed < 5, f"a hung worker took {elapsed:.1f} s to be reported (README promises seconds)"


def test_unreachable_worker_is_a_clear_error(default_model):
    addr = f"127.0.0.1:{free_port()}"
    with pytest.raises(DllamaError, match=re.escape(addr)):
        Root(GGUFModel(default_model), nthreads=1, max_seq=32, workers=[addr], secret="s", **QUIET)
    r = subprocess.run([*DLLAMA, "inference", "--prompt", "hi", "--steps", "2", "--workers", addr, "--secret", "s"],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    line = one_line_error(r.stderr)
    assert r.returncode != 0 and addr in line and "connect" in line, r.stderr


class RogueWorker:
    """Speaks the handshake but does not know the secret: it answers HELLO with a CHALLENGE, takes the root's AUTH
    and answers AUTH_OK with a made-up proof."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.got_setup = False
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        c, _ = self.sock.accept()
        c.settimeout(10)
        try:
            P.recv(c_wrap(c), M.Hello)
            P.send(c_wrap(c), M.Challenge(M.VERSION, os.urandom(16)))
            P.recv(c_wrap(c), M.Auth)
            P.send(c_wrap(c), M.AuthOk(os.urandom(32), b"\0" * 32))
            c.settimeout(3)
            self.got_setup = bool(c.recv(8))  # the root must hang up instead of sending its SETUP
        except (OSError, DllamaError):
            pass
        finally:
            c.close()
            self.sock.close()


class c_wrap:  # noqa: N801  a plain blocking socket with the two methods the framing uses
    def __init__(self, s):
        self.s = s
        self.name = "root"

    def sendall(self, data):
        self.s.sendall(data)

    def recv_into(self, buf, n=0):
        return self.s.recv_into(buf, n)


def test_root_refuses_a_worker_that_cannot_prove_the_secret(default_model):
    rogue = RogueWorker()
    with pytest.raises(DllamaError, match="could not prove it knows the cluster secret"):
        Root(GGUFModel(default_model), nthreads=1, max_seq=32, workers=[rogue.address], secret="s", **QUIET)
    rogue.thread.join(10)
    assert not rogue.got_setup, "the root sent its SETUP to a worker that failed authentication"


def test_dllama_secret_env_is_honoured_by_root_and_worker(default_model, workers):
    (w,) = workers(1, secret=None, env={"DLLAMA_SECRET": "from-env"})
    base = [*DLLAMA, "inference", "--prompt", "Hi", "--steps", "2", "--temperature", "0", "--nthreads", "1",
            "--workers", w.address]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "DLLAMA_SECRET"}
    bad = subprocess.run(base, capture_output=True, text=True, timeout=120, env={**env, "DLLAMA_SECRET": "wrong"})
    assert bad.returncode != 0 and "secret" in one_line_error(bad.stderr), bad.stderr
    ok = subprocess.run(base, capture_output=True, text=True, timeout=300, env={**env, "DLLAMA_SECRET": "from-env"})
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("Hi")


def test_non_loopback_worker_without_secret_warns():
    env = {k: v for k, v in os.environ.items() if k != "DLLAMA_SECRET"}
    for host, secret, warned in [("0.0.0.0", [], True), ("0.0.0.0", ["--secret", "x"], False),
                                 ("127.0.0.1", [], False)]:  # fmt: skip
        p = subprocess.Popen([*DLLAMA, "worker", "--host", host, "--port", "0", *secret], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=env)  # fmt: skip
        try:
            assert p.stdout.readline().startswith("listening on")
        finally:
            p.terminate()
            p.wait(10)
        err = p.stderr.read()
        assert ("WARNING" in err and "WITHOUT a cluster secret" in err) == warned, (host, secret, err)


def test_worker_with_a_different_model_file_gets_the_weights_shipped(default_model, default_f32, workers):
    (w,) = workers(1, extra=["--model", default_f32])  # same architecture, other bytes: sha256 differs
    logs = []
    m = GGUFModel(default_model)
    with Root(m, nthreads=1, max_seq=32, workers=[w.address], secret="test-secret", log=logs.append) as r:
        got = r.forward([1, 2, 3], 0).copy()
    assert any("ready" in x and "(shipped)" in x for x in logs), logs
    assert any("weights sent" in x for x in logs), logs
    assert "slice read from the local model file" not in w.stop()
    (plain,) = workers(1)  # no model file at all: the same Q4_1 slice shipped, so the same logits
    with Root(m, nthreads=1, max_seq=32, workers=[plain.address], secret="test-secret", **QUIET) as r:
        np.testing.assert_allclose(r.forward([1, 2, 3], 0), got, atol=1e-5, rtol=0)


def test_weights_flag_on_the_command_line_prints_the_shares(workers):
    ws = workers(1)
    r = subprocess.run([*DLLAMA, "inference", "--prompt", "Hi", "--steps", "2", "--temperature", "0", "--nthreads",
                        "1", "--secret", "test-secret", "--workers", ws[0].address, "--weights", "2,1"],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    table = [x.split() for x in r.stderr.splitlines() if re.match(r"\s*[01]\s+\d", x)]
    assert len(table) == 2, r.stderr
    print("\n".join(x for x in r.stderr.splitlines() if "node" in x or re.match(r"\s*[01]\s+\d", x)))
    # columns: node, weight, kv heads, q heads, ffn rows, ...: the root (weight 2) holds more ffn rows
    assert int(table[0][4]) > int(table[1][4]), r.stderr
