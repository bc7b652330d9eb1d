"""The gguf tokenizer against `tokenizers` built from the same vocabulary and merges.

GGUF files are written here from BPEs trained on the English corpus (which leaves most bytes
without a token), one per supported pre-tokenizer; the `real` tests read SmolLM2's. The reference
is a `tokenizers` BPE with the pre-tokenizer llama.cpp's `pre` name stands for, not transformers'
GGUF conversion (which drops SmolLM2's digit split).
"""
from __future__ import annotations

import json

import gguf
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Regex, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from transformers import AutoTokenizer
from transformers.integrations.gguf.gguf_tokenizer_mapping import (
    GGUF_PRE_TOKENIZER_SPLITS,
)

from runner.config.errors import ConfigError
from runner.config.schema import TokenizerKind, TokenizerSection
from runner.tokenizers import build
from runner.tokenizers.bpe import BYTE_CHARS
from runner.tokenizers.chat import render_chat
from tests.helpers.tokenizers import texts
from tests.tokenizers.conftest import (
    SPECIALS,
    bpe_reference,
    byte_level,
    digits_byte_level,
    train_byte_level,
    write_gguf,
)

CONTROL, NORMAL, USER_DEFINED = gguf.TokenType.CONTROL, gguf.TokenType.NORMAL, gguf.TokenType.USER_DEFINED

# llama.cpp's default pre-tokenizer, its four regexes as `tokenizers` Splits (llama.cpp keeps the
# text between matches, as Split(behavior="isolated") does).
LLAMA_CPP_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA_CPP_DEFAULT = pre_tokenizers.Sequence([
    *(pre_tokenizers.Split(Regex(r), behavior="isolated")
      for r in (r"[\p{P}\$\+<=>\^~\|]+", LLAMA_CPP_GPT2, r"\p{N}+", "[0-9][0-9][0-9]")),
    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
])


def hf_split(pre: str):
    """The pre-tokenizer transformers gives a GGUF whose tokenizer.ggml.pre is `pre` (Qwen's, GPT-4o's, Llama-3's)."""
    return lambda: pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(GGUF_PRE_TOKENIZER_SPLITS[pre]), "isolated"),
                                            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


REFERENCE_PRE = {"gpt-2": byte_level, "smollm": digits_byte_level, "default": lambda: LLAMA_CPP_DEFAULT,
                 **{pre: hf_split(pre) for pre in ("qwen2", "gpt-4o", "llama-bpe")}}

# Characters whose UTF-8 holds a byte SmolLM2 has no token for (0x04 ... and the lead bytes F1, F2).
SMOLLM2_MISSING = [0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, 0xC0, 0xC1, 0xF1, 0xF2, *range(0xF5, 0x100)]
UNCOVERED = ["\x04", "\x06", "\x13", "\x14", "\x16", "\x1d", "\U00040000", "\U0007ffff", "\U00080000", "\U000bffff"]


def prompts(specials=SPECIALS) -> st.SearchStrategy[str]:
    """texts() mixed with special-token texts and characters whose bytes SmolLM2 lacks."""
    return st.lists(st.one_of(texts(), st.sampled_from(specials), st.sampled_from(UNCOVERED)), max_size=5).map("".join)


def section(path, **kw) -> TokenizerSection:
    return TokenizerSection(kind=TokenizerKind.gguf, path=str(path), **kw)


def reference(tokens: list[str], merges: list[str], pre: str, specials: list[str] = ()) -> HFTokenizer:
    """`tokenizers` with the pre-tokenizer llama.cpp's `pre` name stands for."""
    return bpe_reference(tokens, merges, REFERENCE_PRE[pre](), specials)


@pytest.fixture(scope="session")
def trained():
    """(tokens, types, merges) of a byte-level BPE trained on English: SPECIALS are CONTROL tokens."""
    data = json.loads(train_byte_level(byte_level(), vocab_size=600, all_bytes=False).to_str())
    tokens = sorted(data["model"]["vocab"], key=data["model"]["vocab"].get)
    types = [CONTROL if t in SPECIALS else NORMAL for t in tokens]
    return tokens, types, [" ".join(m) for m in data["model"]["merges"]]


