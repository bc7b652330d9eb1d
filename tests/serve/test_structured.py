"""Structured output (response_format) through a real server on tiny-random (fp32): every choice
of a drawn JSON schema parses and validates, sampled or greedy, several rows of one batch each
under its own matcher; json_object, streamed or not; a row's mask, or a draw its grammar refuses,
leaves the rows beside it alone; logprobs past the allowed tokens stay JSON; bad response formats
are 400s naming the field; the official client sends them."""
from __future__ import annotations

import json
import math
import threading
import time

import httpx
import jsonschema
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.config.schema import TokenizerKind, TokenizerSection
from runner.tokenizers import build
from tests.decoders.test_grammar import schemas
from tests.helpers.tokenizers import TINY_SP_MODEL

RECIPE = "recipes/tiny-random.yaml"
PROMPT = "Once upon a time"  # 13 tokens here
CACHE_LEN = 512  # tiny-llama's max_seq_len
MAX_TOKENS = 480  # the drawn schemas' documents take far fewer; what is left of the cache beside the prompt
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 6},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120}}}


@pytest.fixture(scope="module")
def server(serve):
    return serve(RECIPE, "dtype=float32", "--slots", "4", "--cache-len", str(CACHE_LEN), "--queue", "4")


def json_schema(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "t", "schema": schema}}


def post(server, body: dict, route: str = "/completions") -> httpx.Response:
    return httpx.post(server.v1 + route, json={"prompt": PROMPT} | body, timeout=120)


def complete(server, **body) -> dict:
    r = post(server, body)
    assert r.status_code == 200, r.text
    return r.json()


def texts(out: dict) -> list[str]:
    return [c["text"] for c in sorted(out["choices"], key=lambda c: c["index"])]


def closers() -> dict[str, float]:
    """A logit_bias toward the tokens holding '"' or '}': a random model then closes free-form JSON
    (it would write one string forever)."""
    tokenizer = build(TokenizerSection(kind=TokenizerKind.sentencepiece, path=str(TINY_SP_MODEL)))
    return {str(i): 3.0 for i in range(tokenizer.vocab_size) if any(c in tokenizer.token_bytes(i) for c in b'"}')}


def strict_json(text: str):
    """json.loads, failing on NaN and ±Infinity, which Python reads and JSON has not."""
    return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} is not JSON: {text}"))


def digits_end(schema) -> bool:
    """Whether every number the schema allows has boundedly many digits. JSON's grammar lets a
    number's fraction (or an integer with no maximum) go on, and a greedy random model may write
    "1.0000..." until max_tokens."""
    if isinstance(schema, list):
        return all(map(digits_end, schema))
    if not isinstance(schema, dict):
        return True
    if schema.get("type") == "number" or (schema.get("type") == "integer" and "maximum" not in schema):
        return False
    return all(map(digits_end, schema.values()))


# --- drawn schemas ------------------------------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(schema=schemas, seed=st.integers(0, 2**32 - 1))
def test_every_choice_is_json_its_schema_accepts(server, schema, seed):
    """n=3: three rows of one batch, each with its own matcher; sampled, and greedy where the
    schema's numbers end."""
    validator = jsonschema.Draft202012Validator(schema)
    for temperature in (1.0, 0.0):
        if temperature == 0 and not digits_end(schema):
            continue
        out = complete(server, max_tokens=MAX_TOKENS, temperature=temperature, seed=seed, n=3,
                       response_format=json_schema(schema))
        for choice in out["choices"]:
            assert choice["finish_reason"] == "stop", (temperature, choice)
            validator.validate(json.loads(choice["text"]))
        if temperature == 0:
            assert len(set(texts(out))) == 1, texts(out)


# --- json_object --------------------------------------------------------------------------------


def test_json_object_gives_objects_streamed_or_not(server):
    # tiny-random has no chat template (its chat route is a 400), so completions carry it.
    body = {"max_tokens": MAX_TOKENS, "temperature": 1.0, "seed": 1, "n": 3, "logit_bias": closers(),
            "response_format": {"type": "json_object"}}
    whole = texts(complete(server, **body))
    assert all(isinstance(json.loads(text), dict) for text in whole), whole
    assert any(json.loads(text) for text in whole), whole  # not only {}

    with httpx.stream("POST", server.v1 + "/completions", json={"prompt": PROMPT, "stream": True} | body,
                      timeout=120) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    streamed, finish = [""] * 3, [None] * 3
    for line in lines[:-1]:
        for choice in json.loads(line.removeprefix("data: "))["choices"]:
            streamed[choice["index"]] += choice["text"]
            finish[choice["index"]] = choice["finish_reason"] or finish[choice["index"]]
    assert streamed == whole and finish == ["stop"] * 3


# --- a row's mask is its own --------------------------------------------------------------------


