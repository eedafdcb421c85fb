"""The runtime behind every front end: the model file, its tokenizer, the root runner and its workers (local worker
processes included), and the session that holds the conversation in the KV cache."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass

from dllama.errors import DllamaError
from dllama.kv_cache import DEFAULT_KV_TYPE
from dllama.model.default import resolve_model
from dllama.model.gguf_model import GGUFModel
from dllama.runtime.local_workers import LocalWorkers
from dllama.runtime.root import DEFAULT_MAX_BATCH, Root
from dllama.runtime.session import Session, check_prompt_length
from dllama.runtime.threads import default_threads
from dllama.tokenizer import Tokenizer


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class RuntimeConfig:
    model: str | None = None  # path (default: the default model)
    nthreads: int | None = None  # None: the CPUs this process may use, shared fairly with local workers
    max_seq: int | None = None
    workers: tuple[str, ...] = ()
    local_workers: int = 0
    split_weights: tuple[float, ...] | None = None  # relative share of each node (--weights), root first
    sync: str = "q80"  # format of the partial sums exchanged after each block
    secret: str | None = None  # None: $DLLAMA_SECRET
    tokenizer: str | None = None  # a `.t` file (with a `.m` model) or a tokenizer.json replacing the GGUF's own
    chat_template: str | None = None  # a built-in name or a Jinja file replacing the model's template
    max_batch: int | None = None  # tokens per forward pass (default: dllama.runtime.root.DEFAULT_MAX_BATCH)
    kv_storage: str = "ram"  # "disk": the KV cache in a memory-mapped file
    kv_type: str = DEFAULT_KV_TYPE  # f32, f16 or q8_0
    kv_dir: str | None = None
    encrypt: bool = False  # every link AES-256-GCM encrypted (--encrypt)

    @classmethod
    def from_args(cls, args) -> RuntimeConfig:
        g = lambda name, default=None: getattr(args, name, default)  # noqa: E731
        return cls(model=g("model"), nthreads=g("nthreads"), max_seq=g("max_seq_len"), workers=tuple(g("workers") or ()),
                   local_workers=g("local_workers", 0) or 0, split_weights=tuple(g("weights")) if g("weights") else None,
                   sync=g("buffer_float_type", "q80"), secret=g("secret"), tokenizer=g("tokenizer"),
                   chat_template=g("chat_template"), max_batch=g("batch"), kv_storage=g("kv_cache_storage", "ram") or "ram",
                   kv_dir=g("kv_cache_dir"), kv_type=g("kv_cache_type") or DEFAULT_KV_TYPE,
                   encrypt=bool(g("encrypt", False)))  # fmt: skip


def _is_original_model(path: str | None) -> bool:
    return bool(path) and path.lower().endswith(".m")


def model_path(cfg: RuntimeConfig, log=log) -> str:
    """The GGUF to load: `--model` resolved, or the GGUF converted (once, cached) from an original `.m` + `.t`."""
    t = cfg.tokenizer
    if _is_original_model(cfg.model):
        if not t:
            raise DllamaError(f"{cfg.model} is a Distributed Llama .m model: give its tokenizer with --tokenizer FILE.t")
        if not t.lower().endswith(".t"):
            raise DllamaError(f"a .m model needs the Distributed Llama tokenizer (.t file) it was exported with, "
                              f"got --tokenizer {t}")  # fmt: skip
        from dllama.model.original_format import ensure_gguf_from_original

        return ensure_gguf_from_original(cfg.model, t, log=log)
    if cfg.model and os.path.isdir(cfg.model):  # a Hugging Face folder: converted once into a cache beside it
        from dllama.model.hf_convert import ensure_gguf_from_hf

        return str(ensure_gguf_from_hf(cfg.model))
    if t and t.lower().endswith(".t"):
        raise DllamaError(f"--tokenizer {t}: a .t tokenizer goes with a .m model (a GGUF carries its own "
                          f"tokenizer; to replace it give a tokenizer.json)")  # fmt: skip
    return resolve_model(cfg.model)


def _byte_level(data: dict) -> bool:
    """Whether a tokenizer.json decodes byte-level BPE (GPT-2 style) rather than SentencePiece pieces."""
    dec = data.get("decoder") or {}
    parts = (dec.get("decoders") or []) if dec.get("type") == "Sequence" else [dec]
    return any(isinstance(d, dict) and d.get("type") == "ByteLevel" for d in parts)


def tokenizer_from_json(path: str, gguf_tokenizer: Tokenizer | None, vocab_size: int) -> Tokenizer:
    """A Tokenizer whose text <-> ids mapping comes from `path` (a Hugging Face tokenizer.json) while the
    special-token facts (BOS/EOS, stop tokens, add-BOS, chat template) stay the GGUF's; a GGUF without tokenizer
    metadata takes them from the tokenizer_config.json beside the file, if any."""
    from tokenizers import Tokenizer as Backend

    if not os.path.isfile(path):
        raise DllamaError(f"--tokenizer: file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        data = json.loads(text)
        backend = Backend.from_str(text)
    except Exception as e:  # OSError, bad JSON, or whatever the tokenizers parser raises
        raise DllamaError(f"--tokenizer: {path} is not a tokenizer.json ({' '.join(str(e).split())[:200]})") from None
    top = max([*backend.get_vocab(with_added_tokens=True).values(), -1])
    if top >= vocab_size:
        raise DllamaError(f"--tokenizer: {path} has token ids up to {top} but the model's vocabulary has "
                          f"{vocab_size} entries")  # fmt: skip
    model = "gpt2" if _byte_level(data) else "llama"
    if gguf_tokenizer is not None:
        g = gguf_tokenizer
        facts = {"model": model, "vocab_size": g.vocab_size, "bos_id": g.bos_id, "eos_id": g.eos_id,
                 "bos_token": g.bos_token, "eos_token": g.eos_token, "add_bos": g.add_bos,
                 "stop_ids": sorted(g.stop_ids), "special_ids": sorted(g.special_ids),
                 "chat_template": g.chat_template}  # fmt: skip
        return Tokenizer(backend, facts)
    config = {}
    cfg_path = os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer_config.json")
    if os.path.isfile(cfg_path):
        try:
            with open(cfg_path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError) as e:
            raise DllamaError(f"cannot read {cfg_path}: {e}") from None

    def special(name):
        v = config.get(name)
        v = v.get("content") if isinstance(v, dict) else v
        return (v, backend.token_to_id(v)) if isinstance(v, str) and backend.token_to_id(v) is not None else (None, None)

    (bos, bos_id), (eos, eos_id) = special("bos_token"), special("eos_token")
    specials = [i for i, t in backend.get_added_tokens_decoder().items() if t.special]
    stops = {eos_id} if eos_id is not None else set()
    stops.update(i for i in specials if backend.id_to_token(i) in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>"))
    facts = {"model": model, "vocab_size": vocab_size, "bos_id": bos_id, "eos_id": eos_id, "bos_token": bos,
             "eos_token": eos, "add_bos": bool(config.get("add_bos_token", False)) and bos_id is not None,
             "stop_ids": sorted(stops), "special_ids": sorted(specials),
             "chat_template": config.get("chat_template") if isinstance(config.get("chat_template"), str) else None}  # fmt: skip
    return Tokenizer(backend, facts)


def load_tokenizer(cfg: RuntimeConfig, path: str, model: GGUFModel) -> Tokenizer:
    """The model's tokenizer, with the `--tokenizer` (tokenizer.json) and `--chat-template` overrides applied."""
    replace = cfg.tokenizer and not _is_original_model(cfg.model)
    try:
        tok = Tokenizer.from_gguf(path)  # reads the vocabulary only when its cache is cold
    except (ValueError, DllamaError) as e:  # the file carries no (usable) tokenizer
        if not replace:
            raise DllamaError(f"{e}; give a tokenizer.json with --tokenizer") from None
        tok = None
    if replace:
        tok = tokenizer_from_json(cfg.tokenizer, tok, model.config.vocab_size)
    if cfg.chat_template:
        from dllama.service.chat_templates import resolve_chat_template
        from dllama.tokenizer import render_chat

        template = resolve_chat_template(cfg.chat_template)
        try:  # a broken template is reported now, not at the first chat turn
            render_chat(template, [{"role": "user", "content": "hi"}], bos_token=tok.bos_token or "",
                        eos_token=tok.eos_token or "")  # fmt: skip
        except ValueError as e:
            raise DllamaError(f"--chat-template {cfg.chat_template}: {e}") from None
        tok.chat_template = template
    return tok


