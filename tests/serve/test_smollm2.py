"""The real SmolLM2-135M-Instruct (fp32) through a real server: greedy chat and completions
equal the CLI's, chat logprobs, and, since a request lasts long enough here to act in its
middle: disconnects free slots, and a request beyond slots + queue gets 429."""
from __future__ import annotations

import json
import threading
import time

import httpx
import jsonschema
import openai
import pytest

from tests.serve.conftest import cli_greedy

pytestmark = pytest.mark.real

RECIPE = "recipes/smollm2-135m.yaml"
QUESTION = "What is the capital of France? Answer in one sentence."
TOKENS = 24
LONG = 400  # tokens: several seconds on a CPU


@pytest.fixture(scope="module")
def server(serve, smollm2_gguf):
    return serve(RECIPE, "dtype=float32", "--slots", "2", "--queue", "1", "--cache-len", "512")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)


def test_greedy_chat_equals_cli(client):
    expected = cli_greedy(RECIPE, QUESTION, TOKENS, "dtype=float32").removeprefix("\n")  # chat: a newline first
    messages = [{"role": "user", "content": QUESTION}]
    whole = client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=TOKENS, temperature=0)
    assert whole.choices[0].message.content == expected
    chunks = list(client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=TOKENS,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_greedy_completion_equals_cli(client):
    prompt = "The three primary colors are"
    expected = cli_greedy(RECIPE, prompt, TOKENS, "dtype=float32", "generate.chat=false")
    out = client.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=TOKENS, temperature=0)
    assert out.choices[0].text == expected


def test_chat_logprobs(client):
    out = client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": QUESTION}],
                                         max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-5)
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token
    assert "".join(e.token for e in content) == out.choices[0].message.content


def test_chat_json_schema_answers_an_object_the_schema_accepts(client):
    schema = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city"],
              "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 40},
                             "age": {"type": "integer", "minimum": 0, "maximum": 130},
                             "city": {"type": "string", "minLength": 1, "maxLength": 40}}}
    request = {"model": "smollm2-135m", "max_tokens": 100, "temperature": 0,
               "messages": [{"role": "user", "content": "Describe a person as a JSON object with their name, age "
                                                        "and the city they live in."}],
               "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}}
    whole = client.chat.completions.create(**request)
    assert whole.choices[0].finish_reason == "stop", whole.choices[0].message.content
    jsonschema.validate(json.loads(whole.choices[0].message.content), schema)
    chunks = list(client.chat.completions.create(stream=True, **request))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content


def wait_for(server, check, seconds: float = 20) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        m = server.metrics()
        if check(m):
            return m
        time.sleep(0.05)
    raise AssertionError(f"not reached in {seconds} s: {m}")


def idle(m) -> bool:
    return m["runner_requests_running"] == 0 and m["runner_requests_waiting"] == 0


def test_disconnect_mid_stream_frees_the_slot(server):
    before = wait_for(server, idle)
    body = {"prompt": "Once upon a time", "max_tokens": LONG, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.v1 + "/completions", json=body, timeout=60) as r:
        lines = (line for line in r.iter_lines() if line)
        for _ in range(3):
            assert next(lines).startswith("data: ")
        assert server.metrics()["runner_requests_running"] == 1
    after = wait_for(server, idle, seconds=5)  # closing the connection cancelled it
    assert after["runner_generation_tokens_total"] - before["runner_generation_tokens_total"] < LONG


def test_disconnect_while_waiting_for_a_whole_answer(server):
    before = wait_for(server, idle)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.v1 + "/completions", json={"prompt": "Once upon a time", "max_tokens": LONG},
                   timeout=httpx.Timeout(60, read=1.0))
    after = wait_for(server, idle, seconds=5)
    assert after["runner_generation_tokens_total"] - before["runner_generation_tokens_total"] < LONG


def test_429_when_slots_and_queue_are_full(server, client):
    wait_for(server, idle)
    stop = threading.Event()
    statuses = []

    def hold():  # a long stream, read until told to hang up
        body = {"prompt": "Once upon a time", "max_tokens": LONG, "stream": True}
        with httpx.stream("POST", server.v1 + "/completions", json=body, timeout=60) as r:
            statuses.append(r.status_code)
            for _ in r.iter_lines():
                if stop.is_set():
                    return

    holders = [threading.Thread(target=hold) for _ in range(3)]  # 2 slots + 1 queue place
    for t in holders:
        t.start()
    try:
        wait_for(server, lambda m: m["runner_requests_running"] == 2 and m["runner_requests_waiting"] == 1)
        r = httpx.post(server.v1 + "/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
    finally:
        stop.set()
        for t in holders:
            t.join(timeout=60)
    assert statuses == [200, 200, 200]
    wait_for(server, idle, seconds=10)
    assert client.completions.create(model="smollm2-135m", prompt="Hi", max_tokens=2).usage.completion_tokens == 2
