"""OpenAI's response shapes, built in one place: errors, usage, and the chunks and final objects of the chat
and the (legacy) completions endpoints, with logprobs when asked."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from fastapi.responses import JSONResponse


class ApiError(Exception):
    """A request that gets an OpenAI-shaped error answer."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def type(self) -> str:
        return {
            401: "authentication_error",
            404: "not_found_error",
            503: "service_unavailable_error",
        }.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(
            self.body(),
            status_code=self.status,
            headers={"WWW-Authenticate": "Bearer"} if self.status == 401 else None,
        )


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens served from the KV cache (prefix reuse)

    def body(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}  # fmt: skip


@dataclass
class TokenLogprob:
    """One generated token: its text and bytes, its log-probability, and the most likely alternatives
    (text, bytes, logprob), best first."""

    token: str
    bytes: bytes
    logprob: float
    top: list[tuple[str, bytes, float]]


def model_card(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "dllama"}


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class _Shapes:
    """What both endpoints share: the id, the envelope, and the `usage` field of streamed chunks."""

    object_final = object_chunk = ""
    id_prefix = ""

    def __init__(self, model_id: str, include_usage: bool = False):
        self.id = f"{self.id_prefix}{uuid.uuid4().hex}"
        self.model_id = model_id
        self.include_usage = include_usage

    def _base(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": int(time.time()), "model": self.model_id,
                "system_fingerprint": "dllama"}  # fmt: skip

    def _chunk(self, choices: list, usage: Usage | None = None) -> dict:
        c = self._base(self.object_chunk)
        c["choices"] = choices
        if self.include_usage:  # OpenAI: null in every chunk but the last, which has no choices
            c["usage"] = usage.body() if usage else None
        return c

    def usage_chunk(self, usage: Usage) -> dict:
        return self._chunk([], usage)


class ChatShapes(_Shapes):
    object_final, object_chunk, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl-"

    def __init__(self, model_id: str, include_usage: bool = False, logprobs: bool = False):
        super().__init__(model_id, include_usage)
        self.logprobs = logprobs

    def _logprobs(self, tokens: list[TokenLogprob]) -> dict | None:
        if not self.logprobs:
            return None

        def entry(text: str, b: bytes, lp: float) -> dict:
            return {"token": text, "logprob": lp, "bytes": list(b)}

        return {
            "content": [
                {**entry(t.token, t.bytes, t.logprob), "top_logprobs": [entry(*alt) for alt in t.top]}
                for t in tokens
            ],
            "refusal": None,
        }

    def opening(self) -> dict:
        delta = {"role": "assistant", "content": ""}
        return self._chunk([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}])

    def delta(self, text: str, tokens: list[TokenLogprob]) -> dict:
        return self._chunk([{"index": 0, "delta": {"content": text}, "logprobs": self._logprobs(tokens),
                             "finish_reason": None}])  # fmt: skip

    def closing(self, finish: str) -> dict:
        return self._chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}])

    def final(self, text: str, finish: str, usage: Usage, tokens: list[TokenLogprob]) -> dict:
        c = self._base(self.object_final)
        c["choices"] = [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                         "logprobs": self._logprobs(tokens), "finish_reason": finish}]  # fmt: skip
        c["usage"] = usage.body()
        return c


class CompletionShapes(_Shapes):
    object_final = object_chunk = "text_completion"
    id_prefix = "cmpl-"

    def __init__(
        self, model_id: str, include_usage: bool = False, logprobs: int | None = None, echo: str = ""
    ):
        super().__init__(model_id, include_usage)
        self.logprobs = logprobs
        self.echo = echo
        self.offset = len(echo)  # text_offset of the next token, in characters of the returned text

    def _logprobs(self, tokens: list[TokenLogprob]) -> dict | None:
        if self.logprobs is None:
            return None
        offsets = []
        for t in tokens:
            offsets.append(self.offset)
            self.offset += len(t.token)
        return {
            "tokens": [t.token for t in tokens],
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{text: lp for text, _, lp in t.top} for t in tokens],
            "text_offset": offsets,
        }

    def _choice(self, text: str, finish: str | None, tokens: list[TokenLogprob] | None) -> dict:
        lp = self._logprobs(tokens) if tokens is not None else None
        return {"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}

    def opening(self) -> dict:  # the echoed prompt, if asked
        return self._chunk([self._choice(self.echo, None, None)])

    def delta(self, text: str, tokens: list[TokenLogprob]) -> dict:
        return self._chunk([self._choice(text, None, tokens)])

    def closing(self, finish: str) -> dict:
        return self._chunk([self._choice("", finish, None)])

    def final(self, text: str, finish: str, usage: Usage, tokens: list[TokenLogprob]) -> dict:
        c = self._base(self.object_final)
        c["choices"] = [self._choice(self.echo + text, finish, tokens)]
        c["usage"] = usage.body()
        return c
