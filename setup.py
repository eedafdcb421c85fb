"""Builds the C kernels on the user's machine. SIMD paths are chosen at build time from the CPU
(-march=native by default; set DLLAMA_MARCH to e.g. "x86-64-v3" or "armv8.2-a+dotprod" to target another
CPU, or to "none" for a portable scalar build). The scalar path is always compiled in as well."""

import os
import platform

from setuptools import Extension, setup

march = os.environ.get("DLLAMA_MARCH", "native")
flags = ["-O3", "-std=c11", "-pthread", "-fno-math-errno", "-Wall", "-Wno-unused-function"]
if march != "none":
    # aarch64 gcc spells it -mcpu=native
    flags.append(f"-mcpu={march}" if platform.machine() in ("aarch64", "arm64") and march == "native" else f"-march={march}")

csrc = "src/dllama/engine/csrc"
engine_sources = ("py_engine.c", "py_kernels.c", "py_testing.c", "graph.c", "kernels.c", "ops.c", "attention.c", "pool.c", "repack.c", "types.c", "arena.c")
setup(
    ext_modules=[
        Extension(  # the per-node engine: layer graph, kernels, thread pool (knows nothing of sockets)
            "dllama.engine._kernels",
            sources=[f"{csrc}/{f}" for f in engine_sources],
            depends=[f"{csrc}/{h}" for h in ("common.h", "comm.h", "graph.h")],
            extra_compile_args=flags,
            extra_link_args=["-pthread"],
        ),
        Extension(  # the TCP all-to-all: one implementation of the engine's comm interface
            "dllama.net._mesh",
            sources=["src/dllama/net/csrc/mesh_tcp.c"],
            depends=[f"{csrc}/comm.h"],
            extra_compile_args=flags,
            libraries=["crypto"],  # OpenSSL's libcrypto: AES-256-GMAC tags / AES-256-GCM of every partial-sum frame
        ),
    ]
)
