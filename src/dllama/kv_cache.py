"""The KV cache types and the default one: a leaf module, so every layer (cli, service, runtime, net, engine) reads
the same default without importing upward."""

KV_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}  # GGML type of a cached K or V row
# f16 halves the cache of f32 and moves logits by ~0.02 on the default model's F32 copy (tests/test_failures.py,
# tests/test_kv_cache.py); a prompt batch and single steps round through the same kv_store (csrc/attention.c), so
# their logits stay bit-identical.
DEFAULT_KV_TYPE = "f16"
