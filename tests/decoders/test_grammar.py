"""Structured output (runner.decoders.grammar): text sampled from random logits under a grammar is
JSON that its schema accepts; the mask is exact (checked id by id against accept), ends are
allowed exactly when the text is a whole document, rollback restores the state, and bad
response formats name the field at fault.

Three tokenizers: the tiny SentencePiece asset, a small trained tiktoken vocabulary (Llama-3's
layout: two eos ids), and the real SmolLM2 (`real`). The model's vocabulary is padded past each
tokenizer's, as real embeddings are.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import jsonschema
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from runner.config.schema import TokenizerKind, TokenizerSection
from runner.decoders.grammar import Grammar, GrammarTokenizer, Matcher, mask_rows
from runner.tokenizers import build
from runner.tokenizers.base import Tokenizer
from tests.helpers.tokenizers import TINY_SP_MODEL, english_corpus, write_tiktoken_ranks

PAD = 37  # ids past the tokenizer's, as a model's padded embedding has (not a multiple of 32)
BUDGET = 3000  # tokens; the drawn schemas bound every string, array and object, so far fewer are needed

UNSATISFIABLE = {"type": "object", "required": ["a"],
                 "properties": {"a": {"type": "integer", "minimum": 5, "maximum": 1}}}
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 6}, "age": {"type": "integer", "minimum": 0},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}}}


@dataclass(frozen=True)
class Case:
    tokenizer: Tokenizer
    tokens: GrammarTokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokens.vocab_size

    def text(self, ids: list[int]) -> bytes:
        return b"".join(self.tokenizer.token_bytes(i) for i in ids if i < self.tokenizer.vocab_size)


@pytest.fixture(scope="module", params=["sentencepiece", "tiktoken", pytest.param("smollm2", marks=pytest.mark.real)])
def case(request, tmp_path_factory) -> Case:
    if request.param == "sentencepiece":
        section = TokenizerSection(kind=TokenizerKind.sentencepiece, path=str(TINY_SP_MODEL))
    elif request.param == "tiktoken":
        ranks = write_tiktoken_ranks(tmp_path_factory.mktemp("grammar") / "english.tiktoken", [english_corpus()], 200)
        section = TokenizerSection(kind=TokenizerKind.tiktoken, path=str(ranks))
    else:
        section = TokenizerSection(kind=TokenizerKind.gguf, path=str(request.getfixturevalue("smollm2_gguf")))
    tokenizer = build(section)
    return Case(tokenizer, GrammarTokenizer(tokenizer, tokenizer.vocab_size + PAD))


def allowed(matcher: Matcher, vocab_size: int) -> torch.Tensor:
    """bool [V]: the ids the mask leaves finite."""
    return torch.isfinite(matcher.mask(torch.zeros(vocab_size)))


def sample(case: Case, matcher: Matcher, seed: int, closers: float = 0.0, check=None) -> tuple[list[int], bool]:
    """Ids drawn from softmax(masked random logits) until an end or BUDGET; returns (ids before the
    end, whether an end came). `closers` is added to the logits of tokens holding '"', '}' or ']',
    so that free-form JSON closes; check(ids, mask) runs before each draw."""
    generator = torch.Generator().manual_seed(seed)
    bias = torch.zeros(case.vocab_size)
    if closers:
        tokens = range(case.tokenizer.vocab_size)
        bias[[i for i in tokens if any(c in case.tokenizer.token_bytes(i) for c in b'"}]')]] = closers
    ids = []
    for _ in range(BUDGET):
        logits = torch.randn(case.vocab_size, generator=generator) * 2 + bias
        masked = matcher.mask(logits)
        if check is not None:
            check(ids, masked)
        gumbel = -torch.log(-torch.log(torch.rand(case.vocab_size, generator=generator)))
        token = int(torch.argmax(masked + gumbel))  # a draw from softmax(masked)
        assert token < case.tokenizer.vocab_size, f"id {token} is past the tokenizer's"
        matcher.accept(token)
        if token in case.tokens.eos_ids:
            return ids, True
        ids.append(token)
    return ids, False


# --- schemas ------------------------------------------------------------------------------------

# Characters up to U+FFFF: SmolLM2 has no token for the lead byte of U+40000..U+7FFFF.
chars = st.characters(codec="utf-8", max_codepoint=0xFFFF)
names = st.text(chars, min_size=1, max_size=6)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-1000, 1000), st.text(chars, max_size=5))


@st.composite
def strings(draw):
    high = draw(st.integers(0, 8))
    return {"type": "string", "minLength": draw(st.integers(0, min(high, 3))), "maxLength": high}


@st.composite
def numbers(draw):
    schema = {"type": draw(st.sampled_from(["integer", "number"]))}
    if draw(st.booleans()):
        schema["minimum"] = low = draw(st.integers(-500, 500))
        schema["maximum"] = low + draw(st.integers(0, 1000))
    return schema


leaves = st.one_of(strings(), numbers(), st.just({"type": "boolean"}), st.just({"type": "null"}),
                   st.lists(scalars, min_size=1, max_size=4, unique_by=json.dumps).map(lambda values: {"enum": values}))


@st.composite
def arrays(draw, items):
    high = draw(st.integers(0, 3))
    return {"type": "array", "items": draw(items), "minItems": draw(st.integers(0, high)), "maxItems": high}


@st.composite
def objects(draw, values):
    properties = draw(st.dictionaries(names, values, max_size=4))
    required = [name for name in properties if draw(st.booleans())]
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


schemas = st.recursive(leaves, lambda children: arrays(children) | objects(children), max_leaves=8)


# --- generation ---------------------------------------------------------------------------------


@given(schema=schemas, seed=st.integers(0, 2**32 - 1))
def test_sampled_text_is_json_its_schema_accepts(case, schema, seed):
    validator = jsonschema.Draft202012Validator(schema)
    grammar = Grammar.from_response_format({"type": "json_schema", "json_schema": {"name": "t", "schema": schema}},
                                           case.tokens)
    ends = sorted(case.tokens.eos_ids)

    def ends_iff_whole(ids, masked):
        try:
            whole = validator.is_valid(json.loads(case.text(ids).decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError):
            whole = False
        finite = torch.isfinite(masked[ends]).tolist()
        assert finite == [whole] * len(ends), (case.text(ids), finite)

    ids, ended = sample(case, grammar.matcher(), seed, check=ends_iff_whole)
    assert ended, f"no end within {BUDGET} tokens: {case.text(ids)[:300]!r}"
    validator.validate(json.loads(case.text(ids).decode("utf-8")))


@given(seed=st.integers(0, 2**32 - 1))
def test_json_object_gives_an_object(case, seed):
    grammar = Grammar.from_response_format({"type": "json_object"}, case.tokens)
    ids, ended = sample(case, grammar.matcher(), seed, closers=5.0)
    assert ended, f"no end within {BUDGET} tokens: {case.text(ids)[:300]!r}"
    assert isinstance(json.loads(case.text(ids).decode("utf-8")), dict)


def test_whitespace_is_bounded(case):
    # One space, or a line break and up to 16 spaces, between two JSON tokens; then no more, so a
    # row cannot draw whitespace forever.
    ids = {case.tokenizer.token_bytes(i): i for i in reversed(range(case.tokenizer.vocab_size))}
    space, newline = ids[b" "], ids[b"\n"]
    grammar = Grammar.from_response_format({"type": "json_object"}, case.tokens)
    for run in ([space], [newline] + [space] * 16):
        matcher = grammar.matcher()
        matcher.accept(ids[b"{"])
        for id in run:
            matcher.accept(id)
        assert not allowed(matcher, case.vocab_size)[[space, newline]].any()
        matcher.accept(ids[b"}"])
        assert matcher.done


# --- the mask -----------------------------------------------------------------------------------


def test_mask_is_exact_id_by_id(case):
    """Along a sampled path: an id keeps its logit iff accept takes it, else it is -inf; ids past the
    tokenizer's are never allowed; ends only once the document is whole, and after an end only ends."""
    grammar = Grammar.from_json_schema(PERSON, case.tokens)
    path, ended = sample(case, grammar.matcher(), seed=3)
    assert ended
    matcher = grammar.matcher()
    checked = {round(k * len(path) / 5) for k in range(6)}  # from the start to the whole document
    generator = torch.Generator().manual_seed(0)
    for step in range(len(path) + 1):
        if step in checked:
            logits = torch.randn(case.vocab_size, generator=generator)
            masked = matcher.mask(logits)
            takes = torch.zeros(case.vocab_size, dtype=torch.bool)
            for id in range(case.vocab_size):
                try:
                    matcher.accept(id)
                except ValueError:
                    continue
                takes[id] = True
                matcher.rollback(1)
            assert torch.equal(masked[takes], logits[takes])
            assert bool((masked[~takes] == float("-inf")).all())
            assert not takes[case.tokenizer.vocab_size:].any()
            whole = step == len(path)
            assert takes[sorted(case.tokens.eos_ids)].tolist() == [whole] * len(case.tokens.eos_ids)
            if whole:  # an object: nothing may follow its closing brace
                assert int(takes.sum()) == len(case.tokens.eos_ids)
        if step < len(path):
            assert not matcher.done
            matcher.accept(path[step])
    assert matcher.done
    end = min(case.tokens.eos_ids)
    matcher.accept(end)
    assert matcher.done
    after = allowed(matcher, case.vocab_size)
    assert after.nonzero().flatten().tolist() == sorted(case.tokens.eos_ids)
    with pytest.raises(ValueError, match="not allowed"):
        matcher.accept(path[0])


