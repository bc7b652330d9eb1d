"""/v1/completions on tiny-random (fp32) through a real server: greedy equals the CLI, streams
equal the whole answer, stop strings, logprobs, n, seeds, and the OpenAI-shaped errors."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.serve.conftest import cli_greedy

RECIPE = "recipes/tiny-random.yaml"
PROMPT = "Once upon a time"
TOKENS = 24


@pytest.fixture(scope="module")
def server(serve):
    return serve(RECIPE, "dtype=float32", "--slots", "4", "--cache-len", "256", "--queue", "4")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=60)


def complete(client, **kw):
    return client.completions.create(model="tiny-random", prompt=kw.pop("prompt", PROMPT), **kw)


def streamed(client, **kw) -> tuple[str, list]:
    chunks = list(complete(client, stream=True, **kw))
    return "".join(c.choices[0].text for c in chunks if c.choices), chunks


def test_greedy_equals_cli_streamed_or_not(client):
    expected = cli_greedy(RECIPE, PROMPT, TOKENS, "dtype=float32")
    whole = complete(client, max_tokens=TOKENS, temperature=0)
    assert whole.choices[0].text == expected
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == TOKENS and whole.usage.prompt_tokens > 0
    text, chunks = streamed(client, max_tokens=TOKENS, temperature=0)
    assert text == expected
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"


def test_stream_framing_done_and_usage(server):
    body = {"model": "tiny-random", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.v1 + "/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines), lines
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    usage = events[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 8
    assert usage["usage"]["total_tokens"] == usage["usage"]["prompt_tokens"] + 8
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in e for e in events[:-1])


def test_stop_string_across_two_tokens_is_cut(client):
    whole = complete(client, max_tokens=TOKENS, temperature=0, logprobs=0)
    tokens = whole.choices[0].logprobs.tokens
    text = whole.choices[0].text
    # A stop string made of one token's last character and the next one's first: it spans two tokens.
    k = next(i for i in range(2, len(tokens) - 1) if tokens[i] and tokens[i + 1] and "\ufffd" not in tokens[i] + tokens[i + 1])
    stop = tokens[k][-1] + tokens[k + 1][0]
    expected = text[:text.index(stop)]
    for stops in (stop, [stop, "never appears"]):
        cut = complete(client, max_tokens=TOKENS, temperature=0, stop=stops)
        assert cut.choices[0].text == expected and cut.choices[0].finish_reason == "stop"
        text_streamed, chunks = streamed(client, max_tokens=TOKENS, temperature=0, stop=stops)
        assert text_streamed == expected and chunks[-1].choices[0].finish_reason == "stop"


def test_logprobs(client):
    out = complete(client, max_tokens=6, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    for chosen, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) <= 3 and logprob <= 0
        # Greedy: the chosen token is the most likely one.
        assert logprob == pytest.approx(max(top.values()), abs=1e-5)
    assert "".join(lp.tokens) == out.choices[0].text


def test_n_choices_and_seeds(client):
    out = complete(client, max_tokens=12, temperature=1.0, n=3, seed=7)
    texts = [c.text for c in sorted(out.choices, key=lambda c: c.index)]
    assert [c.index for c in sorted(out.choices, key=lambda c: c.index)] == [0, 1, 2]
    assert out.usage.completion_tokens == 36
    # Choice i is seeded with seed + i: choice 1 of seed 7 is choice 0 of seed 8.
    assert complete(client, max_tokens=12, temperature=1.0, seed=8).choices[0].text == texts[1]
    assert len(set(texts)) > 1


def test_seeded_sample_same_alone_and_batched(client):
    alone = complete(client, max_tokens=20, temperature=0.9, seed=1234).choices[0].text
    with ThreadPoolExecutor(4) as pool:
        others = [pool.submit(complete, client, prompt=f"Story {i}:", max_tokens=30, temperature=1.0, seed=i)
                  for i in range(3)]
        batched = pool.submit(complete, client, max_tokens=20, temperature=0.9, seed=1234)
        assert batched.result().choices[0].text == alone
        assert all(o.result().choices[0].finish_reason == "length" for o in others)


def test_token_id_prompts_and_several_prompts(client):
    text = complete(client, max_tokens=5, temperature=0).choices[0].text
    out = complete(client, prompt=[PROMPT, PROMPT], max_tokens=5, temperature=0)
    assert [c.text for c in out.choices] == [text, text]


def test_models_lists_the_recipe(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny-random"]


BAD = [
    ("malformed json", b"{not json", 400),
    ("not an object", b"[1, 2]", 400),
    ("no prompt", {"model": "tiny-random"}, 400),
    ("other model", {"model": "gpt-4", "prompt": "x"}, 404),
    ("negative max_tokens", {"prompt": "x", "max_tokens": -5}, 400),
    ("huge max_tokens", {"prompt": "x", "max_tokens": 10**30}, 400),
    ("prompt beyond the cache", {"prompt": "word " * 600}, 400),
    ("n beyond the slots", {"prompt": "x", "n": 5}, 400),
    ("temperature", {"prompt": "x", "temperature": -1}, 400),
    ("top_p", {"prompt": "x", "top_p": 1.5}, 400),
    ("too many stops", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400),
    ("token id out of vocabulary", {"prompt": [1, 10**9]}, 400),
    ("wrong type", {"prompt": "x", "max_tokens": "many"}, 400),
    ("logprobs too many", {"prompt": "x", "logprobs": 1000}, 400),
    ("chat without a template", {"messages": [{"role": "user", "content": "hi"}]}, 400),
    ("seed beyond 64 bits", {"prompt": "x", "seed": 2**80}, 400),
    ("seed below 64 bits", {"prompt": "x", "seed": -(2**70)}, 400),
    ("token ids as floats", {"prompt": [1.0, 2.0]}, 400),
    ("token id lists as floats", {"prompt": [[1, 2], [3.5]]}, 400),
    ("null user content", {"messages": [{"role": "user", "content": None}]}, 400),
    ("null system content", {"messages": [{"role": "system", "content": None}, {"role": "user", "content": "hi"}]}, 400),
    ("response_format of an unknown type", {"prompt": "x", "response_format": {"type": "xml"}}, 400),
    ("tools not served", {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400),
    ("best_of above 1", {"prompt": "x", "best_of": 3}, 400),
    ("echo", {"prompt": "x", "echo": True}, 400),
    ("presence_penalty", {"prompt": "x", "presence_penalty": 2.5}, 400),
    ("frequency_penalty", {"prompt": "x", "frequency_penalty": -3}, 400),
    ("repetition_penalty", {"prompt": "x", "repetition_penalty": 0}, 400),
    ("min_p", {"prompt": "x", "min_p": 1.5}, 400),
    ("logit_bias key", {"prompt": "x", "logit_bias": {"dog": 1}}, 400),
    ("logit_bias key of other digits", {"prompt": "x", "logit_bias": {"\u00b2": 1}}, 400),
    ("logit_bias value", {"prompt": "x", "logit_bias": {"5": 101}}, 400),
    ("logit_bias beyond the vocabulary", {"prompt": "x", "logit_bias": {"100000": 1}}, 400),
]
# The field a 400 names (error.param), where the request got past neither schema nor checks.
PARAMS = {"seed beyond 64 bits": "seed", "seed below 64 bits": "seed", "null user content": "messages.0",
          "null system content": "messages.0", "response_format of an unknown type": "response_format.type",
          "tools not served": "tools", "best_of above 1": "best_of", "echo": "echo",
          "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
          "repetition_penalty": "repetition_penalty", "min_p": "min_p", "logit_bias key": "logit_bias",
          "logit_bias key of other digits": "logit_bias",
          "logit_bias value": "logit_bias", "logit_bias beyond the vocabulary": "logit_bias"}


@pytest.mark.parametrize("name,body,status", BAD, ids=[b[0] for b in BAD])
def test_bad_request_is_shaped_and_server_goes_on(server, client, name, body, status):
    path = "/chat/completions" if isinstance(body, dict) and "messages" in body else "/completions"
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.v1 + path, timeout=30, **kw)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if name == "prompt beyond the cache":
        assert error["code"] == "context_length_exceeded"
    if name in PARAMS:
        assert error["param"] == PARAMS[name], error
    if name.startswith("token id"):
        assert (error["param"] or "").startswith("prompt"), error
    assert complete(client, max_tokens=3, temperature=0).choices[0].finish_reason == "length"


def test_unknown_fields_are_ignored(server):
    r = httpx.post(server.v1 + "/completions", json={"prompt": "x", "max_tokens": 2, "frobnicate": True,
                                                     "best_of": 1, "echo": False, "response_format": {"type": "text"},
                                                     "user": "me", "metadata": {"a": "b"}}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_sampling_controls_reach_the_sampler(client):
    # Each control reaches the sampler (their math is checked against HF's processors in
    # tests/decoders/test_sampling_controls.py): a +100 bias forces its token, another token's
    # bias another text; each penalty changes the greedy text of a tiny random model, which repeats
    # itself; min_p 1 leaves only the likeliest token, so sampling is greedy.
    def pieces(**kw):
        return complete(client, max_tokens=TOKENS, temperature=0, logprobs=0, **kw).choices[0].logprobs.tokens

    plain = pieces()
    forced = [pieces(logit_bias={str(token): 100}) for token in (7, 8)]
    assert all(len(set(f)) == 1 for f in forced) and forced[0] != forced[1]
    for penalty in ({"presence_penalty": 2.0}, {"frequency_penalty": 2.0},
                    {"extra_body": {"repetition_penalty": 3.0}}):  # not OpenAI's own field: the client's extra_body
        assert pieces(**penalty) != plain, penalty
    sampled = complete(client, max_tokens=TOKENS, temperature=1.0, seed=3, extra_body={"min_p": 1.0})
    assert sampled.choices[0].text == complete(client, max_tokens=TOKENS, temperature=0).choices[0].text


def test_metrics_count_requests_and_tokens(server, client):
    before = server.metrics()
    complete(client, max_tokens=4, temperature=0)
    after = server.metrics()
    key = 'runner_requests_total{endpoint="/v1/completions",status="200"}'
    assert after[key] == before.get(key, 0) + 1
    assert after["runner_generation_tokens_total"] == before["runner_generation_tokens_total"] + 4
    assert after["runner_prompt_tokens_total"] > before["runner_prompt_tokens_total"]
    assert after["runner_time_to_first_token_seconds_count"] == before["runner_time_to_first_token_seconds_count"] + 1
    assert after["runner_time_per_output_token_seconds_count"] == before["runner_time_per_output_token_seconds_count"] + 3
    assert after["runner_requests_running"] == 0 and after["runner_requests_waiting"] == 0


def test_a_resent_conversation_is_served_from_the_cache_with_the_same_answer(server, client):
    # A chat client's next turn: the last prompt and its answer, then more. The second request
    # prefills only what follows the cached prefix (counted in /metrics) and answers what the CLI
    # answers cold.
    first = complete(client, prompt=PROMPT, max_tokens=8, temperature=0)
    turn = PROMPT + first.choices[0].text + " And then"
    before = server.metrics()
    again = complete(client, prompt=turn, max_tokens=8, temperature=0)
    cached = server.metrics()["runner_prompt_tokens_cached_total"] - before["runner_prompt_tokens_cached_total"]
    assert 0 < cached < again.usage.prompt_tokens  # a merge across the old end may cost a token or two
    assert again.choices[0].text == cli_greedy(RECIPE, turn, 8, "dtype=float32")


def test_a_curl_style_body_is_read_as_json_whatever_its_content_type(server, client):
    """`curl -N URL -d '{...}'` sends application/x-www-form-urlencoded (the README's example)."""
    expected = complete(client, max_tokens=8, temperature=0).choices[0].text
    body = json.dumps({"model": "tiny-random", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stream": True})
    for headers in ({"content-type": "application/x-www-form-urlencoded"}, {}):
        with httpx.stream("POST", server.v1 + "/completions", content=body, headers=headers, timeout=60) as r:
            assert r.status_code == 200, r.read()
            lines = [line for line in r.iter_lines() if line]
        assert lines[-1] == "data: [DONE]"
        assert "".join(c["choices"][0]["text"] for c in map(json.loads, (l[6:] for l in lines[:-1])) if c["choices"]) == expected


def test_a_body_beyond_the_limit_is_413_and_the_server_goes_on(server, client):
    from runner.serve.app import MAX_BODY_BYTES

    big = b'{"model": "tiny-random", "prompt": "' + b"a" * MAX_BODY_BYTES + b'"}'
    r = httpx.post(server.v1 + "/completions", content=big, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: caught as the body arrives
        for _ in range(MAX_BODY_BYTES // 65536 + 2):
            yield b"a" * 65536

    r = httpx.post(server.v1 + "/completions", content=chunks(), timeout=60)
    assert r.status_code == 413
    assert complete(client, max_tokens=4, temperature=0).choices[0].text
