"""Models from the Hugging Face Hub: a catalog of known GGUF repositories, downloads into the standard Hugging
Face cache (resumable, sha256-checked) and look-ups of what is already downloaded (no network)."""

from dllama.hub.catalog import CATALOG, Model, Variant, find_model, load_catalog
from dllama.hub.download import download, is_model_spec, local_model_path, split_parts

__all__ = [
    "CATALOG",
    "Model",
    "Variant",
    "download",
    "find_model",
    "is_model_spec",
    "load_catalog",
    "local_model_path",
    "split_parts",
]
