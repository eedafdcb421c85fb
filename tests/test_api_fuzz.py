"""Schemathesis against a live `dllama api`: requests generated from the server's own /openapi.json, both
valid ones and ones that break the schema, must never get a 5xx (or a dropped connection).

Bounded for the test suite (DLLAMA_FUZZ_EXAMPLES examples per operation and mode, default 30);
scripts/fuzz_api.sh runs the same with many more."""

import os

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from test_api import ApiServer

EXAMPLES = int(os.environ.get("DLLAMA_FUZZ_EXAMPLES", "30"))
LONG_RUN = "DLLAMA_FUZZ_EXAMPLES" in os.environ  # new random examples each time; the suite's are fixed
MAX_TOKENS = 3  # generation is not what is tested here: keep every answer short


@pytest.fixture(scope="module")
def server():
    # a small context bounds the work of any request, whatever the fuzzer sends
    s = ApiServer("--temperature", "0", "--max-seq-len", "256")
    yield s
    s.stop()


def _cap(case) -> None:
    if isinstance(case.body, dict):
        for name in ("max_tokens", "max_completion_tokens"):
            v = case.body.get(name)
            if v is None or (isinstance(v, int) and not isinstance(v, bool) and v > MAX_TOKENS):
                case.body[name] = MAX_TOKENS


def test_openapi_schema_describes_the_endpoints(server):
    doc = httpx.get(server.url + "openapi.json").json()
    paths = doc["paths"]
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health"):
        assert path in paths, sorted(paths)
    chat = paths["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert chat["required"] == ["messages"] and "top_logprobs" in chat["properties"]
    # schemathesis itself validates the document when loading it
    schemathesis.openapi.from_url(server.url + "openapi.json")


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_fuzzed_requests_never_get_a_server_error(server, mode):
    schema = schemathesis.openapi.from_url(server.url + "openapi.json")
    operations = [r.ok() for r in schema.get_all_operations()]
    assert len(operations) >= 5
    if mode == GenerationMode.NEGATIVE:  # only a request body can break the schema (paths are any string)
        operations = [op for op in operations if op.method.upper() == "POST"]
        assert len(operations) == 2
    seen: dict[str, set[int]] = {}
    for op in operations:

        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=not LONG_RUN,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(case=op.as_strategy(generation_mode=mode))
        def run(case):
            _cap(case)
            r = case.call(base_url=server.url.rstrip("/"), timeout=60)
            seen.setdefault(case.operation.label, set()).add(r.status_code)
            assert r.status_code < 500, (case.body, r.status_code, r.text[:500])

        run()
    print(mode, seen)
    assert server.proc.poll() is None
    assert "Traceback" not in server.log, server.log
    # the fuzzer really got through to generation (not only rejections)
    if mode == GenerationMode.POSITIVE:
        assert 200 in seen["POST /v1/chat/completions"] and 200 in seen["POST /v1/completions"], seen
