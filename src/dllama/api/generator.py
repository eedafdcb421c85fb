"""One model, one Session (the runtime's), one generation thread.

The KV cache holds one conversation at a time, so requests queue here and run one after another (FIFO);
a follow-up request that extends the previous conversation only computes its new tokens (Session.prefill
reuses the common prefix). Generation runs in a plain thread — the C kernels release the GIL — and hands
its events to the asyncio side through the request's own asyncio.Queue."""

from __future__ import annotations

import asyncio
import queue
import sys
import threading
import traceback
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from dllama.api.responses import TokenLogprob, Usage
from dllama.runtime.stats import Stats
from dllama.sampling.sampler import Sampler
from dllama.service import Runtime


class StopFilter:
    """Cuts generated text at the first stop string. Text that could be the beginning of a stop string is
    held back until it is known not to be one, so a stop string is never emitted, not even in part."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.buf = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was hit). After a hit the rest is discarded."""
        self.buf += text
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf = self.buf[: min(hits)], ""
            return out, True
        # the longest tail of buf that is a proper prefix of some stop string must wait for more text
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.buf)), keep, -1):
                if self.buf.endswith(s[:k]):
                    keep = k
                    break
        out, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep :]
        return out, False

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


class ScoringSampler:
    """Wraps a Sampler: adds the logit bias, and records for every token it picks the log-probabilities
    (log-softmax of the raw logits, before bias and temperature, as OpenAI reports them) of that token and
    of the `top` most likely ones."""

    needs_full_logits = True  # the Session must not reduce the logits to their argmax for this sampler

    def __init__(self, inner: Sampler, top: int | None, bias: dict[int, float]):
        self.inner, self.top, self.bias = inner, top, bias
        self.temperature, self.top_p = inner.temperature, inner.top_p
        self.records: deque[tuple[int, float, np.ndarray, np.ndarray]] = deque()

    def __call__(self, logits: np.ndarray) -> int:
        biased = logits
        if self.bias:
            biased = logits.astype(np.float32, copy=True)
            ids = np.fromiter(self.bias, dtype=np.int64)
            ok = ids < len(biased)  # ids past the vocabulary bias nothing
            biased[ids[ok]] += np.fromiter(self.bias.values(), dtype=np.float32)[ok]
        tok = self.inner(biased)
        if self.top is not None:
            z = logits.astype(np.float64)
            z -= z.max()
            # -inf (a masked logit) is no JSON number: floor at -9999, as OpenAI reports the impossible
            lp = np.maximum(z - np.log(np.exp(z).sum()), -9999.0)
            k = self.top
            best = np.argpartition(-lp, k - 1)[:k] if 0 < k < len(lp) else np.arange(len(lp) if k else 0)
            best = best[np.argsort(-lp[best], kind="stable")]
            self.records.append((tok, float(lp[tok]), best, lp[best]))
        return tok


class JobError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Job:
    """One generation request. The generation thread puts events on `events` (an asyncio.Queue of the
    loop that submitted it): ("start", None) once the prompt is in the cache, ("text", (str,
    [TokenLogprob])) deltas, then ("done", (finish_reason, Usage)) or ("error", JobError)."""

    ids: list[int]
    sampler: Sampler | ScoringSampler
    max_tokens: int
    stops: list[str]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def put(self, kind: str, value=None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone (server shutting down): nobody is listening
            self.cancelled.set()


class Generator:
    """The generation queue and its thread."""

    def __init__(self, rt: Runtime, log=None):
        self.rt = rt
        self.session = rt.session
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dllama-generate", daemon=True)
        self._thread.start()

    def submit(self, ids: list[int], sampler, max_tokens: int, stops: list[str]) -> Job:
        if self._closing.is_set():
            raise JobError(503, "the server is shutting down")
        job = Job(ids, sampler, max_tokens, stops, asyncio.get_running_loop())
        self._jobs.put(job)
        return job

    @property
    def available(self) -> bool:
        return self.rt.available

    @property
    def queued(self) -> int:
        return self._jobs.qsize()

    def stop(self) -> None:
        """Shutting down: the running generation ends at its next token, queued ones are refused. Safe to
        call from a signal handler (it only sets a flag)."""
        self._closing.set()

    def close(self) -> None:
        self.stop()
        self._jobs.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            if job.cancelled.is_set():  # its client left while it was queued
                continue
            if self._closing.is_set():
                job.put("error", JobError(503, "the server is shutting down"))
                continue
            try:
                self._ensure_cluster()
                self._generate(job)
            except JobError as e:
                job.put("error", e)
            except Exception as e:  # a failed forward (e.g. a worker died): answer, keep serving
                self.session.reset()  # the cache may hold a half-written position
                if self.rt.available:
                    self.log("".join(traceback.format_exception(e)).rstrip())
                    job.put("error", JobError(500, f"generation failed: {e}"))
                else:
                    self.log(f"cluster unavailable: {e}")
                    job.put("error", JobError(503, f"cluster unavailable: {e}"))

    def _ensure_cluster(self) -> None:
        try:  # every request retries, so the server recovers by itself once the workers are back
            if self.rt.ensure_available():
                self.log("reconnected to the workers")
        except Exception as e:
            raise JobError(503, f"cluster unavailable (reconnecting failed: {e})") from None

    def _token_logprob(self, record) -> TokenLogprob:
        tok = self.session.tokenizer

        def text(i: int) -> tuple[str, bytes]:
            b = tok.token_bytes(int(i))
            return b.decode("utf-8", errors="replace"), b

        t, lp, best, best_lp = record
        return TokenLogprob(*text(t), lp, [(*text(i), float(v)) for i, v in zip(best, best_lp, strict=True)])

    def _generate(self, job: Job) -> None:
        s = self.session
        tok = s.tokenizer
        s.stats.clear()
        dec = tok.stream_decoder()
        stops = StopFilter(job.stops)
        scoring = job.sampler if getattr(job.sampler, "top", None) is not None else None
        pending: list[TokenLogprob] = []  # logprobs of the tokens whose text has not been sent yet
        n, hit, started = 0, False, False

        def should_stop() -> bool:
            return job.cancelled.is_set() or self._closing.is_set()

        gen = s.generate(job.ids, job.sampler, job.max_tokens, tok.stop_ids, should_stop=should_stop)
        try:
            for t in gen:
                if not started:
                    job.put("start")
                    started = True
                n += 1
                if scoring is not None:  # the sampler has just picked t: its record is the last one
                    pending.append(self._token_logprob(scoring.records.pop()))
                    scoring.records.clear()
                text, hit = stops.push(dec.push(t))
                if text:
                    job.put("text", (text, pending))
                    pending = []
                if hit:
                    break
        finally:
            gen.close()  # ends Session.generate now on a stop-string hit; the cache keeps what was computed
        if not started:
            job.put("start")
        if not hit:
            text, hit = stops.push(dec.flush())
            text += "" if hit else stops.flush()
            if text or pending:
                job.put("text", (text, pending))
        finish = "stop" if hit or s.finish_reason == "stop" else "length"
        if s.finish_reason == "cancelled" or should_stop():
            finish = "cancelled"
        usage = Usage(len(job.ids), n, s.reused)
        job.put("done", (finish, usage))
        gen_s = sum(st.total_s for st in s.stats.gen)
        self.log(
            f"{usage.prompt_tokens} prompt tokens ({usage.cached_tokens} reused), {n} generated"
            f"{f' at {Stats.tokens_per_s(s.stats.gen):.1f} tokens/s' if gen_s else ''}; {finish}"
        )
