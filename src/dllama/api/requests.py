"""Request bodies parsed into typed objects before anything else happens.

Validation is by hand rather than by pydantic models so that every rejection has OpenAI's error shape and
status (400, not FastAPI's 422); unknown fields are ignored, as OpenAI-compatible servers do, but fields
that would change the answer and are not implemented (tools, n > 1, ...) are refused rather than silently
dropped. The JSON schemas at the end describe the same bodies for /openapi.json."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from dllama.api.responses import ApiError
from dllama.sampling.sampler import Sampler

ROLES = ("system", "developer", "user", "assistant", "tool")
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for the legacy endpoint
MAX_MESSAGES = 4096  # far above any real conversation that fits a context; bounds template rendering
MAX_STOPS = 4  # OpenAI's limit
MAX_STOP_CHARS = 512  # the stop filter's cost grows with the square of a stop string's length
MAX_LOGIT_BIAS = 1024
MAX_TOP_LOGPROBS = 20  # chat (OpenAI's limit)
MAX_COMPLETION_LOGPROBS = 5  # legacy completions (OpenAI's limit)
INT64 = (-(1 << 63), (1 << 63) - 1)
# Fields that would change the answer but are not implemented: refused rather than silently ignored.
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "audio", "prediction", "suffix")


@dataclass
class Defaults:
    """Sampling used when a request does not say (from the `dllama api` command line)."""

    temperature: float = 0.8
    top_p: float = 0.9
    seed: int | None = None
    max_tokens: int | None = None  # None = until a stop token or the context is full


@dataclass
class StreamOptions:
    include_usage: bool = False


@dataclass
class SamplingParams:
    temperature: float
    top_p: float
    seed: int | None
    max_tokens: int | None  # None = until a stop token or the context is full
    stops: list[str] = field(default_factory=list)
    logit_bias: dict[int, float] = field(default_factory=dict)

    def sampler(self) -> Sampler:
        return Sampler(self.temperature, self.top_p, self.seed)


@dataclass
class ChatRequest:
    messages: list[dict]  # {"role": system|user|assistant|tool, "content": str}
    sampling: SamplingParams
    stream: bool = False
    stream_options: StreamOptions = field(default_factory=StreamOptions)
    top_logprobs: int | None = None  # None = no logprobs; else how many alternatives per token

    @property
    def chars(self) -> int:
        return sum(len(m["content"]) for m in self.messages)


@dataclass
class CompletionRequest:
    prompt: str | list[int]  # text, or token ids
    sampling: SamplingParams
    stream: bool = False
    stream_options: StreamOptions = field(default_factory=StreamOptions)
    echo: bool = False
    logprobs: int | None = None  # None = no logprobs; else how many alternatives per token


# ---- parsing -----------------------------------------------------------------------------------------


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def parse_chat(body: dict, defaults: Defaults) -> ChatRequest:
    _common(body)
    top = None
    if _bool(body, "logprobs"):
        top = _int(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
    elif body.get("top_logprobs") is not None:
        raise ApiError(400, "'top_logprobs' requires 'logprobs': true", param="top_logprobs")
    rf = body.get("response_format")
    if rf is not None and rf != {"type": "text"}:
        raise _unsupported("response_format", "only {'type': 'text'} is supported")
    mods = body.get("modalities")
    if mods is not None and mods != ["text"]:
        raise _unsupported("modalities", "only ['text'] is supported")
    stream, options = _stream(body)
    return ChatRequest(_messages(body), _sampling(body, defaults.max_tokens, defaults), stream, options, top)


def parse_completion(body: dict, defaults: Defaults, vocab_size: int) -> CompletionRequest:
    _common(body)
    logprobs = _int(body, "logprobs", None, 0, MAX_COMPLETION_LOGPROBS)
    echo = _bool(body, "echo")
    if echo and logprobs is not None:
        raise _unsupported("logprobs", "logprobs of an echoed prompt are not supported")
    if _int(body, "best_of", 1, 1, None) != 1:
        raise _unsupported("best_of", "only best_of=1 is supported")
    sampling = _sampling(body, defaults.max_tokens or COMPLETIONS_DEFAULT_MAX_TOKENS, defaults)
    stream, options = _stream(body)
    return CompletionRequest(_prompt(body, vocab_size), sampling, stream, options, echo, logprobs)


def _common(body: dict) -> None:
    # Any model name is accepted: the server runs exactly one model (as llama.cpp's server does).
    if "model" in body and not isinstance(body["model"], str):
        raise _bad("model", "a string")
    for name in UNSUPPORTED:
        if body.get(name) is not None:
            raise _unsupported(name, f"'{name}' is not supported by this server")
    if _int(body, "n", 1, 1, None) != 1:
        raise _unsupported("n", "only n=1 is supported")


def _stream(body: dict) -> tuple[bool, StreamOptions]:
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _bad("stream_options", "an object")
    return stream, StreamOptions(_bool(options or {}, "include_usage", param="stream_options.include_usage"))


def _sampling(body: dict, default_max: int | None, defaults: Defaults) -> SamplingParams:
    temperature = _number(body, "temperature", defaults.temperature, 0.0, 2.0)
    top_p = _number(body, "top_p", defaults.top_p, 0.0, 1.0, lo_open=True)
    seed = body.get("seed")
    if seed is None:
        seed = defaults.seed
    elif not isinstance(seed, int) or isinstance(seed, bool) or not INT64[0] <= seed <= INT64[1]:
        raise _bad("seed", "a 64-bit integer")
    n = _int(body, "max_completion_tokens", None, 1, None)
    max_tokens = _int(body, "max_tokens", default_max, 1, None) if n is None else n
    return SamplingParams(temperature, top_p, seed, max_tokens, _stops(body), _logit_bias(body))


def _stops(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad("stop", "a string or an array of strings")
    if len(stops) > MAX_STOPS:
        raise _bad("stop", f"at most {MAX_STOPS} strings")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise _bad("stop", f"strings of at most {MAX_STOP_CHARS} characters")
    for s in stops:
        _text(s, "stop")
    return stops


def _logit_bias(body: dict) -> dict[int, float]:
    v = body.get("logit_bias")
    if v is None:
        return {}
    if not isinstance(v, dict) or len(v) > MAX_LOGIT_BIAS:
        raise _bad("logit_bias", f"an object of at most {MAX_LOGIT_BIAS} token ids mapped to -100..100")
    out = {}
    for k, b in v.items():
        ok_b = isinstance(b, (int, float)) and not isinstance(b, bool) and -100 <= b <= 100
        if not (k.isascii() and k.isdigit() and len(k) < 10) or not ok_b:
            raise _bad("logit_bias", "an object mapping token ids (as strings) to numbers in -100..100")
        out[int(k)] = float(b)
    return out


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if msgs is None:
        raise ApiError(400, "'messages' is required", param="messages", code="missing_required_parameter")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages", "a non-empty array of messages")
    if len(msgs) > MAX_MESSAGES:
        raise _bad("messages", f"an array of at most {MAX_MESSAGES} messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}]", "an object with 'role' and 'content'")
        role = m.get("role")
        if role not in ROLES:
            raise _bad(f"messages[{i}].role", f"one of {', '.join(ROLES)}")
        content = m.get("content")
        if content is None and role == "assistant":  # e.g. an assistant turn that only made tool calls
            content = ""
        text = _text_content(content, f"messages[{i}].content")
        out.append({"role": "system" if role == "developer" else role, "content": text})
    return out


def _text_content(content, name: str) -> str:
    if isinstance(content, str):
        return _text(content, name)
    if isinstance(content, list):  # content parts: only text ones make sense for a text model
        parts = []
        for i, p in enumerate(content):
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise _bad(f"{name}[{i}]", 'a text content part ({"type": "text", "text": ...})')
            parts.append(_text(p["text"], f"{name}[{i}].text"))
        return "".join(parts)
    raise _bad(name, "a string or an array of text content parts")


def _prompt(body: dict, vocab: int) -> str | list[int]:
    p = body.get("prompt")
    if p is None:
        raise ApiError(400, "'prompt' is required", param="prompt", code="missing_required_parameter")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
        p = p[0]
    if isinstance(p, str):
        return _text(p, "prompt")
    if isinstance(p, list) and all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in p
    ):
        return list(p)  # token ids
    raise _bad("prompt", f"a string or an array of token ids (0..{vocab - 1}); batches are not supported")


def _text(s: str, name: str) -> str:
    """JSON can carry lone UTF-16 surrogates ("\\ud800"), which are no text: refuse them here rather than
    fail in the tokenizer."""
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            raise _bad(name, "valid Unicode text (it holds a lone surrogate)") from None
    return s


def _bad(name: str, what: str) -> ApiError:
    return ApiError(400, f"'{name}' must be {what}", param=name, code="invalid_type")


def _unsupported(name: str, message: str) -> ApiError:
    return ApiError(400, message, param=name, code="unsupported_parameter")


def _number(body: dict, name: str, default, lo: float, hi: float, lo_open: bool = False):
    v = body.get(name)
    if v is None:
        return default
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or not (lo < v if lo_open else lo <= v) or v > hi:
        raise _bad(name, f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}]")
    return float(v)


def _int(body: dict, name: str, default, lo: int, hi: int | None):
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, int) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
        raise _bad(name, f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]")
    return v


def _bool(body: dict, name: str, default: bool = False, param: str | None = None) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(param or name, "a boolean")
    return v


# ---- the same bodies as JSON schemas, for /openapi.json -----------------------------------------------

_NUM = {"type": "number"}
_SAMPLING = {
    "model": {"type": "string", "description": "ignored: the server runs one model"},
    "temperature": {**_NUM, "minimum": 0, "maximum": 2},
    "top_p": {**_NUM, "exclusiveMinimum": 0, "maximum": 1},
    "seed": {"type": "integer", "minimum": INT64[0], "maximum": INT64[1]},
    "max_tokens": {"type": "integer", "minimum": 1},
    "max_completion_tokens": {"type": "integer", "minimum": 1},
    "n": {"type": "integer", "enum": [1]},
    "stop": {
        "anyOf": [
            {"type": "string", "maxLength": MAX_STOP_CHARS},
            {
                "type": "array",
                "maxItems": MAX_STOPS,
                "items": {"type": "string", "maxLength": MAX_STOP_CHARS},
            },
        ]
    },
    "logit_bias": {
        "type": "object",
        "maxProperties": MAX_LOGIT_BIAS,
        "propertyNames": {"pattern": "^[0-9]{1,9}$"},
        "additionalProperties": {**_NUM, "minimum": -100, "maximum": 100},
    },
    "stream": {"type": "boolean"},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
}
_TEXT_PARTS = {
    "type": "array",
    "items": {
        "type": "object",
        "required": ["type", "text"],
        "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}},
    },
}
CHAT_SCHEMA = {
    "type": "object",
    "required": ["messages"],
    "properties": {
        "messages": {
            "type": "array",
            "minItems": 1,
            "maxItems": MAX_MESSAGES,
            "items": {
                "type": "object",
                "required": ["role", "content"],
                "properties": {
                    "role": {"type": "string", "enum": list(ROLES)},
                    "content": {"anyOf": [{"type": "string"}, _TEXT_PARTS]},
                },
            },
        },
        **_SAMPLING,
        "logprobs": {"type": "boolean"},
        "top_logprobs": {"type": "integer", "minimum": 0, "maximum": MAX_TOP_LOGPROBS},
        "response_format": {
            "type": "object",
            "required": ["type"],
            "properties": {"type": {"type": "string", "enum": ["text"]}},
        },
    },
}
COMPLETION_SCHEMA = {
    "type": "object",
    "required": ["prompt"],
    "properties": {
        "prompt": {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "minItems": 1, "maxItems": 1, "items": {"type": "string"}},
                {"type": "array", "items": {"type": "integer", "minimum": 0}},
            ]
        },
        **_SAMPLING,
        "echo": {"type": "boolean"},
        "logprobs": {"type": "integer", "minimum": 0, "maximum": MAX_COMPLETION_LOGPROBS},
        "best_of": {"type": "integer", "enum": [1]},
    },
}
