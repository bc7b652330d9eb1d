"""The tiktoken tokenizer on a real byte-level BPE rank file laid out like Llama-3's."""
from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tiktoken.load import load_tiktoken_bpe

from runner.config.errors import ConfigError
from runner.config.schema import TokenizerKind, TokenizerSection
from runner.tokenizers import build
from runner.tokenizers.tiktoken import LLAMA3_SPECIAL_TOKENS, _short_runs, read_ranks
from tests.helpers.tokenizers import texts, write_tiktoken_ranks
from tests.tokenizers.conftest import N_MERGES

BOS = 256 + N_MERGES  # the first special token follows the ranks
END_OF_TEXT, EOT = BOS + 1, BOS + 9


def section(path, **kw) -> TokenizerSection:
    return TokenizerSection(kind=TokenizerKind.tiktoken, path=str(path), **kw)


def test_llama3_special_tokens_are_metas():
    assert len(LLAMA3_SPECIAL_TOKENS) == len(set(LLAMA3_SPECIAL_TOKENS)) == 256
    assert LLAMA3_SPECIAL_TOKENS[:10] == (
        "<|begin_of_text|>", "<|end_of_text|>",
        "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
        "<|reserved_special_token_2|>", "<|reserved_special_token_3|>",
        "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>",
    )
    assert LLAMA3_SPECIAL_TOKENS[10] == "<|reserved_special_token_5|>"
    assert LLAMA3_SPECIAL_TOKENS[-1] == "<|reserved_special_token_250|>"


def test_ids_follow_llama3_layout(tt):
    assert tt.vocab_size == 256 + N_MERGES + 256
    assert tt.bos_id == BOS
    assert tt.eos_ids == frozenset({END_OF_TEXT, EOT})


@settings(max_examples=50, deadline=None)
@given(texts())
def test_round_trip(tt, text):
    ids = tt.encode(text, bos=False)
    assert tt.decode(ids) == text
    assert b"".join(tt.token_bytes(i) for i in ids) == text.encode("utf-8")
    assert all(i < BOS for i in ids)  # never a special token


def test_single_bytes_are_their_own_ids(tt):
    # Nothing in the English corpus merges control bytes or the euro sign's bytes.
    assert tt.encode("\x00\x01\x7f", bos=False) == [0, 1, 127]
    assert tt.encode("€", bos=False) == [0xE2, 0x82, 0xAC]
    assert [tt.token_bytes(i) for i in (0xE2, 0x82, 0xAC)] == [b"\xe2", b"\x82", b"\xac"]


def test_frequent_words_are_merged(tt):
    (the,) = tt.encode(" the", bos=False)
    assert 256 <= the < BOS
    assert tt.token_bytes(the) == b" the"


def test_bos_is_prepended_only_when_asked(tt):
    body = tt.encode("Hello, world", bos=False)
    assert tt.encode("Hello, world") == [BOS, *body]
    assert tt.encode("") == [BOS]
    assert tt.encode("", bos=False) == []


def test_special_token_text_is_plain_text(tt):
    text = "<|begin_of_text|>hi<|eot_id|><|end_of_text|>"
    ids = tt.encode(text, bos=False)
    assert all(i < BOS for i in ids)
    assert tt.decode(ids) == text


def test_special_tokens_add_no_text(tt):
    assert tt.token_bytes(BOS) == tt.token_bytes(EOT) == tt.token_bytes(tt.vocab_size - 1) == b""
    assert tt.decode([BOS, *tt.encode("hi", bos=False), EOT]) == "hi"


def test_long_whitespace_runs_round_trip(tt):
    # Longer than the 25k-char run Meta's reference (and we) cut at before the regex sees it.
    text = " " * 30_000 + "x" + "\n" * 30_000 + "y" * 30_000
    assert tt.decode(tt.encode(text, bos=False)) == text


