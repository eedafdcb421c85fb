"""The OpenAI-compatible HTTP API (FastAPI/ASGI) and the web chat page.

Requests are validated by hand rather than by pydantic models so that every rejection has OpenAI's error
shape and status (400, not FastAPI's 422), and unknown fields are simply ignored."""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dllama.api.engine import Engine, Job, JobError, Usage
from dllama.runtime.session import Session
from dllama.sampling.sampler import Sampler
from dllama.service import Runtime

ROLES = ("system", "developer", "user", "assistant", "tool")
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for the legacy endpoint


@dataclass
class Defaults:
    """Sampling used when a request does not say (from the `dllama api` command line)."""

    temperature: float = 0.8
    top_p: float = 0.9
    seed: int | None = None
    max_tokens: int | None = None  # None = until a stop token or the context is full


class ApiError(Exception):
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

    def response(self) -> JSONResponse:
        return JSONResponse(
            {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}},
            status_code=self.status,
            headers={"WWW-Authenticate": "Bearer"} if self.status == 401 else None,
        )


class ClientGone(Exception):
    pass


# ---- request parsing ---------------------------------------------------------------------------------


MAX_BODY = 8 << 20  # bytes: far above any real chat request, far below what could exhaust memory


async def _body(request: Request) -> dict:
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY:
        raise ApiError(413, f"the request body is larger than {MAX_BODY} bytes")
    raw = bytearray()
    async for (
        chunk
    ) in request.stream():  # counted as it arrives: a lying or absent content-length is no way in
        raw += chunk
        if len(raw) > MAX_BODY:
            raise ApiError(413, f"the request body is larger than {MAX_BODY} bytes")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _bad(name: str, what: str) -> ApiError:
    return ApiError(400, f"'{name}' must be {what}", param=name, code="invalid_type")


def _number(body: dict, name: str, default, lo: float, hi: float, lo_open: bool = False):
    v = body.get(name)
    if v is None:
        return default
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or not (lo < v if lo_open else lo <= v) or v > hi:
        raise _bad(name, f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}]")
    return float(v)


def _int(body: dict, name: str, default, lo: int):
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise _bad(name, f"an integer >= {lo}")
    return v


