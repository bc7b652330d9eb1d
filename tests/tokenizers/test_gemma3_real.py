"""The gguf tokenizer on Gemma 3 270M's real vocabulary (262,144 SentencePiece tokens) against
transformers' conversion of the same file.

The GGUF is the one the Gemma 3 recipe fetches (tests/conftest.py's gemma3_gguf; Gemma's terms
apply, and nothing of it is in the repository).
"""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.config.schema import TokenizerKind, TokenizerSection
from runner.tokenizers import build
from tests.helpers.tokenizers import english_corpus, texts
from tests.tokenizers.conftest import CODE

pytestmark = pytest.mark.real
# Gemma's own kinds of added tokens: control, user-defined (newlines, tabs, HTML), and spaces
EXTRA = ["<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<unused17>", "<start_of_image>", "[multimodal]",
         "\n\n\n", "\t\t", "</div>", "<h2>", "  ", " " * 40, "▁", ">▁</", "> </"]


@pytest.fixture(scope="module")
def gemma3(gemma3_gguf):
    return build(TokenizerSection(kind=TokenizerKind.gguf, path=str(gemma3_gguf)))


@pytest.fixture(scope="module")
def reference(gemma3_gguf):
    """transformers' tokenizer of the file: its GGUF conversion (what AutoTokenizer runs, without the model config)."""
    from transformers.integrations.gguf import (
        convert_gguf_tokenizer,
        get_gguf_tokenizer,
    )

    arch, tokenizer, _ = get_gguf_tokenizer(str(gemma3_gguf))
    return convert_gguf_tokenizer(arch, tokenizer)[0]


def hf_ids(reference, text: str, special: bool) -> list[int]:
    reference.encode_special_tokens = not special  # transformers' split_special_tokens
    try:
        return reference.encode(text, add_special_tokens=False).ids
    finally:
        reference.encode_special_tokens = False


def test_metadata(gemma3):
    assert (gemma3.vocab_size, gemma3.bos_id, gemma3.eos_ids, gemma3.add_bos) == (262144, 2, {1, 106}, True)
    assert (gemma3.bos_token, gemma3.eos_token, gemma3.chat_template) == ("<bos>", "<eos>", None)  # a base model
    assert gemma3.encode("Hello  world\n\nfoo\tbar <end_of_turn> <eos>", allow_special=True) == \
        [2, 9259, 138, 12392, 108, 26537, 255968, 2230, 236743, 106, 236743, 1]


@settings(max_examples=100, deadline=None)
@given(text=st.lists(st.one_of(texts(), st.sampled_from(EXTRA)), max_size=6).map("".join))
def test_ids_match_transformers(gemma3, reference, text):
    for special in (False, True):
        ids = gemma3.encode(text, bos=False, allow_special=special)
        assert ids == hf_ids(reference, text, special)
        assert gemma3.decode(ids) == reference.decode(ids, skip_special_tokens=True)


def test_english_and_code_match_transformers(gemma3, reference):
    corpus = english_corpus() + CODE
    for start in range(0, len(corpus), 997):
        text = corpus[start : start + 1500]
        assert gemma3.encode(text, bos=False) == hf_ids(reference, text, special=False)