def test_ids_past_the_tokenizer_are_never_allowed(case):
    # Inside a string of any length, where nearly every token is allowed.
    matcher = Grammar.from_json_schema({"type": "string"}, case.tokens).matcher()
    quote = [i for i in allowed(matcher, case.vocab_size).nonzero().flatten().tolist()
             if case.tokenizer.token_bytes(i) == b'"']
    matcher.accept(quote[0])
    inside = allowed(matcher, case.vocab_size)
    assert int(inside.sum()) > sum(1 for i in range(case.tokenizer.vocab_size) if case.tokenizer.token_bytes(i)) // 2
    assert not inside[case.tokenizer.vocab_size :].any()


def test_mask_keeps_dtype_and_rows_mask_alike(case):
    grammar = Grammar.from_json_schema(PERSON, case.tokens)
    path, _ = sample(case, grammar.matcher(), seed=4)
    a, b = grammar.matcher(), grammar.matcher()
    for id in path[: len(path) // 2]:
        b.accept(id)
    logits = torch.randn(3, case.vocab_size, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    rows = mask_rows([a, None, b], logits)
    assert rows.dtype == torch.bfloat16
    assert torch.equal(rows[0], a.mask(logits[0]))
    assert torch.equal(rows[1], logits[1])
    assert torch.equal(rows[2], b.mask(logits[2]))
    assert not torch.equal(rows[0].isfinite(), rows[2].isfinite())


@pytest.mark.cuda
def test_mask_on_cuda_equals_cpu(case):
    matcher = Grammar.from_json_schema(PERSON, case.tokens).matcher()
    logits = torch.randn(case.vocab_size, generator=torch.Generator().manual_seed(2))
    assert torch.equal(matcher.mask(logits.cuda()).cpu(), matcher.mask(logits))
    assert torch.equal(mask_rows([matcher], logits[None].cuda()).cpu(), mask_rows([matcher], logits[None]))


# --- accept and rollback ------------------------------------------------------------------------


def test_forbidden_token_raises_and_changes_nothing(case):
    matcher = Grammar.from_json_schema(PERSON, case.tokens).matcher()
    before = allowed(matcher, case.vocab_size)
    close = case.tokenizer.encode("}", bos=False)[-1]
    forbidden = [close, min(case.tokens.eos_ids), case.tokenizer.vocab_size, case.vocab_size, -1]
    for id in forbidden:
        with pytest.raises(ValueError):
            matcher.accept(id)
        assert torch.equal(allowed(matcher, case.vocab_size), before)
    with pytest.raises(ValueError, match="cannot roll back 1"):
        matcher.rollback(1)
    assert torch.equal(allowed(matcher, case.vocab_size), before)


def test_rollback_restores_each_earlier_mask(case):
    """A whole document and its end, undone one token and several at a time, as speculative
    verification undoes rejected drafts."""
    grammar = Grammar.from_json_schema(PERSON, case.tokens)
    path, ended = sample(case, grammar.matcher(), seed=5)
    assert ended
    path.append(min(case.tokens.eos_ids))
    matcher = grammar.matcher()
    masks = [allowed(matcher, case.vocab_size)]
    for id in path:
        matcher.accept(id)
        masks.append(allowed(matcher, case.vocab_size))
    matcher.accept(max(case.tokens.eos_ids))  # a second end changes nothing
    matcher.rollback(1)
    for n in range(len(path), 0, -1):
        if n % 3 == 0 and n >= 3:
            matcher.rollback(3)
            assert torch.equal(allowed(matcher, case.vocab_size), masks[n - 3])
            for id in path[n - 3 : n]:
                matcher.accept(id)
        matcher.rollback(1)
        assert torch.equal(allowed(matcher, case.vocab_size), masks[n - 1])
        assert matcher.done == (n - 1 == len(path) - 1)
    with pytest.raises(ValueError, match="cannot roll back"):
        matcher.rollback(1)


# --- response formats ---------------------------------------------------------------------------


def test_text_needs_no_grammar_and_a_schema_may_be_json_text(case):
    assert Grammar.from_response_format({"type": "text"}, case.tokens) is None
    grammar = Grammar.from_json_schema(json.dumps({"enum": ["yes"]}), case.tokens)
    ids, ended = sample(case, grammar.matcher(), seed=0)
    assert ended and case.text(ids) == b'"yes"'


@pytest.mark.parametrize("response_format, message", [
    ([], r"^response_format: must be an object"),
    ({}, r"^response_format\.type: must be one of 'text', 'json_object', 'json_schema', not None"),
    ({"type": "xml"}, r"^response_format\.type: .* not 'xml'"),
    ({"type": "json_schema"}, r"^response_format\.json_schema: must be an object holding a \"schema\", not null"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, r"^response_format\.json_schema\.schema: is required"),
    ({"type": "json_schema", "json_schema": {"schema": [1]}},
     r"^response_format\.json_schema\.schema: must be a JSON object \(a JSON schema\), not an array"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}},
     r"^response_format\.json_schema\.schema: is not a JSON schema runner supports: .*nonsense"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "string", "format": "bogus"}}},
     r"^response_format\.json_schema\.schema: .*bogus"),
    ({"type": "json_schema", "json_schema": {"schema": UNSATISFIABLE}},
     r"^response_format\.json_schema\.schema: .*unsatisfiable"),
])
def test_bad_response_formats_name_the_field(case, response_format, message):
    with pytest.raises(ValueError, match=message):
        Grammar.from_response_format(response_format, case.tokens)


def test_bad_json_schema_text_says_why(case):
    with pytest.raises(ValueError, match=r"^is not valid JSON: "):
        Grammar.from_json_schema('{"type": ', case.tokens)


def test_grammar_tokenizer_needs_room_and_an_end(case):
    with pytest.raises(ValueError, match="below the tokenizer's"):
        GrammarTokenizer(case.tokenizer, case.tokenizer.vocab_size - 1)

    class Endless:
        def __getattr__(self, name):
            return frozenset() if name == "eos_ids" else getattr(case.tokenizer, name)

    with pytest.raises(ValueError, match="no eos id"):
        GrammarTokenizer(Endless(), case.vocab_size)