def _bool(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(name, "a boolean")
    return v


def _stops(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and all(isinstance(s, str) for s in v):
        return v
    raise _bad("stop", "a string or an array of strings")


def _text_content(content, name: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only text ones make sense for a text model
        parts = []
        for i, p in enumerate(content):
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise _bad(f"{name}[{i}]", 'a text content part ({"type": "text", "text": ...})')
            parts.append(p["text"])
        return "".join(parts)
    raise _bad(name, "a string or an array of text content parts")


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if msgs is None:
        raise ApiError(400, "'messages' is required", param="messages", code="missing_required_parameter")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages", "a non-empty array of messages")
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


# ---- the app -----------------------------------------------------------------------------------------


def create_app(rt: Runtime, *, model_id: str, api_key: str | None = None, defaults=None, log=None):
    defaults = defaults or Defaults()
    session = rt.session
    engine: Engine | None = None
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        nonlocal engine
        engine = Engine(rt, log=log)
        try:
            yield
        finally:
            engine.close()

    app = FastAPI(title="dllama", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        return ApiError(e.status_code, str(e.detail)).response()

    @app.exception_handler(Exception)
    async def _crash(request, e: Exception):  # logged by uvicorn; the client still gets the usual shape
        return ApiError(500, f"internal error: {type(e).__name__}: {e}").response()

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise ApiError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key")  # fmt: skip

    def sampling(body: dict) -> tuple[Sampler, list[str]]:
        temperature = _number(body, "temperature", defaults.temperature, 0.0, 2.0)
        top_p = _number(body, "top_p", defaults.top_p, 0.0, 1.0, lo_open=True)
        seed = body.get("seed", defaults.seed)
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise _bad("seed", "an integer")
        if _int(body, "n", 1, 1) != 1:
            raise ApiError(400, "only n=1 is supported", param="n", code="unsupported_value")
        return Sampler(temperature, top_p, seed), _stops(body)

    def check_length(ids: list[int], param: str) -> None:
        if not ids:
            raise ApiError(400, "the prompt is empty", param=param)
        if len(ids) >= session.max_seq:
            raise ApiError(
                400,
                f"the prompt has {len(ids)} tokens but the context holds {session.max_seq} "
                "(the model needs room for at least one generated token)",
                param=param,
                code="context_length_exceeded",
            )

    def max_new(body: dict, default: int | None) -> int:
        n = _int(body, "max_completion_tokens", None, 1)
        n = _int(body, "max_tokens", default, 1) if n is None else n
        return n or session.max_seq  # Session.generate also stops when the context is full

    async def first_event(request: Request, job: Job):
        """Waits while the job is queued and its prompt is processed. A client hanging up meanwhile cancels
        it; the HTTP status is decided here (an error before any output is still a proper 4xx/5xx)."""
        get = asyncio.ensure_future(job.events.get())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not get.done():
            get.cancel()
            job.cancelled.set()
            raise ClientGone
        kind, value = get.result()
        if kind == "error":
            raise _job_error(value)
        return kind, value

    async def run(request: Request, body: dict, ids: list[int], max_tokens: int, chunk, final):
        """Shared by both endpoints. `chunk(text, finish, usage, include_usage)` builds one streamed object
        (text None = the opening chunk, usage given = the closing usage chunk); `final(text, finish, usage)`
        the non-streamed answer."""
        sampler, stops = sampling(body)
        stream = _bool(body, "stream")
        options = body.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise _bad("stream_options", "an object")
        include_usage = _bool(options or {}, "include_usage")
        job = engine.submit(ids, sampler, max_tokens, stops)
        try:
            await first_event(request, job)
        except ClientGone:
            return Response(status_code=499)  # nobody reads it; keeps the server logs honest
        if not stream:
            return await collect(request, job, final)

        async def sse() -> AsyncIterator[str]:
            try:
                yield _sse(chunk(None, None, None, include_usage))  # role / empty first chunk
                while True:
                    kind, value = await job.events.get()
                    if kind == "text":
                        yield _sse(chunk(value, None, None, include_usage))
                    elif kind == "error":  # too late for a status code: an error event ends the stream
                        err = _job_error(value)
                        yield _sse({"error": {"message": err.message, "type": err.type, "code": err.code}})
                        return
                    else:  # done
                        finish, usage = value
                        yield _sse(chunk("", finish, None, include_usage))
                        if include_usage:
                            yield _sse(chunk(None, None, usage, include_usage))
                        yield "data: [DONE]\n\n"
                        return
            finally:
                job.cancelled.set()  # a no-op when finished; stops generation if the client went away

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip

    async def collect(request: Request, job: Job, final):
        gone = asyncio.ensure_future(_disconnected(request))
        parts = []
        try:
            while True:
                get = asyncio.ensure_future(job.events.get())
                await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    return Response(status_code=499)
                kind, value = get.result()
                if kind == "text":
                    parts.append(value)
                elif kind == "error":
                    raise _job_error(value)
                else:
                    return JSONResponse(final("".join(parts), *value))
        finally:
            gone.cancel()
            job.cancelled.set()

    def base(kind: str, rid: str) -> dict:
        return {"id": rid, "object": kind, "created": int(time.time()), "model": model_id,
                "system_fingerprint": "dllama"}  # fmt: skip

    # ---- routes ----

    @app.get("/", include_in_schema=False)
    async def index():
        return HTMLResponse(_static("index.html"))

    @app.get("/health")
    async def health():
        ok = engine.available if engine else rt.available
        return JSONResponse(
            {"status": "ok" if ok else "unavailable", "model": model_id, "nodes": rt.n_nodes,
             "context": session.max_seq, "queued": engine.queued if engine else 0},
            status_code=200 if ok else 503,
        )  # fmt: skip

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [_model_card(model_id, created)]}

    @app.get("/v1/models/{name:path}")
    async def model(request: Request, name: str):
        authorize(request)
        if name != model_id:
            raise ApiError(404, f"model {name!r} not found (this server runs {model_id!r})",
                           param="model", code="model_not_found")  # fmt: skip
        return _model_card(model_id, created)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        body = await _body(request)
        _model_param(body)
        messages = _messages(body)
        tok = session.tokenizer
        try:
            prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
        except ValueError as e:
            raise ApiError(400, str(e), param="messages") from None
        ids = tok.encode(prompt)
        check_length(ids, "messages")
        max_tokens = max_new(body, defaults.max_tokens)
        rid = f"chatcmpl-{uuid.uuid4().hex}"

        def chunk(text, finish, usage: Usage | None, include_usage):
            c = base("chat.completion.chunk", rid)
            if usage is not None:
                c["choices"] = []
            else:
                delta = {"role": "assistant", "content": ""} if text is None else {"content": text}
                c["choices"] = [{"index": 0, "delta": {} if finish else delta, "logprobs": None,
                                 "finish_reason": finish}]  # fmt: skip
            if include_usage:
                c["usage"] = _usage(usage)
            return c

        def final(text, finish, usage):
            c = base("chat.completion", rid)
            c["choices"] = [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                             "logprobs": None, "finish_reason": finish}]  # fmt: skip
            c["usage"] = _usage(usage)
            return c

        return await run(request, body, ids, max_tokens, chunk, final)

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorize(request)
        body = await _body(request)
        _model_param(body)
        ids = _prompt_ids(body, session)
        check_length(ids, "prompt")
        max_tokens = max_new(body, defaults.max_tokens or COMPLETIONS_DEFAULT_MAX_TOKENS)
        echoed = session.tokenizer.decode(ids, skip_special=True) if _bool(body, "echo") else ""
        rid = f"cmpl-{uuid.uuid4().hex}"

        def chunk(text, finish, usage, include_usage):
            c = base("text_completion", rid)
            if usage is not None:
                c["choices"] = []
            else:
                if text is None:  # the first chunk: the echoed prompt, if asked
                    text = echoed
                c["choices"] = [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]
            if include_usage:
                c["usage"] = _usage(usage)
            return c

        def final(text, finish, usage):
            c = base("text_completion", rid)
            c["choices"] = [{"index": 0, "text": echoed + text, "logprobs": None, "finish_reason": finish}]
            c["usage"] = _usage(usage)
            return c

        return await run(request, body, ids, max_tokens, chunk, final)

    return app


def _job_error(e: JobError) -> ApiError:
    return ApiError(e.status, str(e), code="cluster_unavailable" if e.status == 503 else None)


def _model_param(body: dict) -> None:
    # Any model name is accepted: the server runs exactly one model (as llama.cpp's server does).
    if "model" in body and not isinstance(body["model"], str):
        raise _bad("model", "a string")


def _prompt_ids(body: dict, session: Session) -> list[int]:
    p = body.get("prompt")
    if p is None:
        raise ApiError(400, "'prompt' is required", param="prompt", code="missing_required_parameter")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
        p = p[0]
    if isinstance(p, str):
        return session.tokenizer.encode(p)
    vocab = session.tokenizer.vocab_size
    if isinstance(p, list) and all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in p
    ):
        return list(p)  # token ids
    raise _bad("prompt", f"a string or an array of token ids (0..{vocab - 1}); batches are not supported")


def _usage(u: Usage | None) -> dict | None:
    if u is None:
        return None
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}  # fmt: skip


def _model_card(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "dllama"}


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _disconnected(request: Request) -> None:
    """Returns when the client hangs up (the body has been read, so the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _static(name: str) -> str:
    return resources.files("dllama.api").joinpath("static", name).read_text(encoding="utf-8")
