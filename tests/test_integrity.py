"""Per-frame integrity: an on-path relay without the secret that flips one bit of one frame (FORWARD, TENSOR, a
partial sum, LOGITS) makes the root stop with one clear line naming the link, never print garbage with exit 0.

The relay is a real TCP proxy between a `dllama inference` process and a `dllama worker` process (127.0.0.1). It
follows the frame layout to pick its target: the first two frames each way are the handshake (no tag), every later
frame is an 8-byte header, `length` payload bytes and a 16-byte tag (the C mesh's partial sums included: their
length field counts the step word, so the same arithmetic holds)."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import threading

import pytest

from dllama.net import messages as M

TAG = 16
SECRET = "test-secret"


def _recv_exact(s: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = s.recv(min(n - len(out), 1 << 20))
        if not chunk:
            raise EOFError
        out += chunk
    return bytes(out)


class FlipProxy:
    """Relays every connection made to it (a 3-node cluster's worker-to-worker link too, when the root reaches that
    worker through it); flips one bit in the `nth` frame of type `mtype` going in direction `way` ("c2s": towards
    the worker, "s2c": from it). mtype None relays untouched. `hello_flags` rewrites HELLO's flags byte (an attempt
    to strip or force encryption). Every frame relayed is kept in `frames` as (way, type, payload): what an
    eavesdropper on the path sees."""

    def __init__(self, target: tuple[str, int], mtype: int | None, way: str = "c2s", nth: int = 1, tag: int = TAG,
                 hello_flags: int | None = None, connection: int = 0):  # fmt: skip
        self.target, self.mtype, self.way, self.nth, self.tag = target, mtype, way, nth, tag
        self.connection = connection  # which accepted connection the flip is for (0: the first)
        self.hello_flags = hello_flags
        self.flipped = threading.Event()
        self.frames: list[tuple[str, int, bytes]] = []
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.lsock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        k = 0
        while True:
            try:
                client, _ = self.lsock.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._relay, args=(client, server, "c2s", k), daemon=True).start()
            threading.Thread(target=self._relay, args=(server, client, "s2c", k), daemon=True).start()
            k += 1

    def _relay(self, src: socket.socket, dst: socket.socket, way: str, k: int = 0) -> None:
        frames, seen = 0, 0
        try:
            while True:
                head = _recv_exact(src, M.HEADER.size)
                _, mtype, _, length = M.HEADER.unpack(head)
                frames += 1
                tagged = frames > 2  # HELLO + AUTH / CHALLENGE + AUTH_OK carry no tag
                flip_at = -1
                mine = way == self.way and mtype == self.mtype and k == self.connection
                if mine and tagged and not self.flipped.is_set():
                    seen += 1
                    if seen == self.nth:
                        flip_at = length // 2
                if mtype == M.HELLO and self.hello_flags is not None:
                    flip_at = length - 1  # the flags byte: replaced below
                dst.sendall(head)
                left, off = length + (self.tag if tagged else 0), 0
                payload = bytearray()
                while left:
                    chunk = bytearray(src.recv(min(left, 1 << 20)))
                    if not chunk:
                        raise EOFError
                    if off <= flip_at < off + len(chunk):
                        if mtype == M.HELLO:
                            chunk[flip_at - off] = self.hello_flags
                        else:
                            chunk[flip_at - off] ^= 0x10
                        self.flipped.set()
                    dst.sendall(chunk)
                    if off < length:
                        payload += chunk[: length - off]
                    off += len(chunk)
                    left -= len(chunk)
                self.frames.append((way, mtype, bytes(payload)))
        except (EOFError, OSError):
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.lsock.close()


def run_root(default_model: str, address: str, env: dict | None = None, extra: tuple[str, ...] = (),
             steps: int = 6) -> subprocess.CompletedProcess:  # fmt: skip
    args = [sys.executable, "-m", "dllama", "inference", "--model", default_model, "--prompt", "Once upon a time",
            "--steps", str(steps), "--temperature", "0", "--nthreads", "1", "--max-seq-len", "64",
            "--workers", *address.split(), "--secret", SECRET, *extra]  # fmt: skip
    return subprocess.run(args, capture_output=True, text=True, timeout=180, env=dict(os.environ, **(env or {})))


@pytest.mark.parametrize(
    "mtype,way,nth",
    [(M.FORWARD, "c2s", 1), (M.TENSOR, "c2s", 3), (M.PARTIAL, "s2c", 5), (M.PARTIAL, "c2s", 2), (M.LOGITS, "s2c", 1)],
    ids=["forward", "tensor", "partial-from-worker", "partial-from-root", "logits"],
)
@pytest.mark.parametrize("encrypt", [False, True], ids=["tagged", "encrypted"])
def test_flipped_bit_stops_the_root_naming_the_link(default_model, workers, mtype, way, nth, encrypt):
    (w,) = workers(1, secret=SECRET)
    proxy = FlipProxy(("127.0.0.1", w.port), mtype, way, nth)
    try:
        r = run_root(default_model, proxy.address, extra=("--encrypt",) if encrypt else ())
    finally:
        proxy.close()
    assert proxy.flipped.is_set()
    err = r.stderr
    assert r.returncode != 0, err
    assert "Traceback" not in err, err
    assert "integrity check" in err and f"worker 1 ({proxy.address})" in err, err
    assert w.alive()  # the worker dropped the session and waits for the next root


def test_relay_is_transparent_and_a_flip_goes_unnoticed_without_the_tags(default_model, workers):
    """Controls for the test above: the untouched relay gives the same text as a direct connection, and with the
    tags turned off (DLLAMA_INSECURE_NO_MAC on every node) the very same flip passes silently."""
    (w,) = workers(1, secret=SECRET)
    direct = run_root(default_model, w.address)
    assert direct.returncode == 0, direct.stderr
    proxy = FlipProxy(("127.0.0.1", w.port), None)
    relayed = run_root(default_model, proxy.address)
    proxy.close()
    text = lambda r: r.stdout.split("\nprompt:")[0]  # noqa: E731 - the generated text, not the timings
    assert relayed.returncode == 0 and text(relayed) == text(direct) and len(text(direct)) > 20, relayed.stderr

    off = {"DLLAMA_INSECURE_NO_MAC": "1"}
    (w2,) = workers(1, secret=SECRET, env=off)
    proxy = FlipProxy(("127.0.0.1", w2.port), M.PARTIAL, "s2c", 5, tag=0)
    silent = run_root(default_model, proxy.address, env=off)
    proxy.close()
    assert proxy.flipped.is_set()
    assert silent.returncode == 0 and "integrity" not in silent.stderr, silent.stderr


@pytest.mark.parametrize("over", [0, 5], ids=["tag-left", "tag-begun"])
@pytest.mark.parametrize("encrypt", [False, True], ids=["tagged", "encrypted"])
@pytest.mark.parametrize("flip", [None, "payload", "tag"])
def test_error_read_by_the_mesh_is_verified(flip, encrypt, over):
    """The C mesh reads a peer's ERROR in place of a partial sum (header and text, as they came); the tag that
    follows is checked by the link's Conn before the text is believed (and decrypted): a forged or altered reason
    is named as such."""
    from dllama.net.conn import Conn

    a, b = socket.socketpair()
    keys = [os.urandom(32) for _ in range(4)]
    tx, rx = Conn(a, "worker", timeout=2), Conn(b, "root side", timeout=2)
    tx.start_integrity(keys[0], keys[1], (keys[2], keys[3]), encrypt=encrypt)
    rx.start_integrity(keys[1], keys[0], (keys[3], keys[2]), encrypt=encrypt)
    # a Conn frame first, so the sequence numbers are past 0
    tx.sendall(M.HEADER.pack(M.MAGIC, M.STOP, 0, 0))
    assert rx.recv_into(bytearray(8), 8) == 8  # STOP read (and its tag checked) by the Conn
    tx.sendall(M.HEADER.pack(M.MAGIC, M.ERROR, 0, 12) + b"out of luck!")
    wire = bytearray(b.recv(8 + 12 + TAG))  # what the C mesh would take: header and text; the tag stays
    assert len(wire) == 8 + 12 + TAG
    assert (b"out of luck!" in wire) is not encrypt
    if flip == "payload":
        wire[10] ^= 1
    elif flip == "tag":
        wire[-1] ^= 1
    c, d = socket.socketpair()
    rx.sock = d  # the same link state, fed the (possibly altered) bytes: mesh part read, tag left on the socket
    rx._poll_in.register(d, select.POLLIN)
    c.sendall(bytes(wire[8 + 12 + over :]))  # the mesh may have read the tag's first bytes too (`over`)
    got = rx.verify_read_frame(M.ERROR, bytes(wire[8:20]), bytes(wire[20 : 20 + over]))
    assert got == (b"out of luck!" if flip is None else None)
    for s in (a, b, c, d):
        s.close()


def text_of(r: subprocess.CompletedProcess) -> str:
    return r.stdout.split("\nprompt:")[0]  # the generated text, not the timings


def windows(frames: list[tuple[str, int, bytes]]) -> dict[int, bytes]:
    """Per frame type, up to 32 bytes from the middle of the first (longest) payload of that type seen after the
    handshake: known plaintext of that kind of frame."""
    out: dict[int, bytes] = {}
    for _, mtype, payload in sorted(frames, key=lambda f: -len(f[2])):
        if mtype in (M.SETUP, M.TENSOR, M.FORWARD, M.PARTIAL, M.LOGITS, M.READY) and len(payload) >= 8:
            k = min(32, len(payload))
            out.setdefault(mtype, payload[(len(payload) - k) // 2 :][:k])
    return out


@pytest.mark.parametrize("n_workers", [1, 2])
def test_encrypted_links_show_no_plaintext_and_give_the_same_tokens(default_model, workers, n_workers):
    """Every link through on-path relays (root <-> each worker, and at 3 nodes worker 2 -> worker 1, which is
    reached through the same relay): without --encrypt the relays see the SETUP, the weights being shipped, the
    embeddings, the partial sums and the logits; with --encrypt none of those bytes appears anywhere in what they
    relay, and the greedy generation is the same."""
    ws = workers(n_workers, secret=SECRET)
    runs = {}
    for mode in ("plain", "encrypted"):
        proxies = [FlipProxy(("127.0.0.1", w.port), None) for w in ws]
        r = run_root(default_model, " ".join(p.address for p in proxies), steps=12,
                     extra=("--encrypt",) if mode == "encrypted" else ())  # fmt: skip
        for p in proxies:
            p.close()
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
        runs[mode] = (text_of(r), [f for p in proxies for f in p.frames])
    (plain_text, plain), (enc_text, enc) = runs["plain"], runs["encrypted"]
    assert enc_text == plain_text and len(plain_text) > 40
    known = windows(plain)
    assert set(known) >= {M.SETUP, M.TENSOR, M.FORWARD, M.PARTIAL, M.LOGITS}, known.keys()
    if n_workers == 2:  # the worker-to-worker link went through the relay too
        assert sum(1 for way, t, _ in plain if t == M.HELLO and way == "c2s") == 3
    assert b'"session_id"' in b"".join(p for _, t, p in plain if t == M.SETUP)
    seen = b"".join(p for _, _, p in enc)
    assert len(seen) > 100_000
    for mtype, window in known.items():
        assert window not in seen, f"plaintext of a {M.NAMES[mtype]} frame crossed the relay"
    assert b'"session_id"' not in seen


def test_encrypt_mismatch_is_refused_on_both_sides(default_model, workers):
    """A worker started with --encrypt refuses a root without it (both say why); the same root with --encrypt is
    served. A root with --encrypt is followed by a worker without it."""
    (w,) = workers(1, secret=SECRET, extra=["--encrypt"])
    r = run_root(default_model, w.address)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert f"worker 1 ({w.address})" in r.stderr and "start the root with --encrypt" in r.stderr, r.stderr
    assert w.alive()
    ok = run_root(default_model, w.address, extra=("--encrypt",))
    assert ok.returncode == 0 and len(text_of(ok)) > 20, ok.stderr
    log = w.stop()
    assert "refused a root that does not encrypt" in log and "connected (encrypted)" in log, log


@pytest.mark.parametrize("root_encrypts", [True, False], ids=["strip", "force"])
def test_relay_cannot_change_the_encryption_choice(default_model, workers, root_encrypts):
    """The HELLO's flags are covered by both proofs: a relay that clears (or sets) the encrypt flag makes the
    handshake fail instead of silently downgrading the link."""
    (w,) = workers(1, secret=SECRET)
    proxy = FlipProxy(("127.0.0.1", w.port), None, hello_flags=0 if root_encrypts else M.FLAG_ENCRYPT)
    r = run_root(default_model, proxy.address, extra=("--encrypt",) if root_encrypts else ())
    proxy.close()
    assert proxy.flipped.is_set()
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert f"worker 1 ({proxy.address})" in r.stderr and "authentication failed" in r.stderr, r.stderr
    assert w.alive()


def test_encrypt_without_a_secret_is_a_clear_error(default_model, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DLLAMA_SECRET"}
    for args in (["worker", "--port", "0", "--encrypt"],
                 ["inference", "--model", default_model, "--prompt", "hi", "--steps", "1", "--workers",
                  "127.0.0.1:9", "--encrypt"]):  # fmt: skip
        r = subprocess.run([sys.executable, "-m", "dllama", *args], capture_output=True, text=True, timeout=120,
                           env=env, stdin=subprocess.DEVNULL)  # fmt: skip
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
        assert "--encrypt needs a cluster secret" in r.stderr, r.stderr


@pytest.mark.parametrize("encrypt", [False, True], ids=["tagged", "encrypted"])
def test_flipped_bit_on_a_worker_to_worker_link_is_named(default_model, workers, encrypt):
    """3 nodes; worker 2 reaches worker 1 through the relay (the root gave it the relay's address), which flips a
    bit in one of worker 2's partial sums: worker 1 refuses it and tells the root (an ABORT read by the root's C
    mesh and verified by the link's Conn), and the root stops naming both workers."""
    w1, w2 = workers(2, secret=SECRET)
    proxy = FlipProxy(("127.0.0.1", w1.port), M.PARTIAL, "c2s", 3, connection=1)  # connection 1: worker 2's
    r = run_root(default_model, f"{proxy.address} {w2.address}", extra=("--encrypt",) if encrypt else ())
    proxy.close()
    assert proxy.flipped.is_set()
    err = r.stderr
    assert r.returncode != 0 and "Traceback" not in err, err
    assert f"worker 1 ({proxy.address})" in err and "worker 2" in err and "integrity check" in err, err
    assert "failed its integrity check (altered" in err and "error message that failed" not in err, err
    assert w1.alive() and w2.alive()