@pytest.fixture(scope="session")
def per_pre(trained, tmp_path_factory):
    """pre -> (ours, reference without specials, reference with them), on the trained vocabulary."""
    tokens, types, merges = trained
    out = {}
    for pre in REFERENCE_PRE:
        path = write_gguf(tmp_path_factory.mktemp("gguf") / f"{pre}.gguf", tokens, types, merges, pre=pre)
        out[pre] = (build(section(path)), reference(tokens, merges, pre), reference(tokens, merges, pre, SPECIALS))
    return out


@pytest.mark.parametrize("pre", list(REFERENCE_PRE))
@settings(max_examples=60, deadline=None)
@given(text=prompts())
def test_ids_match_tokenizers(per_pre, pre, text):
    ours, plain, with_specials = per_pre[pre]
    assert ours.encode(text, bos=False) == plain.encode(text).ids
    assert ours.encode(text, bos=False, allow_special=True) == with_specials.encode(text).ids


@settings(max_examples=60, deadline=None)
@given(text=prompts())
def test_bytes_without_a_token_are_dropped(per_pre, text):
    ours, plain, _ = per_pre["smollm"]
    vocab = plain.get_vocab()
    ids = ours.encode(text, bos=False)
    kept = bytes(b for b in text.encode("utf-8") if BYTE_CHARS[b] in vocab)
    assert b"".join(ours.token_bytes(i) for i in ids) == kept
    assert ours.decode(ids) == kept.decode("utf-8", errors="replace")


def test_special_token_text_is_plain_unless_allowed(per_pre):
    ours = per_pre["smollm"][0]
    ids = ours.encode("<|im_start|>user", bos=False)
    assert {0, 1, 2}.isdisjoint(ids) and ours.decode(ids) == "<|im_start|>user"
    special = ours.encode("<|im_start|>user<|im_end|>", bos=False, allow_special=True)
    assert special[0] == 1 and special[-1] == 2 and ours.decode(special) == "user"  # specials add no text


def test_neighbours_of_a_dropped_byte_merge(per_pre):
    # "\x01" has no token; "-\x01-" is one piece for the regex, so what is left of it is merged.
    ours, plain, _ = per_pre["smollm"]
    (dashes,) = ours.encode("--", bos=False)
    assert ours.encode("-\x01-", bos=False) == [dashes] == plain.encode("-\x01-").ids


def test_long_whitespace_runs_match(per_pre):
    # A run this long overflows tiktoken's regex; it is split by the `regex` module instead.
    ours, plain, _ = per_pre["smollm"]
    for text in (" " * 1_000_000 + "x", "a\n" + "\n" * 1_000_000, "1 " + "\t " * 300_000):
        assert ours.encode(text, bos=False) == plain.encode(text).ids


def test_metadata_sets_bos_eos_and_the_template(trained, tmp_path):
    tokens, types, merges = trained
    path = write_gguf(tmp_path / "m.gguf", tokens, types, merges, bos_token_id=1, eos_token_id=2, eot_token_id=0,
                      add_bos_token=True, chat_template="{{ bos_token }}{{ messages[0]['content'] }}")
    tok = build(section(path))
    assert (tok.vocab_size, tok.bos_id, tok.eos_ids) == (len(tokens), 1, frozenset({0, 2}))
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")  # eos_token: the eos, not eot
    assert tok.encode("hi") == [1, *tok.encode("hi", bos=False)]
    assert render_chat(tok, "hi") == "<|im_start|>hi"


def test_add_bos_token_false_or_absent_adds_no_bos(trained, tmp_path):
    tokens, types, merges = trained
    for name, extra in (("false", {"add_bos_token": False}), ("absent", {})):
        tok = build(section(write_gguf(tmp_path / f"{name}.gguf", tokens, types, merges, bos_token_id=1, **extra)))
        assert tok.bos_id == 1 and tok.encode("hi") == tok.encode("hi", bos=False)
        assert tok.chat_template is None


