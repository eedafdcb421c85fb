"""The OpenAI-compatible HTTP API (FastAPI/ASGI) and the web chat page.

A request is read (size-capped), then parsed, validated, rendered and tokenized in a small thread pool —
never on the event loop, so one huge request cannot stall the others or /health — and only then handed to
the generation thread as token ids. Parsing is in `requests`, OpenAI's response shapes in `responses`."""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dllama.api.generator import Generator, Job, JobError, ScoringSampler
from dllama.api.requests import (
    CHAT_SCHEMA,
    COMPLETION_SCHEMA,
    ChatRequest,
    CompletionRequest,
    Defaults,
    SamplingParams,
    parse_chat,
    parse_completion,
    parse_json,
)
from dllama.api.responses import SSE_DONE, ApiError, ChatShapes, CompletionShapes, model_card, sse
from dllama.service import Runtime

__all__ = ["Defaults", "create_app"]

MAX_BODY = 8 << 20  # bytes: far above any real chat request, far below what could exhaust memory
PREPARE_THREADS = 2  # parsing/tokenizing requests: bounded, so a flood of requests queues, not spawns


class ClientGone(Exception):
    pass


class ServedModel:
    """What the routes need from the runtime: the tokenizer, the context size, the cluster's state and the
    generation thread. The only code here that touches the runtime."""

    def __init__(self, rt: Runtime, log=None):
        self.rt = rt
        self.tokenizer = rt.tokenizer
        self.max_seq: int = rt.max_seq
        self.log = log
        self.generator: Generator | None = None
        self._max_chars: int | None = None
        self._stopping = False

    def start(self) -> None:
        self.generator = Generator(self.rt, log=self.log)
        if self._stopping:
            self.generator.stop()

    def stop(self) -> None:
        """Shutdown has begun (called from the signal handler): end running generations now."""
        self._stopping = True
        if self.generator is not None:
            self.generator.stop()

    def close(self) -> None:
        if self.generator is not None:
            self.generator.close()

    @property
    def available(self) -> bool:
        return self.rt.available

    @property
    def n_nodes(self) -> int:
        return self.rt.n_nodes

    @property
    def queued(self) -> int:
        return self.generator.queued if self.generator else 0

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    # ---- run in the prepare pool ----

    def max_chars(self) -> int:
        """A text longer than this cannot fit the context whatever it says (no token is longer than the
        longest one in the vocabulary): rejected before the tokenizer, which holds the GIL, ever sees it."""
        if self._max_chars is None:
            longest = max(len(self.tokenizer.token_bytes(i)) for i in range(self.vocab_size))
            self._max_chars = self.max_seq * longest
        return self._max_chars

    def prepare_chat(self, raw: bytes, defaults: Defaults) -> tuple[ChatRequest, list[int]]:
        req = parse_chat(parse_json(raw), defaults)
        if req.chars > self.max_chars():
            raise self._too_long(None, "messages")
        try:
            prompt = self.tokenizer.apply_chat_template(req.messages, add_generation_prompt=True)
        except ValueError as e:
            raise ApiError(400, str(e), param="messages") from None
        return req, self._encode(prompt, "messages")

    def prepare_completion(self, raw: bytes, defaults: Defaults) -> tuple[CompletionRequest, list[int], str]:
        req = parse_completion(parse_json(raw), defaults, self.vocab_size)
        ids = req.prompt if isinstance(req.prompt, list) else self._encode(req.prompt, "prompt")
        self._check_length(ids, "prompt")
        echo = self.tokenizer.decode(ids, skip_special=True) if req.echo else ""
        return req, ids, echo

    def _encode(self, text: str, param: str) -> list[int]:
        if len(text) > self.max_chars():
            raise self._too_long(None, param)
        ids = self.tokenizer.encode(text)
        self._check_length(ids, param)
        return ids

    def _check_length(self, ids: list[int], param: str) -> None:
        if not ids:
            raise ApiError(400, "the prompt is empty", param=param)
        if len(ids) >= self.max_seq:
            raise self._too_long(len(ids), param)

    def _too_long(self, n: int | None, param: str) -> ApiError:
        return ApiError(
            400,
            f"the prompt has {n if n is not None else 'far more'} tokens but the context holds {self.max_seq} "
            "(the model needs room for at least one generated token)",
            param=param,
            code="context_length_exceeded",
        )

    # ---- on the event loop ----

    def submit(self, ids: list[int], p: SamplingParams, top_logprobs: int | None) -> Job:
        sampler = p.sampler()
        if top_logprobs is not None or p.logit_bias:
            sampler = ScoringSampler(sampler, top_logprobs, p.logit_bias)
        try:  # Session.generate also stops when the context is full
            return self.generator.submit(ids, sampler, p.max_tokens or self.max_seq, p.stops)
        except JobError as e:
            raise _job_error(e) from None


