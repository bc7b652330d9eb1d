"""The SentencePiece tokenizer on real BPE models with byte fallback, set up like LLaMA-2's."""
from __future__ import annotations

import pytest
import sentencepiece as spm
from hypothesis import given, settings

from runner.config.errors import ConfigError
from runner.config.schema import TokenizerKind, TokenizerSection
from runner.tokenizers import build
from tests.helpers.tokenizers import TINY_SP_MODEL, texts, train_sentencepiece

UNK, BOS, EOS = 0, 1, 2
BYTE0 = 3  # byte-fallback pieces <0x00>..<0xFF> come right after the three control pieces
META_SPACE = "\u2581"


def section(path, **kw) -> TokenizerSection:
    return TokenizerSection(kind=TokenizerKind.sentencepiece, path=str(path), **kw)


def test_ids(sp):
    assert (sp.vocab_size, sp.bos_id, sp.eos_ids) == (512, BOS, frozenset({EOS}))


# With identity normalisation and extra whitespace kept, the model changes text in exactly one
# way: it reads U+2581 ("▁") as its own word separator, a space (test_meta_space_becomes_a_space).
@settings(max_examples=50, deadline=None)
@given(texts(exclude=META_SPACE))
def test_round_trip(sp, text):
    ids = sp.encode(text, bos=False)
    assert sp.decode(ids) == text
    assert {UNK, BOS, EOS}.isdisjoint(ids)  # byte fallback: nothing is unknown


@settings(max_examples=50, deadline=None)
@given(texts(exclude=META_SPACE))
def test_token_bytes_are_the_text_behind_the_dummy_prefix(sp, text):
    # The model prefixes a space ("dummy prefix") that decode drops but the tokens carry.
    ids = sp.encode(text, bos=False)
    assert b"".join(sp.token_bytes(i) for i in ids) == (b" " + text.encode("utf-8") if text else b"")


def test_meta_space_becomes_a_space(sp):
    assert sp.decode(sp.encode(f"a{META_SPACE}b")) == "a b"


def test_bytes_outside_the_vocab_fall_back_to_byte_pieces(sp):
    *_, e2, x82, xac = sp.encode("€", bos=False)
    assert [e2, x82, xac] == [BYTE0 + 0xE2, BYTE0 + 0x82, BYTE0 + 0xAC]
    assert [sp.token_bytes(i) for i in (e2, x82, xac)] == [b"\xe2", b"\x82", b"\xac"]
    assert sp.token_bytes(BYTE0 + ord("\n")) == b"\n"


def test_token_bytes_of_control_and_word_pieces(sp):
    assert sp.token_bytes(UNK) == sp.token_bytes(BOS) == sp.token_bytes(EOS) == b""
    two_spaces = sp.processor.piece_to_id(META_SPACE * 2)  # whitespace-only pieces are allowed
    assert sp.processor.id_to_piece(two_spaces) == META_SPACE * 2
    assert sp.token_bytes(two_spaces) == b"  "
    (the,) = sp.encode("the", bos=False)  # a frequent word is one piece, "▁the"
    assert sp.token_bytes(the) == b" the"


def test_bos_is_prepended_only_when_asked(sp):
    body = sp.encode("Hello, world", bos=False)
    assert sp.encode("Hello, world") == [BOS, *body]
    assert sp.encode("") == [BOS]
    assert sp.encode("", bos=False) == []
    assert sp.decode([BOS, *body, EOS]) == "Hello, world"


def test_control_piece_text_is_plain_text(sp):
    text = "<s>hi</s><unk>"
    ids = sp.encode(text, bos=False)
    assert {UNK, BOS, EOS}.isdisjoint(ids)
    assert sp.decode(ids) == text


def test_bos_and_eos_overrides_select_pieces_by_text(sp_path):
    tok = build(section(sp_path, bos="</s>", eos="<0x0A>"))
    assert tok.bos_id == EOS
    assert tok.eos_ids == frozenset({BYTE0 + ord("\n")})


def test_unknown_bos_and_eos_are_both_reported(sp_path):
    with pytest.raises(ConfigError) as e:
        build(section(sp_path, bos="<|begin_of_text|>", eos="<|eot_id|>"), source="r.yaml")
    assert [(p.source, p.key, p.value) for p in e.value.problems] == [
        ("r.yaml", "tokenizer.bos", "<|begin_of_text|>"), ("r.yaml", "tokenizer.eos", "<|eot_id|>")]


def test_train_sentencepiece_honours_the_vocab_size(tmp_path):
    path = train_sentencepiece("the quick brown fox jumps over the lazy dog\n" * 20, tmp_path / "m", vocab_size=300)
    processor = spm.SentencePieceProcessor(model_file=str(path))
    assert processor.vocab_size() == 300
    assert [processor.id_to_piece(i) for i in (UNK, BOS, EOS, BYTE0, BYTE0 + 255)] == [
        "<unk>", "<s>", "</s>", "<0x00>", "<0xFF>"]


def test_the_shipped_tiny_model():
    """recipes/assets/tiny-sp.model, which the tiny random recipe uses."""
    assert TINY_SP_MODEL.stat().st_size < 100_000
    tok = build(section(TINY_SP_MODEL))
    assert (tok.vocab_size, tok.bos_id, tok.eos_ids) == (512, BOS, frozenset({EOS}))
    text = "Hello, my name is 🤖 and I write\tcode:  x = f(42)\n"
    assert tok.decode(tok.encode(text)) == text


def test_allow_special_encodes_control_piece_text_as_the_piece(sp):
    # Each stretch between control pieces is encoded alone, with its own dummy-prefix space.
    assert sp.encode("<s>hi</s>", bos=False, allow_special=True) == [BOS, *sp.encode("hi", bos=False), EOS]
    assert (sp.bos_token, sp.eos_token, sp.chat_template) == ("<s>", "</s>", None)
