"""Request bodies drawn by hypothesis, valid and not, against a running server: every answer is a
200 or an OpenAI-shaped 4xx naming what was wrong, never a 5xx or a dropped connection, and the
server still answers a plain request after them all. response_format is drawn as a whole or
broken at any depth, its schema among those tests/decoders/test_grammar.py draws or from JSON
schema's keywords with values of any shape."""
from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.decoders.test_grammar import schemas

RECIPE = "recipes/tiny-random.yaml"
VOCAB = 512  # tiny-random's sentencepiece vocabulary

# Every JSON shape a field might be sent as: what it should be, and what it should not.
JSON = st.recursive(st.none() | st.booleans() | st.integers(-(2**80), 2**80) | st.floats(allow_nan=False, allow_infinity=False)
                    | st.text(max_size=8), lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
EDGES = st.sampled_from([0, -1, 2**31, 2**63 - 1, 2**63, 2**64, 2**80, -(2**63), -(2**63) - 1, 10**30])
IDS = st.lists(st.integers(-2, VOCAB + 2) | EDGES, min_size=1, max_size=6)
PROMPTS = st.text(max_size=20) | st.lists(st.text(max_size=8), max_size=3) | IDS | st.lists(IDS, max_size=2)
# JSON schema's keywords with values of the right shape, the wrong one or nonsense: llguidance
# must refuse what it cannot compile with an error, never a crash.
KEYWORDS = st.sampled_from(["type", "properties", "items", "required", "enum", "const", "minLength", "maxLength",
                            "minimum", "maximum", "exclusiveMinimum", "multipleOf", "pattern", "format", "anyOf",
                            "allOf", "oneOf", "not", "$ref", "$defs", "additionalProperties", "minItems",
                            "maxItems", "uniqueItems", "x-guidance"])
KEYWORD_VALUES = st.sampled_from(["object", "string", "integer", "number", "array", "boolean", "null", "nonsense",
                                  "email", "date-time", "(", "^a+$", "#", "#/$defs/x", "http://example.com/s"]) \
    | st.integers(-3, 10) | EDGES | JSON
LOOSE_SCHEMAS = st.recursive(st.dictionaries(KEYWORDS, KEYWORD_VALUES, max_size=3),
                             lambda inner: st.dictionaries(KEYWORDS, inner | st.lists(inner, max_size=2)
                                                           | st.dictionaries(st.text(max_size=3), inner, max_size=2)
                                                           | KEYWORD_VALUES, max_size=3), max_leaves=8)
SCHEMAS = schemas | schemas.map(json.dumps) | LOOSE_SCHEMAS | JSON  # a schema may come as its JSON text
# Well formed (their schema may not be), or with any part missing or of another shape.
RESPONSE_FORMATS = st.one_of(
    st.sampled_from([{"type": "text"}, {"type": "json_object"}]),
    st.builds(lambda schema, name: {"type": "json_schema", "json_schema": {"name": name, "schema": schema}},
              SCHEMAS, st.text(max_size=8) | JSON),
    st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "json_schema"]) | JSON},
                          optional={"json_schema": st.dictionaries(st.sampled_from(["name", "schema", "strict"]),
                                                                   SCHEMAS, max_size=3) | JSON}))
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
    "response_format": RESPONSE_FORMATS | JSON,
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

# Valid values of the fields that act on a constrained row's draws and on what is reported of them.
BESIDE = {"stream": st.booleans(), "n": st.integers(1, 4), "logprobs": st.integers(0, 5),
          "temperature": st.floats(0, 2), "seed": st.integers(0, 2**32), "stop": st.text(max_size=3),
          "logit_bias": st.dictionaries(st.integers(0, VOCAB - 1).map(str), st.floats(-100, 100), max_size=3)}


@st.composite
def constrained(draw):
    """A valid completion body but its drawn response_format, with up to three fields from BESIDE."""
    body = {"prompt": "Once upon", "max_tokens": draw(st.integers(1, 12)),
            "response_format": draw(RESPONSE_FORMATS | JSON)}
    for key in draw(st.lists(st.sampled_from(sorted(BESIDE)), max_size=3, unique=True)):
        body[key] = draw(BESIDE[key])
    return body


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


def strict_json(text: str):
    return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} is not JSON: {text}"))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=constrained())
@example(body={"prompt": "Once upon", "max_tokens": 2, "logprobs": 5, "response_format": {"type": "json_object"}})
@example(body={"prompt": "Once upon", "max_tokens": 2, "temperature": 1e-39,
               "response_format": {"type": "json_object"}})
def test_a_response_format_is_served_or_refused_by_name(server, body):
    """Only response_format can be wrong here, so a 4xx names it; a stream carries no error and
    nothing JSON cannot (a logprob of -inf)."""
    r = httpx.post(server.v1 + "/completions", json=body, timeout=60)
    assert r.status_code < 500, (body, r.text)
    if r.status_code >= 400:
        assert r.status_code == 400 and r.json()["error"]["param"].startswith("response_format"), (body, r.text)
        return
    if not body.get("stream"):
        strict_json(r.text)
        return
    events = [line.removeprefix("data: ") for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", (body, r.text)
    assert not any("error" in strict_json(event) for event in events[:-1]), (body, r.text)


def test_the_server_answers_after_the_fuzz(server):
    r = httpx.post(server.v1 + "/completions", json={"prompt": "Once upon a time", "max_tokens": 3, "temperature": 0},
                   timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
