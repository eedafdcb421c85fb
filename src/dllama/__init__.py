"""dllama: tensor-parallel LLM inference over several ordinary computers."""

__version__ = "0.1.0"
