"""The model catalog: every model of the original Distributed Llama launcher (`launch.py`), each mapped to public
GGUF files on the Hugging Face Hub with a 4-bit choice (`q40`: Q4_0 where a trustworthy repo has it, else
Q4_K_M, which dllama converts to Q8_0 at load) and an 8-bit one (`q80`: Q8_0), plus the original system's own
pre-converted `.m`/`.t` files (`dllama-m`, not loadable by dllama; listed so they can be fetched).

Every repository and file name below was read from a public listing of the repository or from public code that
downloads it; the comment above each entry says where. Where no listing confirmed a name, the entry says so.
Sizes are the hub's listing, rounded as shown there (bytes when a source gave bytes).

`DLLAMA_CATALOG=/path/to/file.json` adds or replaces entries (same fields as `Model`/`Variant`), e.g.
`{"my-model": {"params": "1B", "variants": {"q40": {"repo": "me/x-GGUF", "files": ["x-Q4_0.gguf"],
"quant": "Q4_0"}}}}`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from dllama.errors import DllamaError

QUANT_KEYS = ("q40", "q80", "dllama-m")

# Source of the dllama-m entries: the original launcher, at the last commit that still listed every model.
LAUNCH_PY = "https://github.com/b4rtaz/distributed-llama/blob/{commit}/launch.py"
LAUNCH_OLD = LAUNCH_PY.format(commit="3bbc9f033e8f3e9d2ebfa247b9a7861706aa2001")  # TinyLlama, Llama 3 8B
LAUNCH_NEW = LAUNCH_PY.format(commit="8d624a7b1f9acc0855d71a32519b22fe51e0bd86")  # the others


@dataclass(frozen=True)
class Variant:
    repo: str
    files: tuple[str, ...]  # every file to fetch; for a split GGUF all parts, the first part first
    quant: str  # the type inside: Q4_0, Q4_K_M, Q8_0 (dllama-m: Q40 weights)
    format: str = "gguf"  # or "dllama-m" (the original Distributed Llama .m model + .t tokenizer)
    size: int | None = None  # bytes, all files, as listed on the hub
    source: str = ""  # where the names were confirmed
    confirmed: bool = True


@dataclass(frozen=True)
class Model:
    name: str
    params: str
    variants: dict[str, Variant]
    aliases: tuple[str, ...] = ()  # names in the original launcher
    default: str = "q40"
    note: str = ""


def _split(prefix: str, count: int) -> tuple[str, ...]:
    """llama.cpp split names: PREFIX-00001-of-0000N.gguf ..."""
    return tuple(f"{prefix}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1))


def _dllama_parts(prefix: str, count: int) -> tuple[str, ...]:
    """The original's multi-part .m files: PREFIXaa, PREFIXab, ... (launch.py `parts()`), concatenated on use."""
    return tuple(prefix + chr(97 + i // 26) + chr(97 + i % 26) for i in range(count))


def _m(repo: str, model_files: tuple[str, ...], tokenizer: str, source: str) -> Variant:
    return Variant(repo=repo, files=(*model_files, tokenizer), quant="Q40", format="dllama-m", source=source)


GB = 10**9
MB = 10**6

_MODELS = [
    Model(
        "tinyllama-1.1b-3t",
        "1.1B",
        {
            # https://huggingface.co/TheBloke/TinyLlama-1.1B-intermediate-step-1431k-3T-GGUF/tree/main lists
            # tinyllama-1.1b-intermediate-step-1431k-3t.Q4_0.gguf (638 MB).
            "q40": Variant(
                "TheBloke/TinyLlama-1.1B-intermediate-step-1431k-3T-GGUF",
                ("tinyllama-1.1b-intermediate-step-1431k-3t.Q4_0.gguf",),
                "Q4_0",
                size=638 * MB,
                source="https://huggingface.co/TheBloke/TinyLlama-1.1B-intermediate-step-1431k-3T-GGUF/tree/main",
            ),
            # Not confirmed in the repo's listing (the copy seen was cut after Q4_K_M); the same file name appears as a
            # local path in public code that loads it with llama.cpp.
            "q80": Variant(
                "TheBloke/TinyLlama-1.1B-intermediate-step-1431k-3T-GGUF",
                ("tinyllama-1.1b-intermediate-step-1431k-3t.Q8_0.gguf",),
                "Q8_0",
                source="name inferred from the repo's pattern (listing seen was truncated)",
                confirmed=False,
            ),
            "dllama-m": _m(
                "b4rtaz/TinyLlama-1.1B-3T-Distributed-Llama",
                ("dllama_model_tinylama_1.1b_3t_q40.m",),
                "dllama_tokenizer_tinylama_1.1b_3t.t",
                LAUNCH_OLD,
            ),
        },
        aliases=("tinyllama_1_1b_3t_q40",),
    ),
    Model(
        "llama3-8b",
        "8B",
        {
            # https://huggingface.co/QuantFactory/Meta-Llama-3-8B-GGUF/tree/cfbce0002e370f097dc2a7951dd0fb69ea279984
            # lists Meta-Llama-3-8B.Q4_0.gguf (4.66 GB) and Meta-Llama-3-8B.Q8_0.gguf (8.54 GB).
            "q40": Variant(
                "QuantFactory/Meta-Llama-3-8B-GGUF",
                ("Meta-Llama-3-8B.Q4_0.gguf",),
                "Q4_0",
                size=4660 * MB,
                source="https://huggingface.co/QuantFactory/Meta-Llama-3-8B-GGUF/tree/main",
            ),
            "q80": Variant(
                "QuantFactory/Meta-Llama-3-8B-GGUF",
                ("Meta-Llama-3-8B.Q8_0.gguf",),
                "Q8_0",
                size=8540 * MB,
                source="https://huggingface.co/QuantFactory/Meta-Llama-3-8B-GGUF/tree/cfbce0002e370f097dc2a7951dd0fb69ea279984",
            ),
            "dllama-m": _m(
                "b4rtaz/Llama-3-8B-Q40-Distributed-Llama",
                ("dllama_model_meta-llama-3-8b_q40.m",),
                "dllama_tokenizer_llama3.t",
                LAUNCH_OLD,
            ),
        },
        aliases=("llama3_8b_q40",),
    ),
    Model(
        "llama3-8b-instruct",
        "8B",
        {
            # https://huggingface.co/QuantFactory/Meta-Llama-3-8B-Instruct-GGUF/tree/9a03ab3de502b45677f0b918002e81b588e0ab7f
            # lists Meta-Llama-3-8B-Instruct.Q4_0.gguf (4.66 GB); .../tree/4ef519728c96a8d9a6b76028e7cbbb3b6df9a8b9
            # lists Meta-Llama-3-8B-Instruct.Q8_0.gguf (8.54 GB).
            "q40": Variant(
                "QuantFactory/Meta-Llama-3-8B-Instruct-GGUF",
                ("Meta-Llama-3-8B-Instruct.Q4_0.gguf",),
                "Q4_0",
                size=4660 * MB,
                source="https://huggingface.co/QuantFactory/Meta-Llama-3-8B-Instruct-GGUF/tree/9a03ab3de502b45677f0b918002e81b588e0ab7f",
            ),
            "q80": Variant(
                "QuantFactory/Meta-Llama-3-8B-Instruct-GGUF",
                ("Meta-Llama-3-8B-Instruct.Q8_0.gguf",),
                "Q8_0",
                size=8540 * MB,
                source="https://huggingface.co/QuantFactory/Meta-Llama-3-8B-Instruct-GGUF/tree/4ef519728c96a8d9a6b76028e7cbbb3b6df9a8b9",
            ),
            "dllama-m": _m(
                "b4rtaz/Llama-3-8B-Q40-Instruct-Distributed-Llama",
                ("dllama_model_lama3_instruct_q40.m",),  # sic: the original's file name
                "dllama_tokenizer_llama3.t",
                LAUNCH_OLD,
            ),
        },
        aliases=("llama3_8b_instruct_q40",),
    ),
    Model(
        "llama3.1-8b-instruct",
        "8B",
        {
            # https://huggingface.co/ggml-org/Meta-Llama-3.1-8B-Instruct-Q4_0-GGUF/tree/83066b09024ca5c09a508a4c20a27ce12c085809
            # lists meta-llama-3.1-8b-instruct-q4_0.gguf (4.66 GB).
            "q40": Variant(
                "ggml-org/Meta-Llama-3.1-8B-Instruct-Q4_0-GGUF",
                ("meta-llama-3.1-8b-instruct-q4_0.gguf",),
                "Q4_0",
                size=4660 * MB,
                source="https://huggingface.co/ggml-org/Meta-Llama-3.1-8B-Instruct-Q4_0-GGUF/tree/83066b09024ca5c09a508a4c20a27ce12c085809",
            ),
            # https://huggingface.co/bartowski/Meta-Llama-3.1-8B-Instruct-GGUF/tree/36f4a587c7a442d602f3a40df45aba4449bb9898
            # lists Meta-Llama-3.1-8B-Instruct-Q8_0.gguf (8.54 GB).
            "q80": Variant(
                "bartowski/Meta-Llama-3.1-8B-Instruct-GGUF",
                ("Meta-Llama-3.1-8B-Instruct-Q8_0.gguf",),
                "Q8_0",
                size=8540 * MB,
                source="https://huggingface.co/bartowski/Meta-Llama-3.1-8B-Instruct-GGUF/tree/36f4a587c7a442d602f3a40df45aba4449bb9898",
            ),
            "dllama-m": _m(
                "b4rtaz/Llama-3_1-8B-Q40-Instruct-Distributed-Llama",
                ("dllama_model_llama3.1_instruct_q40.m",),
                "dllama_tokenizer_llama_3_1.t",
                LAUNCH_NEW,
            ),
        },
        aliases=("llama3_1_8b_instruct_q40",),
    ),
    Model(
        "llama3.1-405b-instruct",
        "405B",
        {
            # No Q4_0 split confirmed in full (leafspark/Meta-Llama-3.1-405B-Instruct-GGUF shows Q4_0 in 12 parts,
            # but only some part names were visible). https://huggingface.co/bullerwins/Meta-Llama-3.1-405B-Instruct-GGUF/tree/5c2afced1d60bad02225a1c74ebdbf8d16cba6ec
            # lists all 6 parts of Meta-Llama-3.1-405B-Instruct-Q4_K_M (44.5+44.9+44.5+44.6+45+22.2 GB).
            "q40": Variant(
                "bullerwins/Meta-Llama-3.1-405B-Instruct-GGUF",
                _split("Meta-Llama-3.1-405B-Instruct-Q4_K_M", 6),
                "Q4_K_M",
                size=245_700 * MB,
                source="https://huggingface.co/bullerwins/Meta-Llama-3.1-405B-Instruct-GGUF/tree/5c2afced1d60bad02225a1c74ebdbf8d16cba6ec",
            ),
            # q80: none listed. The Q8_0 files found (mradermacher/Meta-Llama-3.1-405B-GGUF) are .partNof9 byte
            # chunks of the base model, not llama.cpp splits of the Instruct model; no entry rather than a guess.
            "dllama-m": _m(
                "b4rtaz/Llama-3_1-405B-Q40-Instruct-Distributed-Llama",
                _dllama_parts("dllama_model_llama31_405b_q40_", 56),
                "dllama_tokenizer_llama_3_1.t",
                LAUNCH_NEW,
            ),
        },
        aliases=("llama3_1_405b_instruct_q40",),
        note="no 8-bit GGUF confirmed",
    ),
    Model(
        "llama3.2-1b-instruct",
        "1.2B",
        {
            # https://huggingface.co/bartowski/Llama-3.2-1B-Instruct-GGUF/tree/main lists
            # Llama-3.2-1B-Instruct-Q4_0.gguf (773 MB) and Llama-3.2-1B-Instruct-Q8_0.gguf (1.32 GB).
            "q40": Variant(
                "bartowski/Llama-3.2-1B-Instruct-GGUF",
                ("Llama-3.2-1B-Instruct-Q4_0.gguf",),
                "Q4_0",
                size=773 * MB,
                source="https://huggingface.co/bartowski/Llama-3.2-1B-Instruct-GGUF/tree/main",
            ),
            "q80": Variant(
                "bartowski/Llama-3.2-1B-Instruct-GGUF",
                ("Llama-3.2-1B-Instruct-Q8_0.gguf",),
                "Q8_0",
                size=1320 * MB,
                source="https://huggingface.co/bartowski/Llama-3.2-1B-Instruct-GGUF/tree/main",
            ),
            "dllama-m": _m(
                "b4rtaz/Llama-3_2-1B-Q40-Instruct-Distributed-Llama",
                ("dllama_model_llama3.2-1b-instruct_q40.m",),
                "dllama_tokenizer_llama3_2.t",
                LAUNCH_NEW,
            ),
        },
        aliases=("llama3_2_1b_instruct_q40",),
    ),
    Model(
        "llama3.2-3b-instruct",
        "3.2B",
        {
            # https://huggingface.co/bartowski/Llama-3.2-3B-Instruct-GGUF/tree/main lists
            # Llama-3.2-3B-Instruct-Q4_0.gguf (1.92 GB); .../tree/2b9f6a783b376f61530dc8717da10db392935fb2 lists
            # Llama-3.2-3B-Instruct-Q8_0.gguf (3.42 GB).
            "q40": Variant(
                "bartowski/Llama-3.2-3B-Instruct-GGUF",
                ("Llama-3.2-3B-Instruct-Q4_0.gguf",),
                "Q4_0",
                size=1920 * MB,
                source="https://huggingface.co/bartowski/Llama-3.2-3B-Instruct-GGUF/tree/main",
            ),
            "q80": Variant(
                "bartowski/Llama-3.2-3B-Instruct-GGUF",
                ("Llama-3.2-3B-Instruct-Q8_0.gguf",),
                "Q8_0",
                size=3420 * MB,
                source="https://huggingface.co/bartowski/Llama-3.2-3B-Instruct-GGUF/tree/2b9f6a783b376f61530dc8717da10db392935fb2",
            ),
            "dllama-m": _m(
                "b4rtaz/Llama-3_2-3B-Q40-Instruct-Distributed-Llama",
                ("dllama_model_llama3.2-3b-instruct_q40.m",),
                "dllama_tokenizer_llama3_2.t",
                LAUNCH_NEW,
            ),
        },
        aliases=("llama3_2_3b_instruct_q40",),
    ),
    Model(
        "llama3.3-70b-instruct",
        "70B",
        {
            # https://huggingface.co/bartowski/Llama-3.3-70B-Instruct-GGUF/tree/5b9f3dc3e06eb3d00e92b4c02d8fdeaff73d27c0
            # lists Llama-3.3-70B-Instruct-Q4_0.gguf (40.1 GB, one file); .../tree/32ab5b2246f03b2071fd4fe5a29feb96ecd84932/Llama-3.3-70B-Instruct-Q8_0
            # lists the two Q8_0 parts (39.9 + 35 GB) in that folder.
            "q40": Variant(
                "bartowski/Llama-3.3-70B-Instruct-GGUF",
                ("Llama-3.3-70B-Instruct-Q4_0.gguf",),
                "Q4_0",
                size=40_100 * MB,
                source="https://huggingface.co/bartowski/Llama-3.3-70B-Instruct-GGUF/tree/5b9f3dc3e06eb3d00e92b4c02d8fdeaff73d27c0",
            ),
            "q80": Variant(
                "bartowski/Llama-3.3-70B-Instruct-GGUF",
                _split("Llama-3.3-70B-Instruct-Q8_0/Llama-3.3-70B-Instruct-Q8_0", 2),
                "Q8_0",
                size=74_900 * MB,
                source="https://huggingface.co/bartowski/Llama-3.3-70B-Instruct-GGUF/tree/32ab5b2246f03b2071fd4fe5a29feb96ecd84932/Llama-3.3-70B-Instruct-Q8_0",
            ),
            "dllama-m": _m(
                "b4rtaz/Llama-3_3-70B-Q40-Instruct-Distributed-Llama",
                _dllama_parts("dllama_model_llama-3.3-70b_q40", 11),
                "dllama_tokenizer_llama-3.3-70b.t",
                LAUNCH_NEW,
            ),
        },
        aliases=("llama3_3_70b_instruct_q40",),
    ),
    Model(
        "deepseek-r1-distill-llama-8b",
        "8B",
        {
            # https://huggingface.co/GPT4All-Community/DeepSeek-R1-Distill-Llama-8B-GGUF/tree/main lists
            # DeepSeek-R1-Distill-Llama-8B-Q4_0.gguf (5.28 GB). (unsloth/DeepSeek-R1-Distill-Llama-8B-GGUF has
            # Q4_K_M, 4.92 GB.)
            "q40": Variant(
                "GPT4All-Community/DeepSeek-R1-Distill-Llama-8B-GGUF",
                ("DeepSeek-R1-Distill-Llama-8B-Q4_0.gguf",),
                "Q4_0",
                size=5280 * MB,
                source="https://huggingface.co/GPT4All-Community/DeepSeek-R1-Distill-Llama-8B-GGUF/tree/main",
            ),
            # unsloth/DeepSeek-R1-Distill-Llama-8B-GGUF:DeepSeek-R1-Distill-Llama-8B-Q8_0.gguf (8.5 GB), linked by
            # resolve URL in public code (the repo listing seen stopped at Q6_K); bartowski's repo has the same name.
            "q80": Variant(
                "unsloth/DeepSeek-R1-Distill-Llama-8B-GGUF",
                ("DeepSeek-R1-Distill-Llama-8B-Q8_0.gguf",),
                "Q8_0",
                size=8540 * MB,
                source="https://huggingface.co/unsloth/DeepSeek-R1-Distill-Llama-8B-GGUF/resolve/main/DeepSeek-R1-Distill-Llama-8B-Q8_0.gguf (public code)",
            ),
            "dllama-m": _m(
                "b4rtaz/DeepSeek-R1-Distill-Llama-8B-Distributed-Llama",
                ("dllama_model_deepseek-r1-distill-llama-8b_q40.m",),
                "dllama_tokenizer_deepseek-r1-distill-llama-8b.t",
                LAUNCH_NEW,
            ),
        },
        aliases=("deepseek_r1_distill_llama_8b_q40",),
    ),
    # Qwen3: the official Qwen/Qwen3-*-GGUF repos. Their file names are confirmed by public code that downloads
    # them (the hub listings were not in the searchable copy); the 0.6B and 1.7B repos carry Q8_0 only, so their
    # 4-bit file comes from unsloth. dllama's engine runs the Llama architecture: Qwen3 needs its QK-norm.
    Model(
        "qwen3-0.6b",
        "0.6B",
        {
            # unsloth/Qwen3-0.6B-GGUF:Qwen3-0.6B-Q4_K_M.gguf, named in a public download script (REPO_FILES).
            "q40": Variant(
                "unsloth/Qwen3-0.6B-GGUF",
                ("Qwen3-0.6B-Q4_K_M.gguf",),
                "Q4_K_M",
                source="public code: hf_hub_download('unsloth/Qwen3-0.6B-GGUF', 'Qwen3-0.6B-Q4_K_M.gguf')",
            ),
            # Qwen/Qwen3-0.6B-GGUF:Qwen3-0.6B-Q8_0.gguf, 639,446,688 bytes, named with its revision in public code.
            "q80": Variant(
                "Qwen/Qwen3-0.6B-GGUF",
                ("Qwen3-0.6B-Q8_0.gguf",),
                "Q8_0",
                size=639_446_688,
                source="https://huggingface.co/Qwen/Qwen3-0.6B-GGUF/resolve/main/Qwen3-0.6B-Q8_0.gguf (public code)",
            ),
            "dllama-m": _m(
                "b4rtaz/Qwen3-0.6B-Q40-Distributed-Llama",
                ("dllama_model_qwen3_0.6b_q40.m",),
                "dllama_tokenizer_qwen3_0.6b.t",
                LAUNCH_NEW,
            ),
        },
        aliases=("qwen3_0.6b_q40",),
    ),
    Model(
        "qwen3-1.7b",
        "1.7B",
        {
            "q40": Variant(
                "unsloth/Qwen3-1.7B-GGUF",
                ("Qwen3-1.7B-Q4_K_M.gguf",),
                "Q4_K_M",
                source="https://huggingface.co/unsloth/Qwen3-1.7B-GGUF/resolve/main/Qwen3-1.7B-Q4_K_M.gguf (public code)",
            ),
            "q80": Variant(
                "Qwen/Qwen3-1.7B-GGUF",
                ("Qwen3-1.7B-Q8_0.gguf",),
                "Q8_0",
                source="https://huggingface.co/Qwen/Qwen3-1.7B-GGUF/resolve/main/Qwen3-1.7B-Q8_0.gguf (public code)",
            ),
            "dllama-m": _m(
                "b4rtaz/Qwen3-1.7B-Q40-Distributed-Llama",
                ("dllama_model_qwen3_1.7b_q40.m",),
                "dllama_tokenizer_qwen3_1.7b.t",
                LAUNCH_NEW,
            ),
        },
        aliases=("qwen3_1.7b_q40",),
    ),
    Model(
        "qwen3-4b",
        "4B",
        {
            # 2,497,280,256 bytes, with its sha256, in public code.
            "q40": Variant(
                "Qwen/Qwen3-4B-GGUF",
                ("Qwen3-4B-Q4_K_M.gguf",),
                "Q4_K_M",
                size=2_497_280_256,
                source="https://huggingface.co/Qwen/Qwen3-4B-GGUF/resolve/main/Qwen3-4B-Q4_K_M.gguf (public code)",
            ),
            "q80": Variant(
                "Qwen/Qwen3-4B-GGUF",
                ("Qwen3-4B-Q8_0.gguf",),
                "Q8_0",
                source="https://huggingface.co/Qwen/Qwen3-4B-GGUF/resolve/main/Qwen3-4B-Q8_0.gguf (public code)",
            ),
            # the original launcher had no Qwen3 4B
        },
    ),
    Model(
        "qwen3-8b",
        "8B",
        {
            "q40": Variant(
                "Qwen/Qwen3-8B-GGUF",
                ("Qwen3-8B-Q4_K_M.gguf",),
                "Q4_K_M",
                source="https://huggingface.co/Qwen/Qwen3-8B-GGUF/resolve/main/Qwen3-8B-Q4_K_M.gguf (public code, "
                "with sha256 d98cdcbd...)",
            ),
            "q80": Variant(
                "Qwen/Qwen3-8B-GGUF",
                ("Qwen3-8B-Q8_0.gguf",),
                "Q8_0",
                source="https://huggingface.co/Qwen/Qwen3-8B-GGUF/resolve/main/Qwen3-8B-Q8_0.gguf (public code)",
            ),
            "dllama-m": _m(
                "b4rtaz/Qwen3-8B-Q40-Distributed-Llama",
                ("dllama_model_qwen3_8b_q40.m",),
                "dllama_tokenizer_qwen3_8b.t",
                LAUNCH_NEW,
            ),
        },
        aliases=("qwen3_8b_q40",),
    ),
    Model(
        "qwen3-14b",
        "14.8B",
        {
            # 9,001,752,960 bytes, with its sha256, in public code.
            "q40": Variant(
                "Qwen/Qwen3-14B-GGUF",
                ("Qwen3-14B-Q4_K_M.gguf",),
                "Q4_K_M",
                size=9_001_752_960,
                source="https://huggingface.co/Qwen/Qwen3-14B-GGUF/resolve/main/Qwen3-14B-Q4_K_M.gguf (public code)",
            ),
            "q80": Variant(
                "Qwen/Qwen3-14B-GGUF",
                ("Qwen3-14B-Q8_0.gguf",),
                "Q8_0",
                source="https://huggingface.co/Qwen/Qwen3-14B-GGUF/resolve/main/Qwen3-14B-Q8_0.gguf (public code)",
            ),
            "dllama-m": _m(
                "b4rtaz/Qwen3-14B-Q40-Distributed-Llama",
                _dllama_parts("dllama_model_qwen3_14b_q40_", 2),
                "dllama_tokenizer_qwen3_14b.t",
                LAUNCH_NEW,
            ),
        },
        aliases=("qwen3_14b_q40",),
    ),
    Model(
        "qwen3-30b-a3b",
        "30.5B (3.3B active)",
        {
            # 18,556,685,824 bytes at revision dae61f032d7880e6effe712505db4de5d06d6549, in public code.
            "q40": Variant(
                "Qwen/Qwen3-30B-A3B-GGUF",
                ("Qwen3-30B-A3B-Q4_K_M.gguf",),
                "Q4_K_M",
                size=18_556_685_824,
                source="https://huggingface.co/Qwen/Qwen3-30B-A3B-GGUF/resolve/dae61f032d7880e6effe712505db4de5d06d6549/Qwen3-30B-A3B-Q4_K_M.gguf (public code)",
            ),
            # Named with its commit and sha256 in github.com/jklincn/llama.moe scripts/model_download.sh.
            "q80": Variant(
                "Qwen/Qwen3-30B-A3B-GGUF",
                ("Qwen3-30B-A3B-Q8_0.gguf",),
                "Q8_0",
                source="https://github.com/jklincn/llama.moe/blob/HEAD/scripts/model_download.sh",
            ),
            "dllama-m": _m(
                "b4rtaz/Qwen3-30B-A3B-Q40-Distributed-Llama",
                _dllama_parts("dllama_model_qwen3_30b_a3b_", 5),
                "dllama_tokenizer_qwen3_30b_a3b.t",
                LAUNCH_NEW,
            ),
        },
        aliases=("qwen3_30b_a3b_q40",),
    ),
]

CATALOG: dict[str, Model] = {m.name: m for m in _MODELS}


def _from_json(name: str, d: dict) -> Model:
    try:
        variants = {
            k: Variant(
                repo=v["repo"],
                files=tuple(v["files"]),
                quant=v.get("quant", k.upper()),
                format=v.get("format", "gguf"),
                size=v.get("size"),
                source=v.get("source", "DLLAMA_CATALOG"),
                confirmed=v.get("confirmed", True),
            )  # fmt: skip
            for k, v in d["variants"].items()
        }
    except (KeyError, TypeError) as e:
        raise DllamaError(f"DLLAMA_CATALOG: entry {name!r} is missing {e}") from None
    default = d.get("default", "q40" if "q40" in variants else next(iter(variants)))
    return Model(
        name, d.get("params", "?"), variants, tuple(d.get("aliases", ())), default, d.get("note", "")
    )


def load_catalog() -> dict[str, Model]:
    """The built-in catalog plus the entries of the JSON file named by DLLAMA_CATALOG (which win)."""
    extra = os.environ.get("DLLAMA_CATALOG")
    if not extra:
        return CATALOG
    try:
        with open(extra) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise DllamaError(f"DLLAMA_CATALOG={extra}: {e}") from None
    merged = dict(CATALOG)
    for name, d in data.items():
        merged[name] = _from_json(name, d)
    return merged


def find_model(spec: str) -> tuple[Model, str] | None:
    """`NAME`, `NAME:q80`, or an original launcher name -> (model, variant key); None when not a catalog name."""
    name, _, key = spec.partition(":")
    catalog = load_catalog()
    model = catalog.get(name) or next((m for m in catalog.values() if name in m.aliases), None)
    if model is None:
        return None
    key = key or model.default
    if key not in model.variants:
        raise DllamaError(
            f"{model.name} has no {key!r} download; choose one of: "
            + ", ".join(f"{model.name}:{k}" for k in model.variants)
        )
    return model, key