def test_bos_and_eos_overrides(trained, tmp_path):
    tokens, types, merges = trained
    path = write_gguf(tmp_path / "m.gguf", tokens, types, merges, bos_token_id=1, eos_token_id=2)
    tok = build(section(path, bos="<|endoftext|>", eos=" the"))
    (the,) = tok.encode(" the", bos=False)
    assert (tok.bos_id, tok.eos_ids) == (0, frozenset({the}))
    with pytest.raises(ConfigError) as e:
        build(section(path, bos="<s>", eos="</s>"), source="r.yaml")
    assert [(p.key, p.value) for p in e.value.problems] == [("tokenizer.bos", "<s>"), ("tokenizer.eos", "</s>")]


def test_user_defined_tokens_are_always_found_and_printed(trained, tmp_path):
    tokens, types, merges = trained
    types = [USER_DEFINED if t == "<|endoftext|>" else k for t, k in zip(tokens, types)]
    tok = build(section(write_gguf(tmp_path / "m.gguf", tokens, types, merges)))
    assert tok.encode("a<|endoftext|>", bos=False)[-1] == 0  # as llama.cpp does without parse_special
    assert tok.decode(tok.encode("a<|endoftext|>b", bos=False)) == "a<|endoftext|>b"
    assert 1 not in tok.encode("<|im_start|>", bos=False)  # a CONTROL token still needs allow_special


def test_missing_pre_is_llama_cpps_default(trained, tmp_path, per_pre):
    tokens, types, merges = trained
    tok = build(section(write_gguf(tmp_path / "m.gguf", tokens, types, merges, pre=None)))
    text = "Price: $1234567.89, (ok)!  \n\tdone"
    ids = tok.encode(text, bos=False)
    assert ids == per_pre["default"][0].encode(text, bos=False) != per_pre["gpt-2"][0].encode(text, bos=False)


@pytest.fixture(scope="module")
def qwen_and_phi4(trained, tmp_path_factory):
    """pre -> (ours, transformers' tokenizer from the same GGUF), for Qwen2/3's and Phi-4-mini's pre-tokenizers;
    <think> is user-defined, as in Qwen3's GGUF."""
    tokens, types, merges = trained
    tokens = [*tokens, "<think>"]
    types = [*types, USER_DEFINED]
    out = {}
    for pre in ("qwen2", "gpt-4o"):
        folder = tmp_path_factory.mktemp(pre)
        path = write_gguf(folder / "t.gguf", tokens, types, merges, pre=pre, bos_token_id=0, eos_token_id=2)
        out[pre] = (build(section(path)), AutoTokenizer.from_pretrained(str(folder), gguf_file="t.gguf"))
    return out


