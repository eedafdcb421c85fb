"""`dllama chat`: a streamed terminal chat using the model's own chat template.

Every turn re-renders the whole conversation; Session.prefill keeps the KV cache of the common prefix, so
only the new turn's tokens are computed (the stats line after each answer says how many)."""

from __future__ import annotations

import os
import signal
import sys
import threading

from dllama.cli import options
from dllama.errors import DllamaError
from dllama.runtime.stats import Stats
from dllama.sampling.sampler import Sampler
from dllama.service import Runtime, RuntimeConfig

PROMPT = ">>> "
HELP = "Ctrl-C stops an answer, Ctrl-D or /exit quits, /reset starts a new conversation."


def register(sub) -> None:
    p = sub.add_parser("chat", help="chat with the model in the terminal")
    options.add_model_args(p)
    options.add_cluster_args(p)
    options.add_sampling_args(p)
    p.add_argument("--system", help="system prompt (default: the chat template's own, if any)")
    p.add_argument(
        "--max-tokens",
        type=options.positive_int,
        help="answer length limit (default: until the context is full)",
    )
    p.set_defaults(run=run)


class Chat:
    def __init__(self, rt: Runtime, args, out=sys.stdout):
        self.rt = rt
        self.session = rt.session
        self.tok = rt.tokenizer
        self.system = [{"role": "system", "content": args.system}] if args.system else []
        self.history: list[dict] = []  # user/assistant pairs, then the pending user message
        self.sampler = Sampler(args.temperature, args.topp, args.seed)
        self.max_tokens = args.max_tokens
        # room kept free for the answer before old turns are dropped
        self.reserve = min(args.max_tokens or 256, rt.max_seq // 4)
        self.out = out
        color = out.isatty() and not os.environ.get("NO_COLOR")
        self.dim = (lambda s: f"\x1b[2m{s}\x1b[0m") if color else (lambda s: s)

    def say(self, text: str) -> None:
        self.out.write(self.dim(text) + "\n")
        self.out.flush()

    def prompt_ids(self) -> list[int] | None:
        """The conversation rendered and tokenized; drops the oldest turns while it does not fit."""
        dropped = 0
        while True:
            # message text is tokenized as text: typed special tokens cannot forge turns
            ids = self.tok.encode_chat(self.system + self.history, add_generation_prompt=True)
            if len(ids) + self.reserve <= self.session.max_seq or len(self.history) == 1:
                break
            del self.history[:2]  # the oldest user message and its answer; the system prompt stays
            dropped += 1
        if dropped:
            self.say(f"(context full: dropped the oldest {dropped} turn(s) to make room)")
        if len(ids) >= self.session.max_seq:
            self.say(f"(message too long: {len(ids)} tokens, the context holds {self.session.max_seq})")
            return None
        return ids

    def ensure_cluster(self) -> None:
        if not self.rt.available:
            self.say("(reconnecting to the workers)")
            self.rt.ensure_available()

    def turn(self, message: str) -> None:
        stop = threading.Event()
        # Ctrl-C sets a flag checked between tokens: interrupting a forward pass would leave the KV cache
        # (and, with workers, the cluster protocol) half-way through a step.
        previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
        try:
            self._turn(message, stop)
        finally:
            signal.signal(signal.SIGINT, previous)

    def _turn(self, message: str, stop: threading.Event) -> None:
        self.history.append({"role": "user", "content": message})
        try:
            self.ensure_cluster()
            ids = self.prompt_ids()
        except (DllamaError, OSError, ValueError) as e:  # ValueError: the chat template rejected it
            self.history.pop()
            self.say(f"error: {e}")
            return
        if ids is None:
            self.history.pop()
            return
        answer, finish = self.answer(ids, stop)
        if finish == "error":
            self.history.pop()
            return
        self.history.append({"role": "assistant", "content": answer})

    def answer(self, ids: list[int], stop: threading.Event) -> tuple[str, str]:
        s, tok = self.session, self.tok
        s.stats.clear()
        dec, parts, n = tok.stream_decoder(), [], 0
        try:
            max_new = self.max_tokens or s.max_seq
            for t in s.generate(ids, self.sampler, max_new, tok.stop_ids, should_stop=stop.is_set):
                n += 1
                parts.append(dec.push(t))
                self.out.write(parts[-1])
                self.out.flush()
        except DllamaError as e:
            self.out.write("\n")
            self.say(f"error: {e}")
            return "", "error"
        parts.append(dec.flush())
        self.out.write(parts[-1] + "\n")
        finish = "cancelled" if stop.is_set() else s.finish_reason
        note = {"cancelled": " [stopped]", "length": " [length limit]"}.get(finish, "")
        if finish == "length" and len(s.tokens) + 1 >= s.max_seq:
            note = " [context full]"
        self.say(
            f"({len(ids) - s.reused} new prompt tokens, {s.reused} reused; {n} tokens at "
            f"{Stats.tokens_per_s(s.stats.gen):.1f} tokens/s){note}"
        )
        return "".join(parts), finish


def run(args) -> int:
    rt = Runtime(RuntimeConfig.from_args(args))
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    try:
        chat = Chat(rt, args)
        chat.say(HELP)
        while True:
            try:
                line = input(PROMPT)
            except EOFError:
                print()
                break
            except KeyboardInterrupt:  # at the prompt: forget the line, keep chatting
                print()
                continue
            message = line.strip()
            if message in ("/exit", "/quit"):
                break
            if message == "/reset":
                chat.history.clear()
                chat.say("(new conversation)")
            elif message:
                chat.turn(message)
    finally:
        rt.close()
    return 0
