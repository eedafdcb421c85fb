"""Render a model's Jinja chat template the way transformers' `apply_chat_template` does.

Chat templates ship inside model files, so they are untrusted code: they run in jinja2's immutable
sandbox, and everything they see is rebuilt from plain JSON-like data first.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["render_chat"]


class _GenerationTag(jinja2.ext.Extension):
    """Accept HF's `{% generation %}...{% endgeneration %}` (assistant-mask markers) and render the body as is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


class _Namespace(jinja2.utils.Namespace):
    # A namespace would otherwise let a template store dunder attributes and poke at internals.
    def __init__(*args, **kwargs):  # same signature trick as jinja's Namespace: `namespace(self=...)` works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson HTML-escapes `<>&'`, which would corrupt prompts; HF uses plain json.dumps.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


_ENV = ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
)
_ENV.filters["tojson"] = _tojson
_ENV.globals.update(
    raise_exception=_raise_exception,
    strftime_now=_strftime_now,
    namespace=_Namespace,
    dict=lambda *a, **kw: dict(*a, **kw),  # the real `dict` type would expose class attributes
)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    return _ENV.from_string(template)


def _plain(value: Any) -> Any:
    """Rebuild caller data from plain types so the template cannot reach methods of rich objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if callable(getattr(value, "model_dump", None)):  # pydantic request models
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _chatml(messages: list[dict], add_generation_prompt: bool) -> str:
    parts = []
    for m in messages:
        content = m.get("content") or ""
        if isinstance(content, list):  # OpenAI-style content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        parts.append(f"<|im_start|>{m.get('role', 'user')}\n{content}<|im_end|>\n")
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


def render_chat(
    template: str | None,
    messages: list[dict],
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    **extra: Any,
) -> str:
    """Render `messages` with `template` (ChatML when None). `extra` (e.g. `tools=`) is passed to the template.

    Any template failure, including a sandbox violation, raises ValueError with a one-line message.
    """
    if template is None:
        return _chatml(messages, add_generation_prompt)
    variables = _plain({"tools": None, "documents": None, **extra})
    try:
        return _compile(template).render(
            messages=_plain(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
            **variables,
        )
    except jinja2.TemplateError as e:
        kind = (
            "chat template error" if type(e) is jinja2.TemplateError else f"chat template {type(e).__name__}"
        )
        raise ValueError(f"{kind}: {' '.join(str(e).split())}") from e
    except Exception as e:  # template code can trigger arbitrary errors (TypeError, ZeroDivisionError, ...)
        raise ValueError(f"chat template failed: {type(e).__name__}: {' '.join(str(e).split())}") from e