@pytest.mark.parametrize("pre", ["qwen2", "gpt-4o"])
@settings(max_examples=60, deadline=None)
@given(text=prompts([*SPECIALS, "<think>"]))
def test_qwen_and_phi4_match_transformers(qwen_and_phi4, pre, text):
    ours, reference = qwen_and_phi4[pre]
    assert ours.encode(text, bos=False, allow_special=True) == reference(text, add_special_tokens=False)["input_ids"]
    plain = reference(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert ours.encode(text, bos=False) == plain
    assert ours.eos_ids == {2}  # <|im_end|>, which is also Qwen's end of turn


def only_problem(path, source="r.yaml", **kw):
    with pytest.raises(ConfigError) as e:
        build(section(path, **kw), source=source)
    (p,) = e.value.problems
    return p


def test_unsupported_pre_model_and_keys(trained, tmp_path):
    tokens, types, merges = trained
    p = only_problem(write_gguf(tmp_path / "q.gguf", tokens, types, merges, pre="chatglm-bpe"))
    assert (p.source, p.key, p.value) == ("r.yaml", "tokenizer.path", str(tmp_path / "q.gguf"))
    assert "'chatglm-bpe'" in p.message and "supported: " in p.message
    assert all(name in p.message for name in ("smollm", "gpt-2", "qwen2", "gpt-4o", "llama-bpe"))
    p = only_problem(write_gguf(tmp_path / "l.gguf", tokens, types, merges, model="t5"))
    assert p.message.endswith("holds a 't5' vocabulary (tokenizer.ggml.model); supported: gpt2, llama")
    p = only_problem(write_gguf(tmp_path / "s.gguf", tokens, types, merges), pattern=r"\s+")
    assert p.key == "tokenizer.pattern"


def test_merges_must_fit_the_vocabulary(trained, tmp_path):
    tokens, types, merges = trained
    p = only_problem(write_gguf(tmp_path / "m.gguf", tokens, types, [*merges, "zz qq"]))
    assert "merge" in p.message and "'zz'" in p.message and "not in the vocabulary" in p.message


def test_path_none_is_a_config_error():
    with pytest.raises(ConfigError, match="tokenizer.path: is not set"):
        build(TokenizerSection(kind=TokenizerKind.gguf), source="r.yaml")


# --- SmolLM2-135M-Instruct ------------------------------------------------------------------

SMOLLM2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<file_sep>", "<jupyter_code>"]


@pytest.mark.real
def test_smollm2_metadata(smollm2):
    assert (smollm2.vocab_size, smollm2.bos_id, smollm2.eos_ids) == (49152, 1, frozenset({2}))
    assert (smollm2.bos_token, smollm2.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert smollm2.encode("Hello") == smollm2.encode("Hello", bos=False)  # add_bos_token is false
    assert smollm2.encode("Hello world! 123", bos=False) == [19556, 905, 17, 216, 33, 34, 35]  # digits alone


@pytest.mark.real
def test_smollm2_byte_coverage(smollm2_fields):
    """21 byte values have no token in SmolLM2: six control characters and lead bytes of U+40000..U+BFFFF."""
    vocab = set(smollm2_fields["tokens"])
    assert [b for b in range(256) if BYTE_CHARS[b] not in vocab] == SMOLLM2_MISSING


@pytest.mark.real
@settings(max_examples=200, deadline=None)
@given(text=prompts(SMOLLM2_SPECIALS))
def test_smollm2_ids_match_tokenizers(smollm2, smollm2_reference, text):
    plain, with_specials = smollm2_reference
    assert smollm2.encode(text, bos=False) == plain.encode(text).ids
    assert smollm2.encode(text, bos=False, allow_special=True) == with_specials.encode(text).ids


@pytest.mark.real
@settings(max_examples=100, deadline=None)
@given(text=texts())
def test_smollm2_round_trip(smollm2, text):
    ids = smollm2.encode(text, bos=False)
    kept = bytes(b for b in text.encode("utf-8") if b not in SMOLLM2_MISSING)
    assert b"".join(smollm2.token_bytes(i) for i in ids) == kept
    if kept == text.encode("utf-8"):
        assert smollm2.decode(ids) == text


@pytest.mark.real
def test_smollm2_merged_tokens_bpe_to_themselves(smollm2_fields, smollm2_reference):
    """What makes tiktoken's whole-piece lookup agree with merge-list BPE (see runner.tokenizers.bpe)."""
    vocab = {t: i for i, t in enumerate(smollm2_fields["tokens"])}
    model = smollm2_reference[0].model
    for merge in smollm2_fields["merges"]:
        token = merge.replace(" ", "")
        assert [t.id for t in model.tokenize(token)] == [vocab[token]], token


@pytest.mark.real
def test_smollm2_chat(smollm2):
    text = render_chat(smollm2, "What is 2+2?")
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    ids = smollm2.encode(text, bos=False, allow_special=True)
    assert ids.count(1) == 3 and ids.count(2) == 2  # <|im_start|>, <|im_end|>
    tail = smollm2.encode("assistant\n", bos=False)
    assert ids[0] == 1 and ids[-len(tail) - 1 :] == [1, *tail]
    assert 1 not in smollm2.encode(text, bos=False)  # without allow_special the template is plain text