def create_app(rt: Runtime, *, model_id: str, api_key: str | None = None, defaults=None, log=None):
    """The app. `app.state.stop_generation()` ends running generations at once (for a prompt shutdown)."""
    defaults = defaults or Defaults()
    model = ServedModel(rt, log)
    pool = ThreadPoolExecutor(PREPARE_THREADS, thread_name_prefix="dllama-prepare")
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        model.start()
        try:
            yield
        finally:
            model.close()
            pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="dllama", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json")  # fmt: skip
    app.state.stop_generation = model.stop
    _error_handlers(app)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise ApiError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key")  # fmt: skip

    async def prepare(request: Request, fn):
        authorize(request)
        raw = await _read_body(request)
        return await asyncio.get_running_loop().run_in_executor(pool, fn, raw, defaults)

    @app.get("/", include_in_schema=False)
    async def index():
        return HTMLResponse(_static("index.html"))

    @app.get("/health", responses=_doc(200, 503))
    async def health():
        ok = model.available
        return JSONResponse(
            {"status": "ok" if ok else "unavailable", "model": model_id, "nodes": model.n_nodes,
             "context": model.max_seq, "queued": model.queued},
            status_code=200 if ok else 503,
        )  # fmt: skip

    @app.get("/v1/models", responses=_doc(200, 401))
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [model_card(model_id, created)]}

    @app.get("/v1/models/{name:path}", responses=_doc(200, 401, 404))
    async def model_info(request: Request, name: str):
        authorize(request)
        if name != model_id:
            raise ApiError(404, f"model {name!r} not found (this server runs {model_id!r})",
                           param="model", code="model_not_found")  # fmt: skip
        return model_card(model_id, created)

    @app.post("/v1/chat/completions", openapi_extra=_body_doc(CHAT_SCHEMA), responses=_POST_RESPONSES)
    async def chat_completions(request: Request):
        req, ids = await prepare(request, model.prepare_chat)
        shapes = ChatShapes(model_id, req.stream_options.include_usage, logprobs=req.top_logprobs is not None)
        return await _answer(request, model.submit(ids, req.sampling, req.top_logprobs), shapes, req.stream)

    @app.post("/v1/completions", openapi_extra=_body_doc(COMPLETION_SCHEMA), responses=_POST_RESPONSES)
    async def completions(request: Request):
        req, ids, echo = await prepare(request, model.prepare_completion)
        shapes = CompletionShapes(model_id, req.stream_options.include_usage, req.logprobs, echo)
        return await _answer(request, model.submit(ids, req.sampling, req.logprobs), shapes, req.stream)

    return app


# ---- the request/response cycle shared by both endpoints ---------------------------------------------