class Runtime:
    def __init__(self, cfg: RuntimeConfig, log=log):
        self.log = log
        if cfg.local_workers < 0:
            raise DllamaError("--local-workers must be >= 0")
        t0 = time.perf_counter()
        path = model_path(cfg, log)
        model = GGUFModel(path)
        self.tokenizer = load_tokenizer(cfg, path, model)
        name = os.path.basename(cfg.model if _is_original_model(cfg.model) else path)
        self.model_id = name.removesuffix(".gguf").removesuffix(".m")
        # local workers share this machine's CPUs (affinity and cgroup quota): oversubscribing them costs ~30 %
        self.nthreads = cfg.nthreads or default_threads(1 + cfg.local_workers)
        secret = cfg.secret or os.environ.get("DLLAMA_SECRET")
        workers = list(cfg.workers)
        self.local = None
        if cfg.local_workers:
            if cfg.secret:
                raise DllamaError("--secret cannot be combined with --local-workers (they use their own secret)")
            self.local = LocalWorkers(cfg.local_workers, nthreads=default_threads(1 + cfg.local_workers),
                                      encrypt=cfg.encrypt)
            workers += self.local.addresses
            secret = self.local.secret
        try:
            self.root = Root(model, nthreads=self.nthreads, max_seq=cfg.max_seq, workers=workers,
                             split_weights=list(cfg.split_weights) if cfg.split_weights else None, sync=cfg.sync, secret=secret, log=log,
                             max_batch=cfg.max_batch or DEFAULT_MAX_BATCH, kv_storage=cfg.kv_storage, kv_dir=cfg.kv_dir,
                             kv_type=cfg.kv_type, encrypt=cfg.encrypt)  # fmt: skip
        except BaseException:
            if self.local:
                self.local.close()
            raise
        self.session = Session(self.root, self.tokenizer)
        c = model.config
        log(f"model: {os.path.basename(path)} ({c.name or c.arch}, {c.n_layers} layers, dim {c.dim}, "
            f"{c.n_heads}/{c.n_kv_heads} heads, vocab {c.vocab_size}); context {self.root.max_seq}; "
            f"{self.root.n_nodes} node(s) x {self.nthreads} thread(s); loaded in {time.perf_counter() - t0:.1f} s")  # fmt: skip

    @property
    def max_seq(self) -> int:
        return self.root.max_seq

    @property
    def n_nodes(self) -> int:
        return self.root.n_nodes

    @property
    def available(self) -> bool:
        return self.root.available

    def ensure_available(self) -> bool:
        """Reconnects the workers after a failure (the session forgets its cached tokens); True if it did."""
        if self.root.available:
            return False
        self.session.reset()
        self.root.reconnect()
        return True

    def check_prompt(self, ids: list[int]) -> None:
        check_prompt_length(len(ids), self.max_seq)

    def close(self) -> None:
        self.root.close()
        if self.local:
            self.local.close()
            self.local = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