def longest_run(text: str) -> int:
    """The most consecutive chars of one kind (whitespace or not) in `text`."""
    best, run = 0, 0
    for i, char in enumerate(text):
        run = run + 1 if i and char.isspace() == text[i - 1].isspace() else 1
        best = max(best, run)
    return best


@settings(max_examples=50, deadline=None)
@given(st.text(" a\n", max_size=60), st.integers(1, 5))
def test_short_runs_cut_only_long_runs(text, limit):
    pieces = list(_short_runs(text, limit))
    assert "".join(pieces) == text
    assert all(longest_run(piece) <= limit for piece in pieces)
    assert len(pieces) == 1 or all(pieces)
    for before, after in itertools.pairwise(pieces):  # each cut splits a run that was too long
        assert longest_run(before[-limit:] + after[0]) == limit + 1


def test_rank_file_is_tiktokens_format(ranks_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # "" turns tiktoken's file cache off
    ranks = read_ranks(str(ranks_path))
    assert ranks == load_tiktoken_bpe(str(ranks_path))
    assert len(ranks) == 256 + N_MERGES
    assert all(ranks[bytes([b])] == b for b in range(256))


def test_a_rewritten_file_is_read_again(tmp_path):
    # load_tiktoken_bpe would answer the first file's ranks from its cache the second time.
    path = tmp_path / "ranks.tiktoken"
    write_tiktoken_ranks(path, ["aaaa bbbb"], n_merges=1)
    assert build(section(path)).vocab_size == 257 + 256
    write_tiktoken_ranks(path, ["aaaa bbbb"], n_merges=3)
    assert build(section(path)).vocab_size == 259 + 256


def test_custom_special_tokens_and_pattern(ranks_path):
    tok = build(section(ranks_path, special_tokens=["<|endoftext|>", "<|fim|>"], pattern=r"\s+|\S+"))
    assert tok.vocab_size == 256 + N_MERGES + 2
    assert tok.bos_id is None and tok.eos_ids == frozenset()  # no Llama-3 names among them
    assert tok.encode("a b") == tok.encode("a b", bos=False)
    assert tok.token_bytes(256 + N_MERGES + 1) == b""
    text = "Hello,   world!\n\tdef f(): pass"
    assert tok.decode(tok.encode(text)) == text


def test_bos_and_eos_overrides_select_tokens_by_text(ranks_path, tt):
    tok = build(section(ranks_path, bos="<|start_header_id|>", eos="<|eot_id|>"))
    assert tok.bos_id == BOS + 6
    assert tok.eos_ids == frozenset({EOT})
    (the,) = tt.encode(" the", bos=False)
    assert build(section(ranks_path, eos=" the")).eos_ids == frozenset({the})  # an ordinary token works too


def test_unknown_bos_and_eos_are_both_reported(ranks_path):
    with pytest.raises(ConfigError) as e:
        build(section(ranks_path, bos="<s>", eos="<|im_end|>"), source="r.yaml")
    assert [(p.source, p.key, p.value) for p in e.value.problems] == [
        ("r.yaml", "tokenizer.bos", "<s>"), ("r.yaml", "tokenizer.eos", "<|im_end|>")]


def test_bad_pattern_and_repeated_special_tokens(ranks_path):
    with pytest.raises(ConfigError, match="tokenizer.pattern: is not a valid regex"):
        build(section(ranks_path, pattern="(unclosed"))
    with pytest.raises(ConfigError, match=r"tokenizer.special_tokens: lists a token twice \(got \['<a>'\]\)"):
        build(section(ranks_path, special_tokens=["<a>", "<b>", "<a>"]))


def test_allow_special_encodes_special_token_text_as_the_token(tt):
    text = "<|begin_of_text|>hi<|eot_id|>"
    assert tt.encode(text, bos=False, allow_special=True) == [BOS, *tt.encode("hi", bos=False), EOT]
    assert (tt.bos_token, tt.eos_token, tt.chat_template) == ("<|begin_of_text|>", "<|end_of_text|>", None)
