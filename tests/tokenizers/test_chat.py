"""render_chat: a tokenizer's jinja chat template around one user message, as transformers renders it."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from hypothesis import given, settings

from runner.config.errors import ConfigError
from runner.tokenizers.chat import render_chat
from tests.helpers.tokenizers import texts

# Llama-3-Instruct's template, shortened: bos_token, a header per message, trimmed content.
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


@dataclass
class Templated:
    """Just what render_chat reads from a tokenizer."""

    chat_template: str | None
    bos_token: str | None = "<|begin_of_text|>"
    eos_token: str | None = "<|eot_id|>"


def test_llama3_template():
    assert render_chat(Templated(LLAMA3), "  Hi!  ") == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


@settings(max_examples=50, deadline=None)
@given(texts())
def test_the_prompt_is_kept_as_it_is(prompt):
    assert render_chat(Templated("[{{ messages[0]['content'] }}]"), prompt) == f"[{prompt}]"


def test_blocks_are_trimmed_as_transformers_does():
    template = "{% for m in messages %}\n  {{ m['role'] }}\n{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    assert render_chat(Templated(template), "x") == "  user\n>"


def test_tojson_does_not_escape_html_and_loop_controls_work():
    template = "{% for m in messages %}{% if m['role'] == 'user' %}{{ m | tojson }}{% break %}{% endif %}{% endfor %}"
    assert json.loads(render_chat(Templated(template), "<b>&é</b>")) == {"role": "user", "content": "<b>&é</b>"}
    assert "<b>&é</b>" in render_chat(Templated(template), "<b>&é</b>")


def test_missing_bos_eos_are_empty():
    assert render_chat(Templated("{{ bos_token }}|{{ eos_token }}", None, None), "x") == "|"


def test_no_template_is_a_config_error(sp):
    with pytest.raises(ConfigError) as e:
        render_chat(sp, "hi", source="r.yaml")
    (p,) = e.value.problems
    assert (p.source, p.key) == ("r.yaml", "generate.chat")
    assert "has no chat template" in p.message


@pytest.mark.parametrize("template, why", [
    ("{{ raise_exception('Conversation roles must alternate') }}", "Conversation roles must alternate"),
    ("{% for m in messages %}", "Unexpected end of template"),  # a syntax error
    ("{{ ''.__class__.__mro__ }}", "unsafe"),  # the sandbox refuses
])
def test_a_failing_template_is_a_config_error(template, why):
    with pytest.raises(ConfigError, match=f"generate.chat: the tokenizer's chat template fails: .*{why}"):
        render_chat(Templated(template), "hi")
