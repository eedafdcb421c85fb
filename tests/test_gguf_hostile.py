"""Hostile GGUF files (tests/gguf_craft.py): every one must give one `error:` line through the CLI and a non-zero
exit, never a traceback, a hang or unbounded memory (each run under a 3 GB address-space limit and a timeout).
The untouched re-serialized base file must run, so the serializer itself is not what the loader refuses."""

from __future__ import annotations

import resource
import subprocess
import sys

import pytest
from gguf_craft import base_model, cases

LIMIT_AS = 3 << 30


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT_AS, LIMIT_AS))


def run_cli(path: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "dllama", "inference", "--model", path, "--prompt", "hi", "--steps", "2",
            "--nthreads", "1", "--temperature", "0"]  # fmt: skip
    return subprocess.run(args, capture_output=True, text=True, timeout=120, preexec_fn=_limit)


@pytest.fixture(scope="module")
def crafted(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    base = base_model(d)
    files = {}
    for name, data in cases(base).items():
        p = d / f"{name}.gguf"
        p.write_bytes(data)
        files[name] = str(p)
    (d / "valid.gguf").write_bytes(base.to_bytes())
    files["valid"] = str(d / "valid.gguf")
    return files


def test_reserialized_base_runs(crafted):
    r = run_cli(crafted["valid"])
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr


def _names() -> list[str]:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        return sorted(cases(base_model(Path(d))))


@pytest.mark.parametrize("case", _names())
def test_hostile_file_gives_one_error_line(crafted, case):
    r = run_cli(crafted[case])
    err = r.stderr.strip().splitlines()
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and "MemoryError" not in r.stderr, r.stderr[-2000:]
    assert err and err[-1].startswith("error: "), r.stderr[-2000:]
    assert sum(line.startswith("error") for line in err) == 1, r.stderr
