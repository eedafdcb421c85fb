"""A worker's server: accepts connections, authenticates them, and hands an authenticated root its session
(one root at a time; a second is told the worker is busy) and authenticated peers to the current session.

Unauthenticated connections are bounded (a total handshake deadline, a cap on how many may be in the handshake at
once) and `accept()` errors (e.g. out of file descriptors) are survived, so nobody can starve the worker without the
secret."""

from __future__ import annotations

import gc
import select
import socket
import sys
import threading
import time

from dllama.errors import DllamaError
from dllama.model.gguf_model import GGUFModel
from dllama.model.identity import content_hash
from dllama.net import messages as M
from dllama.net import protocol as P
from dllama.net.conn import Conn
from dllama.net.mesh import NodeFailure
from dllama.runtime.worker_session import DATA_TIMEOUT, HANDSHAKE_TIMEOUT, WorkerSession

MAX_HANDSHAKES = 32  # connections allowed to be in the handshake at once


def _drain(sock: socket.socket, seconds: float = 1.0) -> None:
    """After telling the root why we give up: half-close and read what it is still sending for a moment, so
    closing with unread data does not reset the connection and destroy our explanation on the way. Runs on a
    duplicate of the socket, in its own thread: the worker is free for the next root meanwhile."""
    try:
        sock.shutdown(socket.SHUT_WR)
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0 and select.select([sock], [], [], left)[0]:
            if not sock.recv(1 << 16):  # the root closed too
                break
    except OSError:
        pass
    finally:
        sock.close()

class WorkerServer:
    def __init__(self, host: str, port: int, *, nthreads: int = 1, secret: str | None = None,
                 model_path: str | None = None, kv_dir: str | None = None, log=None, encrypt: bool = False):  # fmt: skip
        self.host, self.port, self.nthreads = host, port, nthreads
        self.kv_dir = kv_dir  # where a root asking for a disk KV cache gets it (default: the temp directory)
        self.key = P.key_of(secret)
        if encrypt and not self.key:
            raise DllamaError("--encrypt needs a cluster secret (--secret or DLLAMA_SECRET): the keys are derived from it")
        self.encrypt = encrypt  # refuse a root that does not encrypt
        self.log = log or (lambda m: print(f"[worker] {m}", file=sys.stderr, flush=True))
        self.lock = threading.Lock()
        self.busy = False
        self.handshakes = threading.BoundedSemaphore(MAX_HANDSHAKES)
        self.current_session: WorkerSession | None = None
        self.model_path = model_path
        self.model_hash = b"\0" * 32
        self._model = None
        if model_path:
            self.model_hash = content_hash(model_path)
            self.local_model()  # fail now, not when a root arrives
        self.sock: socket.socket | None = None
        self.stopped = threading.Event()

    def local_model(self) -> GGUFModel:
        if self._model is None:
            self._model = GGUFModel(self.model_path, verbose=False)
        return self._model

    def bind(self) -> int:
        self.sock = socket.create_server((self.host, self.port), reuse_port=False, backlog=16)
        self.port = self.sock.getsockname()[1]
        return self.port

    def serve_forever(self) -> None:
        if self.sock is None:
            self.bind()
        while not self.stopped.is_set():
            try:
                sock, addr = self.sock.accept()
            except OSError as e:
                if self.stopped.is_set():
                    return
                self.log(f"accept failed ({e.strerror or e}); retrying")  # e.g. EMFILE: wait for fds to free up
                time.sleep(0.1)
                continue
            if not self.handshakes.acquire(blocking=False):
                sock.close()  # too many connections still proving themselves
                continue
            threading.Thread(target=self._handle, args=(sock, addr), daemon=True).start()

    def stop(self) -> None:
        self.stopped.set()
        if self.sock:
            self.sock.close()

    def _claim(self) -> str | None:
        """Called once a root has authenticated: take the worker, or say why not."""
        with self.lock:
            if self.busy:
                return "worker is busy serving another root"
            self.busy = True
            return None

    def _release(self) -> None:
        with self.lock:
            self.busy = False

    def _handle(self, sock: socket.socket, addr) -> None:
        try:
            self._handle_connection(sock, addr)
        except Exception as e:  # noqa: BLE001 - a bug must not leave the worker claimed or a socket open
            self.log(f"internal error on a connection from {addr[0]}: {type(e).__name__}: {e}")
            sock.close()

    def _handle_connection(self, sock: socket.socket, addr) -> None:
        who = f"{addr[0]}:{addr[1]}"
        claimed = False

        def claim() -> str | None:
            nonlocal claimed
            reason = self._claim()
            claimed = reason is None
            return reason

        conn = Conn(sock, f"root ({who})", HANDSHAKE_TIMEOUT)
        conn.deadline = time.monotonic() + HANDSHAKE_TIMEOUT  # for the whole handshake, not per byte
        try:
            P.tune(sock)
            hello = P.server_read_hello(conn)
            if hello.role == M.ROLE_PEER:
                s = self.current_session
                if s is None or s.setup is None or hello.session_id != s.session_id:
                    P.send_error(conn, "no such session")
                    raise M.ProtocolError("peer for an unknown session")
                P.server_authenticate(conn, P.session_key(self.key, s.session_id), hello, b"\0" * 32,
                                      encrypt=s.root.encrypted)  # fmt: skip
                conn.deadline, conn.timeout = None, DATA_TIMEOUT
                conn.name = f"worker {hello.index} ({who})"
                s.peer_queue.put((hello.index, conn))
                return
            P.server_authenticate(conn, self.key, hello, self.model_hash, refuse=claim, encrypt=self.encrypt)
        except (DllamaError, OSError) as e:
            self.log(f"rejected connection from {who}: {e}")
            conn.close()
            if claimed:  # authenticated, then lost before the session began
                self._release()
            return
        finally:
            self.handshakes.release()
        conn.deadline, conn.timeout = None, DATA_TIMEOUT
        self.log(f"root {who} connected{' (encrypted)' if conn.encrypted else ''}")
        session = WorkerSession(self, conn)
        try:
            session.run()
        except NodeFailure as e:
            self.log(f"session ended: {e}")
        except (DllamaError, OSError) as e:
            self.log(f"session ended: {e}")
            if not isinstance(e, P.PeerClosed):
                P.send_error(conn, str(e))
                threading.Thread(target=_drain, args=(conn.sock.dup(),), daemon=True).start()
        except Exception as e:  # noqa: BLE001 - report, then clean up like any other failed session
            self.log(f"session ended by an internal error: {type(e).__name__}: {e}")
            P.send_error(conn, f"internal error on the worker: {type(e).__name__}")
        finally:
            session.close()
            self.current_session = None
            del session
            gc.collect()  # give the slice's memory back before the next root
            self._release()
            self.log("waiting for a root")
