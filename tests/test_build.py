"""The C kernels build for every SIMD path we ship, not only for this machine's: NEON (aarch64, with and
without the dot-product extension, e.g. Raspberry Pi 5 and 4) and the portable scalar fallback (x86-64
without AVX). Compiling is what can be checked here; the NEON code cannot run on this x86 machine."""

import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "src" / "dllama" / "engine" / "csrc"
FILES = ["kernels.c", "ops.c", "pool.c", "repack.c", "types.c"]  # py_*.c need the target's Python headers


def compile_all(cc: str, march: str, tmp_path: Path) -> None:
    for f in FILES:
        r = subprocess.run([cc, "-std=c11", "-O2", "-Wall", "-Werror", "-Wno-unused-function", "-fPIC", f"-march={march}",
                            "-c", str(CSRC / f), "-o", str(tmp_path / (f + ".o"))],
                           capture_output=True, text=True)  # fmt: skip
        assert r.returncode == 0, f"{cc} -march={march} {f}:\n{r.stderr}"
    # every kernel the type table (types.c) names exists for this target: link with no undefined symbols
    objs = [str(tmp_path / (f + ".o")) for f in FILES]
    r = subprocess.run([cc, "-shared", "-o", str(tmp_path / "k.so"), *objs, "-Wl,--no-undefined", "-lm", "-lpthread"],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, f"{cc} -march={march} link:\n{r.stderr}"


@pytest.mark.parametrize("march", ["armv8.2-a+dotprod", "armv8-a"])
def test_neon_kernels_compile_for_aarch64(tmp_path, march):
    cc = shutil.which("aarch64-linux-gnu-gcc")
    if cc is None:
        pytest.fail(
            "aarch64-linux-gnu-gcc is missing: apt-get install gcc-aarch64-linux-gnu (scripts/test.sh does)"
        )
    compile_all(cc, march, tmp_path)
    syms = subprocess.run(
        ["aarch64-linux-gnu-nm", str(tmp_path / "kernels.c.o")], capture_output=True, text=True
    )
    assert "dot_q4_0_neon" in syms.stdout  # the NEON path is really compiled in


def test_scalar_fallback_compiles_without_avx(tmp_path):
    compile_all("gcc", "x86-64", tmp_path)
