"""Test oracles and test models, not used by the product: the NumPy reference (every kernel, and a whole forward
pass that reads the GGUF with gguf-py alone) and the random-weight model generator (`python -m
dllama.testing.synthetic`)."""
