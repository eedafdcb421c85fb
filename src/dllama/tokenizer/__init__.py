"""GGUF tokenizer (ids identical to transformers' GGUF conversion) and chat-template rendering."""

from .tokenizer import StreamDecoder, Tokenizer

__all__ = ["Tokenizer", "StreamDecoder", "render_chat"]


def __getattr__(name: str):
    # jinja2 is loaded only when a chat is rendered: a plain `dllama inference` starts ~17 ms sooner
    if name == "render_chat":
        from .chat_template import render_chat

        return render_chat
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