def test_a_rows_grammar_leaves_the_rows_beside_it_alone(server):
    """The same constrained requests alone, and while three long requests decode beside them: two
    unconstrained, one under another grammar (a string that a random model never closes)."""
    requests = [{"max_tokens": 60, "temperature": 0, "response_format": json_schema(PERSON)},
                {"max_tokens": 60, "temperature": 1.0, "seed": 11, "response_format": json_schema(PERSON)}]
    alone = [texts(complete(server, **body)) for body in requests]
    for text in alone:
        jsonschema.validate(json.loads(text[0]), PERSON)

    neighbours = [{"temperature": 1.0, "seed": 5}, {"temperature": 0},
                  {"temperature": 0, "response_format": json_schema({"type": "string"})}]
    ended: list[float] = []

    def decode_beside(body):
        body = {"prompt": PROMPT, "max_tokens": 300, "stream": True} | body
        with httpx.stream("POST", server.v1 + "/completions", json=body, timeout=120) as r:
            assert r.status_code == 200
            for _ in r.iter_lines():
                pass
        ended.append(time.monotonic())

    threads = [threading.Thread(target=decode_beside, args=(body,)) for body in neighbours]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 30
        while server.metrics()["runner_requests_running"] < len(neighbours):
            assert time.monotonic() < deadline and not ended, "the neighbours never ran together"
            time.sleep(0.01)
        beside = [texts(complete(server, **body)) for body in requests]
        answered = time.monotonic()
    finally:
        for t in threads:
            t.join(timeout=120)
    assert len(ended) == len(neighbours) and min(ended) > answered, "a neighbour ended before the requests did"
    assert beside == alone


def test_a_draw_its_grammar_refuses_ends_no_other_row(server):
    # A temperature this small overflows logits / temperature: the sampler draws from NaNs, a
    # token the mask forbids, in a decode step the rows beside it share.
    events: list[list[str]] = []

    def decode_beside():
        body = {"prompt": PROMPT, "max_tokens": 200, "temperature": 0, "stream": True}
        with httpx.stream("POST", server.v1 + "/completions", json=body, timeout=120) as r:
            events.append([line for line in r.iter_lines() if line])

    threads = [threading.Thread(target=decode_beside) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 30
        while server.metrics()["runner_requests_running"] < len(threads):
            assert time.monotonic() < deadline and not events, "the neighbours never ran together"
            time.sleep(0.01)
        r = post(server, {"prompt": "Once upon", "max_tokens": 60, "temperature": 1e-39,
                          "response_format": {"type": "json_object"}})
    finally:
        for t in threads:
            t.join(timeout=120)
    for lines in events:
        assert lines[-1] == "data: [DONE]" and not any('"error"' in line for line in lines), (r.text, lines[-2:])
        assert json.loads(lines[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"


# --- bad response formats -----------------------------------------------------------------------

BAD = [
    ("a string", "json_object", "response_format"),
    ("no type", {}, "response_format.type"),
    ("unknown type", {"type": "nonsense"}, "response_format.type"),
    ("json_schema without json_schema", {"type": "json_schema"}, "response_format.json_schema"),
    ("json_schema not an object", {"type": "json_schema", "json_schema": ["x"]}, "response_format.json_schema"),
    ("json_schema without a schema", {"type": "json_schema", "json_schema": {}}, "response_format.json_schema.schema"),
    ("schema of an unknown type", json_schema({"type": "nonsense"}), "response_format.json_schema.schema"),
    ("schema a list", json_schema([{"type": "string"}]), "response_format.json_schema.schema"),
    ("schema not JSON text", json_schema('{"type": '), "response_format.json_schema.schema"),
    ("unsatisfiable schema", json_schema({"type": "string", "minLength": 5, "maxLength": 1}),
     "response_format.json_schema.schema"),
    ("remote $ref", json_schema({"$ref": "http://example.com/schema.json"}), "response_format.json_schema.schema"),
]


@pytest.mark.parametrize("name,response_format,param", BAD, ids=[b[0] for b in BAD])
def test_bad_response_format_is_a_400_naming_the_field(server, name, response_format, param):
    r = post(server, {"max_tokens": 4, "response_format": response_format})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert error["message"].startswith(param + ":"), error


def test_text_and_null_are_no_constraint(server):
    plain = texts(complete(server, max_tokens=24, temperature=0))
    for response_format in ({"type": "text"}, None):
        assert texts(complete(server, max_tokens=24, temperature=0, response_format=response_format)) == plain


@pytest.mark.parametrize("stream", [False, True])
def test_top_logprobs_beyond_the_allowed_tokens_stay_json(server, stream):
    # The enum leaves one token allowed at each step; the 4 others asked for must not be -inf,
    # which JSON cannot carry.
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "logprobs": 5, "stream": stream,
            "response_format": json_schema({"enum": ["yes"]})}
    r = httpx.post(server.v1 + "/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    payloads = [line.removeprefix("data: ") for line in r.text.splitlines() if line.startswith("data: ")]
    for payload in payloads if stream else [r.text]:
        if payload == "[DONE]":
            continue
        for choice in strict_json(payload)["choices"]:
            logprobs = choice["logprobs"] or {"token_logprobs": [], "top_logprobs": []}
            values = logprobs["token_logprobs"] + [v for top in logprobs["top_logprobs"] for v in top.values()]
            assert all(math.isfinite(v) for v in values), choice


# --- the official client ------------------------------------------------------------------------


def test_the_openai_client_sends_a_json_schema(server):
    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=60)
    # Completions take response_format as an extra field (the client declares it for chat only).
    out = client.completions.create(model="tiny-random", prompt=PROMPT, max_tokens=60, temperature=1.0, seed=3, n=2,
                                    extra_body={"response_format": json_schema(PERSON)})
    for choice in out.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.text), PERSON)
    chunks = list(client.completions.create(model="tiny-random", prompt=PROMPT, max_tokens=60, temperature=1.0,
                                            seed=3, stream=True, extra_body={"response_format": json_schema(PERSON)}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == out.choices[0].text
