"""`--chat-template NAME|FILE`: a few built-in templates (the names the original Distributed Llama accepts, plus
common ones) written as small Jinja strings, or a Jinja file. They replace the template the model file carries
and render in the same sandbox (dllama.tokenizer.chat_template)."""

from __future__ import annotations

import os

from dllama.errors import DllamaError

_CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

BUILTIN: dict[str, str] = {
    "chatml": _CHATML,
    # Llama 2 chat: the system prompt folded into the first user turn, each user turn opened by BOS
    "llama2": (
        "{% if messages and messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}"
        "{% set turns = messages[1:] %}{% else %}{% set sys = none %}{% set turns = messages %}{% endif %}"
        "{% for m in turns %}{% set text = m['content'] | trim %}"
        "{% if loop.first and sys is not none %}"
        "{% set text = '<<SYS>>\\n' + (sys | trim) + '\\n<</SYS>>\\n\\n' + text %}{% endif %}"
        "{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + text + ' [/INST]' }}"
        "{% elif m['role'] == 'assistant' %}{{ ' ' + text + ' ' + eos_token }}{% endif %}{% endfor %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for m in messages %}"
        "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + (m['content'] | trim) + '<|eot_id|>' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
        "{% endif %}"
    ),
    "zephyr": (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + eos_token + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    ),
    # ChatML; `enable_thinking=False` pre-fills an empty thinking block, as Qwen3's own template does
    "qwen3": _CHATML.removesuffix("{% endif %}")
    + "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{% endif %}{% endif %}",
    "deepseek3": (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
        "{% elif m['role'] == 'user' %}{{ '<\uff5cUser\uff5c>' + m['content'] }}"
        "{% elif m['role'] == 'assistant' %}{{ '<\uff5cAssistant\uff5c>' + m['content'] + eos_token }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<\uff5cAssistant\uff5c>' }}{% endif %}"
    ),
}


def resolve_chat_template(value: str) -> str:
    """A built-in name (case-insensitive: the original spells `deepSeek3`) or the path of a Jinja file."""
    name = value.lower()
    if name in BUILTIN:
        return BUILTIN[name]
    if os.path.isfile(value):
        try:
            with open(value, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise DllamaError(f"--chat-template: cannot read {value}: {e}") from None
        if not text.strip():
            raise DllamaError(f"--chat-template: {value} is empty")
        return text
    raise DllamaError(f"--chat-template: {value!r} is neither a file nor a built-in template "
                      f"({', '.join(BUILTIN)})")  # fmt: skip
