"""The gguf tokenizer on SentencePiece ("llama") vocabularies against transformers' own GGUF conversion.

transformers builds a different tokenizer per general.architecture (Gemma: merges in the file's
token order, no prefix space, tokens of spaces looked up as ▁▁; Phi-3: a ▁ before each stretch of
text; any other: Llama's Metaspace), so each is checked on a file written with that architecture.
The vocabulary's pieces are shuffled (see conftest.spm_vocabulary): file order and scores disagree.
"""
from __future__ import annotations

import pytest
from gguf import TokenType
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from runner.config.errors import ConfigError
from runner.config.schema import TokenizerKind, TokenizerSection
from runner.tokenizers import build
from runner.tokenizers.chat import render_chat
from runner.tokenizers.metaspace import MetaspaceBPE
from tests.helpers.tokenizers import texts
from tests.tokenizers.conftest import (
    SPM_ARCHS,
    SPM_CONTROL,
    SPM_USER_DEFINED,
    Quiet,
    write_spm_gguf,
)


def section(path, **kw) -> TokenizerSection:
    return TokenizerSection(kind=TokenizerKind.gguf, path=str(path), **kw)


def prompts() -> st.SearchStrategy[str]:
    """texts() mixed with the vocabulary's added tokens and runs of spaces and newlines."""
    extra = st.sampled_from([*SPM_CONTROL, *SPM_USER_DEFINED, "<s>", "</s>", "<unk>", " " * 5, "\n" * 3, "▁", " ▁ "])
    return st.lists(st.one_of(texts(), extra), max_size=6).map("".join)


@pytest.fixture(scope="module")
def per_arch(spm_ggufs):
    """arch -> ours and transformers' tokenizer from the same file."""
    return Quiet({arch: (build(section(path)), reference) for arch, (path, reference) in spm_ggufs.items()})


@pytest.mark.parametrize("arch", list(SPM_ARCHS))
@settings(max_examples=60, deadline=None)
@given(text=prompts())
def test_ids_match_transformers(per_arch, arch, text):
    ours, reference = per_arch[arch]
    ids = ours.encode(text, bos=False, allow_special=True)
    assert ids == reference(text, add_special_tokens=False)["input_ids"]
    assert ours.encode(text, allow_special=True) == reference(text)["input_ids"]  # BOS first
    # Special-token text as plain text: transformers' split_special_tokens.
    plain = reference(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert ours.encode(text, bos=False) == plain
    assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True)


@settings(max_examples=60, deadline=None)
@given(text=prompts())
def test_gemma_round_trip(per_arch, text):
    """Without a prefix space, every character encodes (byte fallback) and decodes back, but "▁"."""
    assume("▁" not in text)
    ours = per_arch["gemma3"][0]
    ids = ours.encode(text, bos=False)
    assert ours.decode(ids) == text
    assert b"".join(map(ours.token_bytes, ids)) == text.encode("utf-8")  # what a TextStream prints


def test_a_lone_surrogate_is_the_replacement_character(per_arch):
    ours = per_arch["gemma3"][0]
    assert ours.encode("a\ud800b", bos=False) == ours.encode("a\ufffdb", bos=False)


def test_a_broken_character_decodes_as_transformers_does(per_arch):
    ours, reference = per_arch["gemma3"]
    (head, *_) = ours.encode("€", bos=False)  # no piece: three byte tokens
    ids = [head, *ours.encode("ab", bos=False), head, head]
    assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True) == "\ufffdab\ufffd\ufffd"


@pytest.mark.parametrize("arch", list(SPM_ARCHS))
def test_end_of_turn_tokens_end_generation(per_arch, spm_vocabulary, arch):
    """Gemma's <end_of_turn> and Phi-3's <|end|>, found by their text as llama.cpp finds them."""
    ours, tokens = per_arch[arch][0], spm_vocabulary[0]
    assert ours.eos_ids == {2, tokens.index("<end_of_turn>"), tokens.index("<|end|>")}
    assert (ours.bos_token, ours.eos_token) == ("<s>", "</s>")  # eos_token: the eos, not an end of turn


def test_metadata_and_the_chat_template(per_arch, spm_vocabulary):
    ours = per_arch["gemma3"][0]
    assert isinstance(ours, MetaspaceBPE)
    assert (ours.vocab_size, ours.bos_id, ours.add_bos) == (len(spm_vocabulary[0]), 1, True)
    text = render_chat(ours, "Hi  there")
    assert text == "<s><start_of_turn>user\nHi  there<end_of_turn>\n<start_of_turn>model\n"
    ids = ours.encode(text, bos=False, allow_special=True)
    tokens = spm_vocabulary[0]
    assert ids[:2] == [1, tokens.index("<start_of_turn>")]
    assert ids.count(tokens.index("<start_of_turn>")) == 2 and ids.count(tokens.index("<end_of_turn>")) == 1


def test_add_bos_token_defaults_to_true(spm_vocabulary, tmp_path):
    """llama.cpp and transformers add BOS to a SentencePiece vocabulary that does not say otherwise."""
    ours = build(section(write_spm_gguf(tmp_path / "a.gguf", "llama", spm_vocabulary, bos_token_id=1)))
    assert ours.encode("hi")[0] == 1
    ours = build(section(write_spm_gguf(tmp_path / "b.gguf", "llama", spm_vocabulary, bos_token_id=1,
                                        add_bos_token=False)))
    assert ours.encode("hi") == ours.encode("hi", bos=False)


def test_eot_metadata_and_overrides(spm_vocabulary, tmp_path):
    tokens = spm_vocabulary[0]
    path = write_spm_gguf(tmp_path / "a.gguf", "llama", spm_vocabulary, bos_token_id=1, eos_token_id=2,
                          eot_token_id=tokens.index("<|user|>"))
    ours = build(section(path))
    assert ours.eos_ids == {2, tokens.index("<|user|>"), tokens.index("<|end|>"), tokens.index("<end_of_turn>")}
    ours = build(section(path, bos="<start_of_turn>", eos="<end_of_turn>"))
    assert (ours.bos_id, ours.eos_ids) == (tokens.index("<start_of_turn>"), {tokens.index("<end_of_turn>")})


def test_unknown_type_tokens_print_nothing(per_arch, spm_vocabulary):
    ours = per_arch["llama"][0]
    unk = spm_vocabulary[2].index(TokenType.UNKNOWN)
    assert ours.token_bytes(unk) == b"" and ours.decode([unk, *ours.encode("a", bos=False)]) == "a"


def test_a_vocabulary_without_scores_or_merges(spm_vocabulary, tmp_path):
    tokens, _, types = spm_vocabulary
    path = write_spm_gguf(tmp_path / "a.gguf", "llama", (tokens, [0.0] * 3, types))
    with pytest.raises(ConfigError) as e:
        build(section(path), source="r.yaml")
    (p,) = e.value.problems
    assert (p.key, p.value) == ("tokenizer.path", path)
    assert p.message == (f"has a SentencePiece vocabulary that cannot be used: it has 3 scores for {len(tokens)} "
                         "tokens, and no merges")
