"""Model architectures as data: each family declares its config and tensors once (see `base.py`).

Adding one: a file with an `Architecture` subclass (what differs from Llama), registered below, plus the kernels
it needs in the engine."""

from dllama.arch.base import OUTPUT, OUTPUT_NORM, ROPE_FREQS, TOKEN_EMBD, Architecture, Split, TensorSpec
from dllama.arch.llama import Llama
from dllama.arch.qwen2 import Qwen2
from dllama.arch.qwen3 import Qwen3, Qwen3Moe
from dllama.errors import DllamaError

ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (Llama(), Qwen2(), Qwen3(), Qwen3Moe())}

__all__ = ["ARCHITECTURES", "OUTPUT", "OUTPUT_NORM", "ROPE_FREQS", "TOKEN_EMBD", "Architecture", "Split",
           "TensorSpec", "architecture"]  # fmt: skip


def architecture(name) -> Architecture:
    if name not in ARCHITECTURES:
        raise DllamaError(f"unsupported model architecture '{name}' (supported: {', '.join(ARCHITECTURES)})")
    return ARCHITECTURES[name]
