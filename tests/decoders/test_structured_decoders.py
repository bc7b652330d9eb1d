"""generate.json_schema through the CLI's decoders on tiny-random: plain (greedy and sampled),
speculative with n-gram drafts (the mask applies at each verified position) and a batch of rows
(each its own matcher): every sample is JSON its schema accepts. The verify-step mask is checked
position by position against a matcher walked through the drafts."""
from __future__ import annotations

import dataclasses
import json

import jsonschema
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from runner import pipeline, recipes
from runner.config.errors import ConfigError
from runner.decoders.grammar import Grammar, GrammarTokenizer
from runner.decoders.sampling import Sampling
from runner.decoders.speculative import masked
from runner.generate import generate, generate_batch
from tests.decoders.test_grammar import PERSON, schemas

RECIPE = "recipes/tiny-random.yaml"
BUDGET = 400  # new tokens; the drawn schemas bound every string, array and object


@pytest.fixture(scope="module")
def built():
    """{decoder kind: its pipeline}, built once with a placeholder schema (tests swap grammars)."""
    out = {}
    for name, overrides in (("plain", []), ("ngram", ["draft.kind=ngram", "draft.speculate_k=4"])):
        recipe = recipes.load(RECIPE, [f"generate.max_new_tokens={BUDGET}", "generate.cache_len=512",
                                       'generate.json_schema={"type": "object"}', *overrides])
        out[name] = pipeline.build(recipe, RECIPE)
    return out


def with_schema(built, schema, **generate):
    """The pipeline with `schema` compiled in place of its own and generate.* keys replaced."""
    grammar = Grammar.from_json_schema(schema, GrammarTokenizer(built.tokenizer, built.model.spec.vocab_size))
    built.decoder.grammar = grammar
    recipe = dataclasses.replace(built.recipe, generate=dataclasses.replace(built.recipe.generate, **generate))
    return dataclasses.replace(built, recipe=recipe, grammar=grammar)


def text_of(built, ids: list[int]) -> str:
    return built.tokenizer.decode([i for i in ids if i not in built.tokenizer.eos_ids])


def check(built, ids: list[int], schema) -> None:
    assert ids and ids[-1] in built.tokenizer.eos_ids, f"no end within {BUDGET} tokens: {text_of(built, ids)!r}"
    jsonschema.validate(json.loads(text_of(built, ids)), schema)


@settings(max_examples=12, deadline=None)
@given(schemas, st.sampled_from(["plain", "ngram"]), st.sampled_from([0.0, 1.0]), st.integers(0, 2**31))
def test_each_decoder_writes_json_its_schema_accepts(built, schema, kind, temperature, seed):
    pipe = with_schema(built[kind], schema, seed=seed)
    pipe.decoder.sampling = Sampling(temperature=temperature)
    ids, _ = generate(pipe, pipe.tokenizer.encode("Once upon a time", bos=True))
    check(pipe, ids, schema)


def test_rows_of_a_batch_each_match_their_own_schema_state(built):
    pipe = with_schema(built["plain"], PERSON, num_samples=3)
    prompts = [pipe.tokenizer.encode(text, bos=True) for text in ("Once upon a time", "The cat")]
    out, _ = generate_batch(pipe, prompts)
    assert len(out) == 6
    for ids in out:
        check(pipe, ids, PERSON)


def test_the_verify_mask_walks_the_drafts_and_stops_at_a_forbidden_one(built):
    pipe = with_schema(built["plain"], PERSON)
    vocab = pipe.model.spec.vocab_size
    generator = torch.Generator().manual_seed(0)
    walker, path = pipe.grammar.matcher(), []  # 8 tokens the grammar allows one after another
    for _ in range(8):
        path.append(int(walker.mask(torch.randn(vocab, generator=generator)).argmax()))
        walker.accept(path[-1])
    reference = pipe.grammar.matcher()
    logits = torch.randn(len(path) + 1, vocab, generator=generator)
    rows, walked = masked(logits, path, constraint := pipe.grammar.matcher())
    assert walked == len(path)
    for i in range(len(path) + 1):
        assert torch.equal(rows[i], reference.mask(logits[i]))
        if i < len(path):
            reference.accept(path[i])
    constraint.rollback(walked)  # back at the start: the first mask again
    assert torch.equal(constraint.mask(logits[0]), pipe.grammar.matcher().mask(logits[0]))

    after = pipe.grammar.matcher()
    for token in path[:2]:
        after.accept(token)
    forbidden = int(torch.isinf(after.mask(torch.zeros(vocab))).nonzero()[0])
    drafts = path[:2] + [forbidden] + path[3:5]
    logits = torch.randn(len(drafts) + 1, vocab, generator=generator)
    rows, walked = masked(logits, drafts, pipe.grammar.matcher())
    assert walked == 2
    assert torch.isinf(rows[2][forbidden])  # p(draft) = 0 where it is forbidden: verification rejects it
    assert torch.equal(rows[3:], logits[3:])  # past it: never used, left as they are


def test_a_bad_json_schema_names_the_recipe_key():
    recipe = recipes.load(RECIPE, ['generate.json_schema={"type": "nonsense"}'])
    with pytest.raises(ConfigError, match="generate.json_schema"):
        pipeline.build(recipe, RECIPE)
