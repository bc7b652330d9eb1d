"""Request bodies drawn by hypothesis, valid and not, against a running server: every answer is a
200 or an OpenAI-shaped 4xx naming what was wrong, never a 5xx or a dropped connection, and the
server still answers a plain request after them all."""
from __future__ import annotations

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

RECIPE = "recipes/tiny-random.yaml"
VOCAB = 512  # tiny-random's sentencepiece vocabulary

# Every JSON shape a field might be sent as: what it should be, and what it should not.
JSON = st.recursive(st.none() | st.booleans() | st.integers(-(2**80), 2**80) | st.floats(allow_nan=False, allow_infinity=False)
                    | st.text(max_size=8), lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
EDGES = st.sampled_from([0, -1, 2**31, 2**63 - 1, 2**63, 2**64, 2**80, -(2**63), -(2**63) - 1, 10**30])
IDS = st.lists(st.integers(-2, VOCAB + 2) | EDGES, min_size=1, max_size=6)
PROMPTS = st.text(max_size=20) | st.lists(st.text(max_size=8), max_size=3) | IDS | st.lists(IDS, max_size=2)
FIELDS = {
    "max_tokens": st.integers(-2, 4) | EDGES | JSON,
    "temperature": st.floats(-1, 3) | EDGES | JSON,
    "top_p": st.floats(-0.5, 1.5) | EDGES | JSON,
    "top_k": st.integers(-2, 600) | EDGES | JSON,
    "seed": st.integers(-(2**70), 2**70) | EDGES | JSON,
    "stop": st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=6) | JSON,
    "n": st.integers(-1, 6) | EDGES | JSON,
    "stream": st.booleans() | JSON,
    "logprobs": st.integers(-1, 30) | EDGES | JSON,
    "model": st.just("tiny-random") | JSON,
    "min_p": st.floats(-0.5, 1.5) | EDGES | JSON,
    "repetition_penalty": st.floats(-1, 200) | EDGES | JSON,
    "presence_penalty": st.floats(-3, 3) | EDGES | JSON,
    "frequency_penalty": st.floats(-3, 3) | EDGES | JSON,
    # Keys as JSON objects carry them: text, of digits (any script's), signs, spaces or none.
    "logit_bias": st.dictionaries(st.text(max_size=6) | st.integers(-2, VOCAB + 2).map(str) | EDGES.map(str)
                                  | st.sampled_from(["\u00b2", "\u0663", " 5", "+5", "05", "1e3"]),
                                  st.floats(-150, 150) | EDGES | JSON, max_size=3) | JSON,
    "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}]) | JSON,
    "best_of": st.integers(-1, 3) | JSON,
    "echo": st.booleans() | JSON,
    "tools": st.just([]) | JSON,
}
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "developer", "tool", "x"]) | JSON},
                                optional={"content": st.none() | st.text(max_size=12) | JSON})


@st.composite
def bodies(draw):
    """(route, body): half the time a valid body with one field drawn (so a bad value meets no
    earlier refusal), else a body whose prompt or messages and up to four fields are each of a
    right or wrong shape."""
    chat = draw(st.booleans())
    route = "/chat/completions" if chat else "/completions"
    if draw(st.booleans()):
        body = {"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "Once upon", "max_tokens": 2}
        key = draw(st.sampled_from(sorted(FIELDS)))
        return route, body | {key: draw(EDGES | FIELDS[key])}
    body = {"messages": draw(st.lists(MESSAGE, max_size=3) | JSON)} if chat else {"prompt": draw(PROMPTS | JSON)}
    for key in draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=4, unique=True)):
        body[key] = draw(FIELDS[key])
    return route, body


@pytest.fixture(scope="module")
def server(serve):
    return serve(RECIPE, "dtype=float32", "--slots", "4", "--cache-len", "128", "--queue", "8")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=bodies())
@example(case=("/completions", {"prompt": "Once upon", "max_tokens": 2, "seed": 2**80}))  # held-out probes
@example(case=("/chat/completions", {"messages": [{"role": "user", "content": None}]}))
@example(case=("/completions", {"prompt": "Once upon", "max_tokens": 2, "logit_bias": {"\u00b2": 1}}))
def test_no_body_gets_a_5xx_or_a_dropped_connection(server, case):
    route, body = case
    r = httpx.post(server.v1 + route, json=body, timeout=60)  # a dropped connection raises here
    assert r.status_code < 500, (body, r.text)
    if r.status_code >= 400:
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], r.text


def test_the_server_answers_after_the_fuzz(server):
    r = httpx.post(server.v1 + "/completions", json={"prompt": "Once upon a time", "max_tokens": 3, "temperature": 0},
                   timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
