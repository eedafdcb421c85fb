"""GGUF tokenizer (ids identical to transformers' GGUF conversion) and chat-template rendering."""

from .chat_template import render_chat
from .tokenizer import StreamDecoder, Tokenizer

__all__ = ["Tokenizer", "StreamDecoder", "render_chat"]
