"""The real chat templates of Gemma 2/3, Qwen2.5/3 and Phi-3.5/4-mini (tests/tokenizers/templates),
rendered by runner.tokenizers.chat and by transformers' apply_chat_template; and, for Gemma 3,
Qwen2.5 and Phi-3.5, the prompt's ids and the stop ids from a GGUF of that family's shape."""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from gguf import TokenType
from hypothesis import given, settings
from hypothesis import strategies as st
from jinja2 import TemplateError
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from runner.config.errors import ConfigError
from runner.config.schema import TokenizerKind, TokenizerSection
from runner.tokenizers import build
from runner.tokenizers.chat import render_chat, render_messages
from tests.helpers.tokenizers import texts
from tests.tokenizers.conftest import (
    SPECIALS,
    byte_level,
    train_byte_level,
    write_gguf,
    write_spm_gguf,
)

TEMPLATES = {path.stem: path.read_text(encoding="utf-8")
             for path in sorted((Path(__file__).parent / "templates").glob("*.jinja"))}
# template -> the bos and eos texts its model's tokenizer_config.json names
TOKENS = {"gemma-3-it": ("<bos>", "<eos>"), "gemma-2-it": ("<bos>", "<eos>"),
          "qwen2.5-instruct": (None, "<|im_end|>"), "qwen3": (None, "<|im_end|>"),
          "phi-3.5-mini-instruct": ("<s>", "<|endoftext|>"), "phi-4-mini-instruct": ("<|endoftext|>", "<|endoftext|>")}


@dataclass
class Templated:
    """Just what render_messages reads from a tokenizer."""

    chat_template: str
    bos_token: str | None
    eos_token: str | None


@functools.cache
def transformers_tokenizer(name: str) -> PreTrainedTokenizerFast:
    """A one-word tokenizer with the bos/eos texts of template `name`: all apply_chat_template needs."""
    bos, eos = TOKENS[name]
    return PreTrainedTokenizerFast(tokenizer_object=HFTokenizer(models.WordLevel({"<unk>": 0}, "<unk>")),
                                   bos_token=bos, eos_token=eos)


def transformers_render(name: str, messages: list[dict]) -> str:
    return transformers_tokenizer(name).apply_chat_template(messages, chat_template=TEMPLATES[name], tokenize=False,
                                                            add_generation_prompt=True)


def conversations(system: bool = True) -> st.SearchStrategy[list[dict]]:
    """An optional system message, then user and assistant in turn, ending with the user."""
    turns = st.lists(st.tuples(texts(), texts()), max_size=2)
    first = st.one_of(st.just([]), texts().map(lambda t: [{"role": "system", "content": t}])) if system \
        else st.just([])
    return st.tuples(first, turns, texts()).map(lambda parts: [
        *parts[0],
        *[m for user, reply in parts[1] for m in ({"role": "user", "content": user},
                                                   {"role": "assistant", "content": reply})],
        {"role": "user", "content": parts[2]}])


def test_every_template_is_here():
    assert set(TEMPLATES) == set(TOKENS)


@pytest.mark.parametrize("name", sorted(set(TEMPLATES) - {"gemma-2-it"}))
@settings(max_examples=50, deadline=None)
@given(messages=conversations())
def test_rendering_matches_transformers(name, messages):
    ours = render_messages(Templated(TEMPLATES[name], *TOKENS[name]), messages)
    assert ours == transformers_render(name, messages)


@settings(max_examples=50, deadline=None)
@given(messages=conversations(system=False))
def test_gemma2_rendering_matches_transformers(messages):
    ours = render_messages(Templated(TEMPLATES["gemma-2-it"], *TOKENS["gemma-2-it"]), messages)
    assert ours == transformers_render("gemma-2-it", messages)


def test_gemma2_refuses_a_system_message_as_transformers_does():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    with pytest.raises(ConfigError, match="generate.chat: the tokenizer's chat template fails: System role not"):
        render_chat(Templated(TEMPLATES["gemma-2-it"], *TOKENS["gemma-2-it"]), "Hi", system="Be brief.")
    with pytest.raises(TemplateError, match="System role not supported"):
        transformers_render("gemma-2-it", messages)


