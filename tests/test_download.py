"""`dllama download` / `dllama models` / `--model NAME` against a local fake Hugging Face Hub.

The fake hub is a real HTTP server on 127.0.0.1 that answers the endpoints huggingface_hub calls:
`GET /api/models/{repo}[/revision/{rev}]` (file list with sizes and LFS sha256, the gated flag) and
`HEAD`/`GET /{repo}/resolve/{rev}/{file}` (X-Repo-Commit, ETag/X-Linked-Etag = sha256, X-Linked-Size,
Content-Length, Range -> 206, X-Error-Code: GatedRepo). The real `dllama` CLI runs in subprocesses with
HF_ENDPOINT pointing at it and HF_HOME in a temporary folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from dllama.testing.synthetic import SHAPES, write_synthetic_gguf

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self):
        self.repos: dict[str, dict] = {}
        self.log: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.sent: dict[tuple[str, int], int] = {}  # (file, range start) -> body bytes sent
        self.corrupt: dict[str, int] = {}  # file -> how many more GETs get a flipped byte
        self.throttle: float | None = None  # bytes per second
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_HEAD(self):
                hub.serve(self, head=True)

            def do_GET(self):
                hub.serve(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def add(
        self, repo: str, files: dict[str, bytes], gated: bool = False, sizes: dict[str, int] | None = None
    ):
        self.repos[repo] = {"files": files, "gated": gated, "sizes": sizes or {}}

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def gets(self, name: str) -> list[str | None]:
        """Range headers of the GETs of one file, in order."""
        return [r for m, p, r in self.log if m == "GET" and p.endswith("/" + name)]

    # -- request handling ------------------------------------------------------------------------------
    def serve(self, h: BaseHTTPRequestHandler, head: bool):
        path = unquote(urlparse(h.path).path)
        with self.lock:
            self.log.append((h.command, path, h.headers.get("Range")))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            return self.api(h, "/".join(parts[2:4]))
        if len(parts) >= 5 and parts[2] == "resolve":
            return self.resolve(h, "/".join(parts[:2]), "/".join(parts[4:]), head)
        self.reply(h, 404, b"not found", {"X-Error-Code": "RepoNotFound"})

    def reply(self, h, code: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
        h.send_response(code)
        for k, v in (headers or {}).items():
            h.send_header(k, str(v))
        if "Content-Length" not in (headers or {}):
            h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head and body:
            h.wfile.write(body)

    def api(self, h, repo: str):
        r = self.repos.get(repo)
        if r is None:
            return self.reply(h, 404, b'{"error":"Repository not found"}', {"X-Error-Code": "RepoNotFound"})
        siblings = []
        for name, data in r["files"].items():
            size = r["sizes"].get(name, len(data))
            sha = hashlib.sha256(data).hexdigest()
            siblings.append({"rfilename": name, "size": size, "blobId": hashlib.sha1(data).hexdigest(),
                             "lfs": {"sha256": sha, "size": size, "pointerSize": 134}})  # fmt: skip
        body = json.dumps({"id": repo, "modelId": repo, "sha": COMMIT, "private": False,
                           "gated": "manual" if r["gated"] else False, "siblings": siblings}).encode()  # fmt: skip
        self.reply(h, 200, body, {"Content-Type": "application/json"})

    def resolve(self, h, repo: str, name: str, head: bool):
        r = self.repos.get(repo)
        if r is None or name not in r["files"]:
            return self.reply(h, 404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT}, head)
        if r["gated"] and h.headers.get("Authorization") != "Bearer hf_granted":
            code = 401 if h.headers.get("Authorization") is None else 403
            return self.reply(h, code, b"", {"X-Error-Code": "GatedRepo",
                                             "X-Error-Message": "Access to model is restricted."}, head)  # fmt: skip
        data = r["files"][name]
        size = r["sizes"].get(name, len(data))
        sha = hashlib.sha256(data).hexdigest()
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{sha}"', "X-Linked-Etag": f'"{sha}"',
                   "X-Linked-Size": size, "Accept-Ranges": "bytes"}  # fmt: skip
        if head:
            return self.reply(h, 200, b"", {**headers, "Content-Length": size}, head=True)
        with self.lock:
            if self.corrupt.get(name, 0) > 0:
                self.corrupt[name] -= 1
                data = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]  # same size, wrong sha256
        start = 0
        rng = h.headers.get("Range")
        if rng and rng.startswith("bytes="):
            start = int(rng[6:].split("-")[0])
        body = data[start:]
        if start:
            h.send_response(206)
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        else:
            h.send_response(200)
        for k, v in headers.items():
            h.send_header(k, str(v))
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        step = 256 << 10
        try:
            for i in range(0, len(body), step):
                h.wfile.write(body[i : i + step])
                with self.lock:
                    self.sent[name, start] = self.sent.get((name, start), 0) + len(body[i : i + step])
                if self.throttle:
                    time.sleep(step / self.throttle)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture
def hub():
    h = FakeHub()
    yield h
    h.close()


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory):
    d = tmp_path_factory.mktemp("hubfiles")
    tiny = SHAPES["tiny"]
    out = {
        "q4_0": write_synthetic_gguf(str(d / "t-q4.gguf"), **tiny, weight_type="q4_0", seed=1),
        "q8_0": write_synthetic_gguf(str(d / "t-q8.gguf"), **tiny, weight_type="q8_0", seed=1),
        # > 10 MiB (huggingface_hub writes 10 MiB chunks), so a killed download leaves bytes to resume from
        "big": write_synthetic_gguf(str(d / "big.gguf"), **SHAPES["tiny-8kv"], weight_type="f32", seed=2),
    }
    return {k: Path(v).read_bytes() for k, v in out.items()}


def run_dllama(hub: FakeHub, home: Path, *args, env=None, timeout=120, popen=False):
    e = dict(os.environ)
    for k in ("HF_HUB_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_CACHE", "DLLAMA_CATALOG"):
        e.pop(k, None)
    e.update({"HF_ENDPOINT": hub.url, "HF_HOME": str(home), "HF_HUB_DISABLE_XET": "1",
              "HF_HUB_DISABLE_TELEMETRY": "1"}, **(env or {}))  # fmt: skip
    cmd = [sys.executable, "-m", "dllama", *args]
    if popen:
        return subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=timeout)


def blobs(home: Path) -> list[Path]:
    return sorted(p for p in home.rglob("blobs/*") if p.is_file())


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def catalog_file(tmp_path: Path, entries: dict) -> dict:
    f = tmp_path / "catalog.json"
    f.write_text(json.dumps(entries))
    return {"DLLAMA_CATALOG": str(f)}


def test_catalog_name_download_then_models_and_inference(hub, ggufs, tmp_path):
    hub.add(
        "fake/tiny-GGUF",
        {"tiny-Q4_0.gguf": ggufs["q4_0"], "tiny-Q8_0.gguf": ggufs["q8_0"], "README.md": b"hi"},
    )
    env = catalog_file(tmp_path, {"tiny-test": {"params": "1M", "variants": {
        "q40": {"repo": "fake/tiny-GGUF", "files": ["tiny-Q4_0.gguf"], "quant": "Q4_0"},
        "q80": {"repo": "fake/tiny-GGUF", "files": ["tiny-Q8_0.gguf"], "quant": "Q8_0"}}}})  # fmt: skip
    home = tmp_path / "hf"

    r = run_dllama(hub, home, "inference", "--model", "tiny-test", "--prompt", "hi", env=env)
    assert r.returncode == 1 and "not downloaded: run `dllama download tiny-test`" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr

    r = run_dllama(hub, home, "download", "tiny-test", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "dllama chat --model tiny-test"
    # only the chosen file was fetched, and it is byte-identical to what the hub serves
    assert hub.gets("tiny-Q4_0.gguf") == [None] and hub.gets("tiny-Q8_0.gguf") == []
    snap = home / "hub" / "models--fake--tiny-GGUF" / "snapshots" / COMMIT / "tiny-Q4_0.gguf"
    assert sha(snap) == hashlib.sha256(ggufs["q4_0"]).hexdigest()
    assert (home / "hub" / "models--fake--tiny-GGUF" / "refs" / "main").read_text() == COMMIT

    r = run_dllama(hub, home, "models", env=env)
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line for line in r.stdout.splitlines() if line.startswith("tiny-test")}
    assert rows["tiny-test"].endswith("downloaded") and not rows["tiny-test:q80"].endswith("downloaded")
    assert "llama3.2-1b-instruct" in r.stdout and "qwen3-30b-a3b" in r.stdout  # the built-in catalog

    # the path comes from the HF cache, read by huggingface_hub itself, with the hub unreachable
    from_cache = subprocess.run(
        [sys.executable, "-c", "from huggingface_hub import try_to_load_from_cache as t;"
         "print(t('fake/tiny-GGUF', 'tiny-Q4_0.gguf'))"],
        env={**os.environ, "HF_HOME": str(home)}, capture_output=True, text=True)  # fmt: skip
    assert from_cache.stdout.strip() == str(snap)

    hub.close()  # --model NAME must not need the network
    r = run_dllama(hub, home, "inference", "--model", "tiny-test", "--prompt", "hi", "--steps", "2",
                   "--temperature", "0", "--nthreads", "1", env={**env, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "model: tiny-Q4_0.gguf" in r.stderr, r.stderr  # the downloaded file is the one that ran


def test_repo_file_download_and_quant_choice(hub, ggufs, tmp_path):
    hub.add("fake/tiny-GGUF", {"tiny-Q4_0.gguf": ggufs["q4_0"], "tiny-Q8_0.gguf": ggufs["q8_0"]})
    home = tmp_path / "hf"
    r = run_dllama(hub, home, "download", "fake/tiny-GGUF:*Q8_0.gguf")  # a glob
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "dllama chat --model fake/tiny-GGUF:tiny-Q8_0.gguf"
    assert hub.gets("tiny-Q4_0.gguf") == []
    r = run_dllama(hub, home, "inference", "--model", "fake/tiny-GGUF:tiny-Q8_0.gguf", "--prompt", "hi",
                   "--steps", "2", "--nthreads", "1", env={"HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert r.returncode == 0 and "model: tiny-Q8_0.gguf" in r.stderr, r.stderr

    for bad, msg in [("fake/tiny-GGUF:nope.gguf", "no file 'nope.gguf' in fake/tiny-GGUF"),
                     ("fake/missing:x.gguf", "repository fake/missing not found"),
                     ("fake/tiny-GGUF", "say which file of fake/tiny-GGUF")]:  # fmt: skip
        r = run_dllama(hub, home, "download", bad)
        assert r.returncode == 1 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_killed_download_resumes_with_a_range_request(hub, ggufs, tmp_path):
    big = ggufs["big"]
    assert len(big) > 12 << 20
    hub.add("fake/big-GGUF", {"big-F32.gguf": big})
    home = tmp_path / "hf"
    hub.throttle = 4 << 20  # ~4 MB/s: the download takes a few seconds
    p = run_dllama(hub, home, "download", "fake/big-GGUF:big-F32.gguf", popen=True)
    partial = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and p.poll() is None:
        found = list(home.rglob("*.incomplete"))
        if found and found[0].stat().st_size >= 10 << 20:  # one 10 MiB chunk written
            partial = found[0]
            break
        time.sleep(0.05)
    assert partial is not None, "the partial download never appeared"
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=30)
    kept = partial.stat().st_size
    assert 0 < kept < len(big)
    assert hub.gets("big-F32.gguf") == [None]

    hub.throttle = None
    r = run_dllama(hub, home, "download", "fake/big-GGUF:big-F32.gguf")
    assert r.returncode == 0, r.stderr
    assert "resuming at" in r.stderr
    assert hub.gets("big-F32.gguf") == [None, f"bytes={kept}-"]  # resumed, not started over
    assert hub.sent["big-F32.gguf", kept] == len(big) - kept
    [blob] = blobs(home)
    assert sha(blob) == hashlib.sha256(big).hexdigest()
    assert not list(home.rglob("*.incomplete"))


def test_corrupted_download_is_refused_and_fetched_again(hub, ggufs, tmp_path):
    data = ggufs["q4_0"]
    hub.add("fake/tiny-GGUF", {"tiny-Q4_0.gguf": data})
    home = tmp_path / "hf"
    good = hashlib.sha256(data).hexdigest()

    # bad bytes twice in a row: refused, nothing kept, one clear line
    hub.corrupt["tiny-Q4_0.gguf"] = 2
    r = run_dllama(hub, home, "download", "fake/tiny-GGUF:tiny-Q4_0.gguf")
    assert r.returncode == 1, r.stderr
    assert (
        "refused" in r.stderr
        and "sha256 does not match the hub's" in r.stderr
        and "Traceback" not in r.stderr
    )
    assert blobs(home) == [] and not list(home.rglob("snapshots/*/*"))
    assert len(hub.gets("tiny-Q4_0.gguf")) == 2

    # bad bytes once: refused, downloaded again in the same run
    hub.corrupt["tiny-Q4_0.gguf"] = 1
    r = run_dllama(hub, home, "download", "fake/tiny-GGUF:tiny-Q4_0.gguf")
    assert r.returncode == 0, r.stderr
    assert "refused" in r.stderr and "downloading it again" in r.stderr
    [blob] = blobs(home)
    assert blob.name == good and sha(blob) == good

    # a cached file damaged on disk is detected by the next `dllama download` and fetched again
    raw = bytearray(blob.read_bytes())
    raw[200] ^= 0xFF
    blob.write_bytes(bytes(raw))
    n = len(hub.gets("tiny-Q4_0.gguf"))
    r = run_dllama(hub, home, "download", "fake/tiny-GGUF:tiny-Q4_0.gguf")
    assert r.returncode == 0 and "corrupted" in r.stderr, r.stderr
    assert len(hub.gets("tiny-Q4_0.gguf")) == n + 1 and sha(blob) == good

    # an intact cached file is verified, not downloaded again
    r = run_dllama(hub, home, "download", "fake/tiny-GGUF:tiny-Q4_0.gguf")
    assert r.returncode == 0 and "already downloaded and verified" in r.stderr
    assert len(hub.gets("tiny-Q4_0.gguf")) == n + 1

    # --no-verify trusts the cache: a damaged file is then not noticed (and not fetched)
    blob.write_bytes(bytes(raw))
    r = run_dllama(hub, home, "download", "--no-verify", "fake/tiny-GGUF:tiny-Q4_0.gguf")
    assert r.returncode == 0 and len(hub.gets("tiny-Q4_0.gguf")) == n + 1 and sha(blob) != good


def test_gated_repo_gives_a_clear_message(hub, ggufs, tmp_path):
    hub.add("meta/gated-GGUF", {"g.gguf": ggufs["q4_0"]}, gated=True)
    home = tmp_path / "hf"
    # no token: said before any download is tried
    r = run_dllama(hub, home, "download", "meta/gated-GGUF:g.gguf")
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "meta/gated-GGUF is a gated repository" in r.stderr and "HF_TOKEN" in r.stderr
    assert hub.gets("g.gguf") == []
    # a token without access: the hub's 403 GatedRepo, caught from huggingface_hub's GatedRepoError
    r = run_dllama(hub, home, "download", "meta/gated-GGUF:g.gguf", env={"HF_TOKEN": "hf_other"})
    assert r.returncode == 1 and "meta/gated-GGUF is a gated repository" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and blobs(home) == []
    heads = [p for m, p, _ in hub.log if m == "HEAD"]
    assert heads and all(p.endswith("/g.gguf") for p in heads)
    # a token with access: downloaded
    r = run_dllama(hub, home, "download", "meta/gated-GGUF:g.gguf", env={"HF_TOKEN": "hf_granted"})
    assert r.returncode == 0, r.stderr


def test_not_enough_disk_space_says_so_before_writing(hub, ggufs, tmp_path):
    huge = 10**15  # 1 PB, as the hub's listing and HEAD say
    hub.add("fake/huge-GGUF", {"huge.gguf": ggufs["q4_0"]}, sizes={"huge.gguf": huge})
    home = tmp_path / "hf"
    r = run_dllama(hub, home, "download", "fake/huge-GGUF:huge.gguf")
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: not enough disk space"), r.stderr
    assert "needs 1000.0 TB" in lines[0] and "free" in lines[0]
    assert hub.gets("huge.gguf") == []
    assert not home.exists() or not [p for p in home.rglob("*") if p.is_file()]


def test_split_gguf_downloads_every_part(hub, ggufs, tmp_path):
    names = [f"q8/m-Q8_0-{i:05d}-of-00003.gguf" for i in (1, 2, 3)]
    parts = {n: ggufs["q4_0"][i::3] for i, n in enumerate(names)}  # three distinct byte strings
    hub.add("fake/split-GGUF", {**parts, "other.gguf": b"x" * 10})
    home = tmp_path / "hf"
    # OWNER/REPO:FIRST-PART brings all parts
    r = run_dllama(hub, home, "download", f"fake/split-GGUF:{names[0]}")
    assert r.returncode == 0, r.stderr
    for n in names:
        assert hub.gets(n.split("/")[-1]) == [None]
    assert hub.gets("other.gguf") == []
    snap = home / "hub" / "models--fake--split-GGUF" / "snapshots" / COMMIT
    for n in names:
        assert sha(snap / n) == hashlib.sha256(parts[n]).hexdigest()
    assert r.stdout.strip() == f"dllama chat --model {snap / names[0]}"

    # a catalog entry listing the parts: --model NAME is the first part; split_parts finds its siblings
    env = catalog_file(tmp_path, {"split-test": {"variants": {
        "q80": {"repo": "fake/split-GGUF", "files": names, "quant": "Q8_0"}}}})  # fmt: skip
    code = ("from dllama.model.default import resolve_model; from dllama.hub import split_parts;"
            "p = resolve_model('split-test'); print(p); print('\\n'.join(split_parts(p)))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "HF_HOME": str(home), **env})  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split()
    assert lines[0] == str(snap / names[0]) and lines[1:] == [str(snap / n) for n in names]

    # a missing part is named
    (snap / names[1]).unlink()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "HF_HOME": str(home), **env})  # fmt: skip
    assert out.returncode != 0 and "not downloaded" in out.stderr


def test_plain_paths_and_unknown_names_are_unchanged(tmp_path):
    from dllama.model.default import resolve_model

    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    assert resolve_model(str(f)) == str(f)
    assert resolve_model(str(tmp_path / "missing.gguf")) == str(tmp_path / "missing.gguf")
    assert resolve_model("relative/dir/model.gguf") == "relative/dir/model.gguf"


def test_builtin_catalog_is_complete_and_well_formed():
    from dllama.hub.catalog import CATALOG

    wanted = ["tinyllama-1.1b-3t", "llama3-8b", "llama3-8b-instruct", "llama3.1-8b-instruct",
              "llama3.1-405b-instruct", "llama3.2-1b-instruct", "llama3.2-3b-instruct", "llama3.3-70b-instruct",
              "deepseek-r1-distill-llama-8b", "qwen3-0.6b", "qwen3-1.7b", "qwen3-4b", "qwen3-8b", "qwen3-14b",
              "qwen3-30b-a3b"]  # fmt: skip
    assert sorted(CATALOG) == sorted(wanted)
    for m in CATALOG.values():
        assert "q40" in m.variants, m.name
        for key, v in m.variants.items():
            assert v.source, (m.name, key)
            assert "/" in v.repo and v.files
            if v.format == "gguf":
                assert all(f.endswith(".gguf") for f in v.files)
                assert v.quant in (("Q4_0", "Q4_K_M") if key == "q40" else ("Q8_0",)), (m.name, key)
            else:
                assert v.repo.startswith("b4rtaz/") and v.files[-1].endswith(".t")
    assert len(CATALOG["llama3.1-405b-instruct"].variants["dllama-m"].files) == 57  # 56 parts + tokenizer
    assert CATALOG["llama3.3-70b-instruct"].variants["q80"].files[1].endswith("-00002-of-00002.gguf")
