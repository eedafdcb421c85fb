"""What the front ends (CLI, chat, API) call: one runtime configuration, and the runtime that opens the model,
its tokenizer and the cluster, reconnects after a failure, checks prompts and closes everything."""

from dllama.service.runtime import Runtime, RuntimeConfig

__all__ = ["Runtime", "RuntimeConfig"]