def test_the_published_prompts():
    """What each family's prompt looks like, written out once."""
    def render(name: str, system: str | None = None) -> str:
        return render_chat(Templated(TEMPLATES[name], *TOKENS[name]), " Hi! ", system=system)

    assert render("gemma-3-it", "Be brief.") == \
        "<bos><start_of_turn>user\nBe brief.\n\nHi!<end_of_turn>\n<start_of_turn>model\n"
    assert render("gemma-2-it") == "<bos><start_of_turn>user\nHi!<end_of_turn>\n<start_of_turn>model\n"
    assert render("qwen2.5-instruct") == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a "
                                          "helpful assistant.<|im_end|>\n<|im_start|>user\n Hi! <|im_end|>\n"
                                          "<|im_start|>assistant\n")
    assert render("qwen3") == "<|im_start|>user\n Hi! <|im_end|>\n<|im_start|>assistant\n"
    assert render("phi-3.5-mini-instruct") == "<|user|>\n Hi! <|end|>\n<|assistant|>\n"
    assert render("phi-4-mini-instruct", "S") == "<|system|>S<|end|><|user|> Hi! <|end|><|assistant|>"


# --- a family's GGUF: its template, its prompt's ids, its stop ids ------------------------------


def gguf_section(path) -> TokenizerSection:
    return TokenizerSection(kind=TokenizerKind.gguf, path=str(path))


def with_ids(tokenizer: PreTrainedTokenizerFast, messages: list[dict]) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.fixture(scope="module")
def families(spm_vocabulary, tmp_path_factory):
    """family -> (ours, transformers' tokenizer from the same GGUF, the token that ends a turn)."""
    out = {}
    for family, arch, template in (("gemma3", "gemma3", "gemma-3-it"), ("phi3", "phi3", "phi-3.5-mini-instruct")):
        folder = tmp_path_factory.mktemp(family)
        write_spm_gguf(folder / "t.gguf", arch, spm_vocabulary, bos_token_id=1, eos_token_id=2, unk_token_id=0,
                       add_bos_token=True, chat_template=TEMPLATES[template],
                       **({"add_space_prefix": False} if arch == "gemma3" else {}))
        out[family] = (folder, "<end_of_turn>" if family == "gemma3" else "<|end|>")
    # Qwen2.5's GGUF: a byte-level vocabulary split by Qwen's regex, <|im_end|> its eos, no BOS.
    data = json.loads(train_byte_level(byte_level(), vocab_size=600).to_str())
    tokens = sorted(data["model"]["vocab"], key=data["model"]["vocab"].get)
    types = [TokenType.CONTROL if t in SPECIALS else TokenType.NORMAL for t in tokens]
    folder = tmp_path_factory.mktemp("qwen2")
    write_gguf(folder / "t.gguf", tokens, types, [" ".join(m) for m in data["model"]["merges"]], pre="qwen2",
               bos_token_id=0, eos_token_id=2, add_bos_token=False, chat_template=TEMPLATES["qwen2.5-instruct"])
    out["qwen2"] = (folder, "<|im_end|>")
    return {family: (build(gguf_section(folder / "t.gguf")),
                     AutoTokenizer.from_pretrained(str(folder), gguf_file="t.gguf"), end)
            for family, (folder, end) in out.items()}


@pytest.mark.parametrize("family", ["gemma3", "qwen2", "phi3"])
@settings(max_examples=50, deadline=None)
@given(prompt=texts(), system=st.one_of(st.none(), texts()))
def test_a_family_prompt_matches_transformers(families, family, prompt, system):
    ours, reference, _ = families[family]
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    text = render_chat(ours, prompt, system=system)
    assert text == reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.encode(text, bos=False, allow_special=True) == with_ids(reference, messages)


@pytest.mark.parametrize("family", ["gemma3", "qwen2", "phi3"])
def test_a_family_turn_end_stops_generation(families, family):
    ours, reference, end = families[family]
    assert ours.token_id(end) in ours.eos_ids
    assert reference.eos_token_id in ours.eos_ids
