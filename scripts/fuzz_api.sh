#!/usr/bin/env bash
# Long fuzzing run of the OpenAI-compatible API (manual use): schemathesis against a live `dllama api`,
# generated from its /openapi.json, valid and schema-breaking requests; fails on any 5xx.
# Usage: scripts/fuzz_api.sh [EXAMPLES_PER_OPERATION_AND_MODE]   (default 2000; the test suite uses 30)
set -euo pipefail
cd "$(dirname "$0")/.."
export DLLAMA_FUZZ_EXAMPLES="${1:-2000}"
exec python -m pytest -q -s tests/test_api_fuzz.py
