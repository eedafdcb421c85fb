"""The thread pool (csrc/pool.c): every chunk of a task runs exactly once, on a valid thread, and has finished when
pool_run returns, with 1-6 threads on this machine's cores (so threads are descheduled mid-task and the others take
their chunks), uneven chunks, and idle gaps long enough for the workers to go to sleep. tests/c/pool_check.c does
the checking; here it is compiled as is and under ThreadSanitizer (the pool's lock-free claims and hand-offs)."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "src" / "dllama" / "engine" / "csrc"


@pytest.mark.parametrize("sanitizer, tasks", [(None, 4000), ("thread", 600)])
def test_pool_runs_every_chunk_once(tmp_path, sanitizer, tasks):
    cc = shutil.which("gcc")
    if cc is None:
        pytest.fail("gcc is missing: apt-get install gcc")
    exe = tmp_path / "pool_check"
    flags = ["-O1", "-g", f"-fsanitize={sanitizer}"] if sanitizer else ["-O2"]
    r = subprocess.run([cc, *flags, "-std=c11", "-pthread", "-Wall", "-Werror", f"-I{CSRC}",
                        str(ROOT / "tests" / "c" / "pool_check.c"), str(CSRC / "pool.c"), "-o", str(exe)],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = subprocess.run([str(exe), str(tasks)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr
    assert "ThreadSanitizer" not in r.stderr, r.stderr
