"""Chat prompts: a tokenizer's chat template rendered around one user message.

Templates are Hugging Face's jinja, rendered the way transformers' apply_chat_template renders
them (sandboxed; trim_blocks, lstrip_blocks, loop controls, raise_exception, tojson, strftime_now).
"""
from __future__ import annotations

import functools
import json
from datetime import datetime

from jinja2 import Template, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from runner.config.errors import ConfigError, problem
from runner.tokenizers.base import Tokenizer

KEY = "generate.chat"


def render_chat(tokenizer: Tokenizer, prompt: str, source: str = "recipe", system: str | None = None) -> str:
    """`prompt` as the user's message in the tokenizer's chat template (after `system`'s, if
    any), ready for the reply.

    Encode the result with encode(text, bos=False, allow_special=True): the template writes the
    special tokens, BOS included when the model wants one (as apply_chat_template does).
    """
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return render_messages(tokenizer, messages, source)


def render_messages(tokenizer: Tokenizer, messages: list[dict], source: str = "recipe") -> str:
    """A conversation (role/content dicts) in the tokenizer's chat template, ready for the reply."""
    if tokenizer.chat_template is None:
        raise ConfigError([problem(source, KEY, "the tokenizer has no chat template (its files ship none)")])
    try:
        return _compiled(tokenizer.chat_template).render(
            messages=messages,
            add_generation_prompt=True,
            bos_token=tokenizer.bos_token or "",
            eos_token=tokenizer.eos_token or "",
        )
    except TemplateError as e:
        raise ConfigError([problem(source, KEY, f"the tokenizer's chat template fails: {e}")]) from None


@functools.lru_cache(maxsize=8)
def _compiled(template: str) -> Template:
    """The template compiled once: a long one (Qwen3's) takes longer to compile than to render."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # jinja's own tojson escapes HTML characters, which would change the prompt.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise(message: str):
    raise TemplateError(message)
