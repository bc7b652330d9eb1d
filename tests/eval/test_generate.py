"""generate_until through the recipe's decoder: it stops at the first stop string, which it never
returns, and decodes no further than the token that completed it."""
from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from runner.text import TextStream
from tests.eval.conftest import request

pytest.importorskip("lm_eval", reason="the eval extra (lm-eval) is part of the test extra")

PROMPT = "Once upon a time"


def streamed(lm, tokens: list[int]) -> str:
    """The text a stream has completed after `tokens` (a character still partial is held back)."""
    stream = TextStream(lm.runner_tokenizer, eos_ids=())
    return "".join(stream.push(t) for t in tokens)


def counting(lm):
    """Wrap the decoder's generate to count the tokens it hands to on_token."""
    decoder = lm.pipeline.decoder
    inner = type(decoder).generate
    seen = []

    def generate(prompt, max_new, eos=frozenset(), generator=None, on_token=None, **kw):
        def watch(token):
            seen.append(token)
            return on_token(token)
        return inner(decoder, prompt, max_new, eos, generator, watch, **kw)

    decoder.generate = generate
    return seen


@pytest.fixture(scope="module")
def free_text(tiny_lm):
    """The greedy continuation with no stop string, and its tokens."""
    seen = counting(tiny_lm)
    [text] = tiny_lm.generate_until([request("generate_until", PROMPT, {"until": [], "max_gen_toks": 30})])
    del tiny_lm.pipeline.decoder.generate
    assert len(seen) == 30 and len(text) > 20
    return text, list(seen)


@settings(max_examples=20, deadline=None)
@given(st.data())
def test_generation_stops_at_the_first_stop_string_and_never_returns_it(tiny_lm, free_text, data):
    text, tokens = free_text
    i = data.draw(st.integers(1, len(text) - 4))
    first = text[i:i + data.draw(st.integers(1, 3))]
    later = data.draw(st.sampled_from([text[-3:], text[i + 1:i + 4], "\u2603 never"]))
    # A U+FFFD stands for bytes that formed no character, whatever the tokens around them: not a stop string.
    assume("\ufffd" not in first + later)
    # Streaming stops at the stop string completed first (by the token that completes it; among
    # those one token completes, the earliest): a longer one starting earlier may never be waited for.
    lengths = [len(streamed(tiny_lm, tokens[:n])) for n in range(len(tokens) + 1)]
    hits = [(next(n for n, length in enumerate(lengths) if length >= j + len(s)), j)
            for s, j in ((s, text.find(s)) for s in (first, later)) if j >= 0]
    cut = min(hits)[1]
    seen = counting(tiny_lm)
    try:
        [got] = tiny_lm.generate_until([request("generate_until", PROMPT, {"until": [later, first], "max_gen_toks": 30})])
    finally:
        del tiny_lm.pipeline.decoder.generate
    assert got == text[:cut]
    # Decoding ended with the token that completed the stop string (in the streamed text).
    assert seen == tokens[:len(seen)]
    assert any(s in streamed(tiny_lm, seen) for s in (first, later))
    assert not any(s in streamed(tiny_lm, seen[:-1]) for s in (first, later))


def test_max_gen_toks_bounds_the_answer(tiny_lm, free_text):
    text, _ = free_text
    [got] = tiny_lm.generate_until([request("generate_until", PROMPT, {"until": ["\u2603"], "max_gen_toks": 5})])
    assert text.startswith(got) and 0 < len(got) < len(text)