async def _read_body(request: Request) -> bytes:
    # Only JSON: a cross-site form or text/plain POST (which a browser sends without asking) is refused.
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise ApiError(415, "the request body must be JSON (Content-Type: application/json)",
                       code="unsupported_media_type")  # fmt: skip
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY:
        raise ApiError(413, f"the request body is larger than {MAX_BODY} bytes")
    raw = bytearray()
    # counted as it arrives: a lying or absent content-length is no way in
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY:
            raise ApiError(413, f"the request body is larger than {MAX_BODY} bytes")
    return bytes(raw)


async def _answer(request: Request, job: Job, shapes, stream: bool) -> Response:
    try:
        await _first_event(request, job)
    except ClientGone:
        return Response(status_code=499)  # nobody reads it; keeps the server logs honest
    if not stream:
        return await _collect(request, job, shapes)
    return StreamingResponse(_stream(job, shapes), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip


async def _first_event(request: Request, job: Job):
    """Waits while the job is queued and its prompt is processed. A client hanging up meanwhile cancels it;
    the HTTP status is decided here (an error before any output is still a proper 4xx/5xx)."""
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


async def _stream(job: Job, shapes) -> AsyncIterator[str]:
    try:
        yield sse(shapes.opening())
        while True:
            kind, value = await job.events.get()
            if kind == "text":
                yield sse(shapes.delta(*value))
            elif kind == "error":  # too late for a status code: an error event ends the stream
                err = _job_error(value)
                yield sse({"error": {"message": err.message, "type": err.type, "code": err.code}})
                return
            else:  # done
                finish, usage = value
                yield sse(shapes.closing(finish))
                if shapes.include_usage:
                    yield sse(shapes.usage_chunk(usage))
                yield SSE_DONE
                return
    finally:
        job.cancelled.set()  # a no-op when finished; stops generation if the client went away


async def _collect(request: Request, job: Job, shapes) -> Response:
    gone = asyncio.ensure_future(_disconnected(request))
    parts, tokens = [], []
    try:
        while True:
            get = asyncio.ensure_future(job.events.get())
            await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not get.done():
                get.cancel()
                return Response(status_code=499)
            kind, value = get.result()
            if kind == "text":
                parts.append(value[0])
                tokens += value[1]
            elif kind == "error":
                raise _job_error(value)
            else:
                finish, usage = value
                return JSONResponse(shapes.final("".join(parts), finish, usage, tokens))
    finally:
        gone.cancel()
        job.cancelled.set()


async def _disconnected(request: Request) -> None:
    """Returns when the client hangs up (the body has been read, so the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _job_error(e: JobError) -> ApiError:
    return ApiError(e.status, str(e), code="cluster_unavailable" if e.status == 503 else None)


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        return ApiError(e.status_code, str(e.detail)).response()

    @app.exception_handler(Exception)
    async def _crash(request, e: Exception):  # logged by uvicorn; the client still gets the usual shape
        return ApiError(500, f"internal error: {type(e).__name__}: {e}").response()


def _static(name: str) -> str:
    return resources.files("dllama.api").joinpath("static", name).read_text(encoding="utf-8")


# ---- OpenAPI documentation (the validation itself is in `requests`) -----------------------------------

_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
_STATUS = {
    200: "OK",
    400: "invalid request",
    401: "missing or wrong API key",
    404: "not found",
    413: "request body too large",
    415: "the body is not JSON",
    500: "generation failed",
    503: "the cluster is unavailable",
}


def _doc(*codes: int) -> dict:
    return {
        c: {"description": _STATUS[c]} if c == 200 else
        {"description": _STATUS[c], "content": {"application/json": {"schema": _ERROR_SCHEMA}}}
        for c in codes
    }  # fmt: skip


_POST_RESPONSES = _doc(400, 401, 413, 415, 500, 503)
_POST_RESPONSES[200] = {
    "description": "the answer: a JSON object, or with `stream` server-sent events of chunks",
    "content": {
        "application/json": {"schema": {"type": "object"}},
        "text/event-stream": {"schema": {"type": "string"}},
    },
}


def _body_doc(schema: dict) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
