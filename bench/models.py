"""The benchmark models, made once and cached in bench/models/ (gitignored)."""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = os.path.join(HERE, "models")


def synthetic_1b() -> str:
    """Llama-3.2-1B-like shape, random weights (seed 0), all matrices Q4_0."""
    from dllama.testing.synthetic import SHAPES, write_synthetic_gguf

    path = os.path.join(MODELS, "synth-1b-q4_0.gguf")
    if not os.path.exists(path):
        os.makedirs(MODELS, exist_ok=True)
        print("writing the 1B-shape synthetic model ...", file=sys.stderr)
        write_synthetic_gguf(path, **SHAPES["1b"], weight_type="q4_0", seed=0)
    return path


def smollm2_original() -> str:
    from dllama.model.default import default_model_path

    return default_model_path()


def smollm2_q4_0() -> str:
    """The default model converted to pure Q4_0 (every matrix, the tied embedding/output included)."""
    from dllama.model.convert import convert

    path = os.path.join(MODELS, "smollm2-135m-q4_0.gguf")
    if not os.path.exists(path):
        os.makedirs(MODELS, exist_ok=True)
        convert(smollm2_original(), path, "q40")
    return path
