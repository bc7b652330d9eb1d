"""`usage` with several choices, on tiny-random (fp32) with a small byte-level BPE that has a chat
template: a prompt's tokens count once however many choices it gets (n), each prompt of a list
counts, streamed (include_usage) or not, on /v1/completions and /v1/chat/completions."""
from __future__ import annotations

import json

import httpx
import pytest

from tests.tokenizers.conftest import SPECIALS, byte_level, train_byte_level

RECIPE = "recipes/tiny-random.yaml"
TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
PROMPT, OTHER = "Once upon a time", "The quick brown fox jumps over the lazy dog, twice."
MESSAGES = [{"role": "user", "content": PROMPT}]
TOKENS = 5


@pytest.fixture(scope="module")
def server(serve, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bpe")
    train_byte_level(byte_level(), vocab_size=512).save(str(folder / "tokenizer.json"))  # the model's vocabulary
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE, "eos_token": SPECIALS[2]}))
    return serve(RECIPE, "dtype=float32", "tokenizer.kind=hf", f"tokenizer.path={folder}",
                 "--slots", "6", "--cache-len", "256", "--queue", "4")


def usage(server, route: str, stream: bool, **body) -> dict:
    """The usage of one greedy request of TOKENS tokens, from its body or its last chunk."""
    body = {"model": "tiny-random", "max_tokens": TOKENS, "temperature": 0, **body}
    url = f"{server.v1}/{route}"
    if not stream:
        r = httpx.post(url, json=body, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["usage"]
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", url, json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        events = [json.loads(line[6:]) for line in r.iter_lines() if line and line != "data: [DONE]"]
    assert events[-1]["choices"] == [] and all(e.get("usage") is None for e in events[:-1])
    return events[-1]["usage"]


def check(got: dict, prompt_tokens: int, completion_tokens: int):
    assert got == {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                   "total_tokens": prompt_tokens + completion_tokens}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_completions_count_each_prompt_once_whatever_n(server, stream):
    one = usage(server, "completions", stream, prompt=PROMPT)
    other = usage(server, "completions", stream, prompt=OTHER)
    p, c = one["prompt_tokens"], one["completion_tokens"]
    assert 0 < p < other["prompt_tokens"] and c == TOKENS == other["completion_tokens"]
    check(usage(server, "completions", stream, prompt=PROMPT, n=3), p, 3 * c)
    check(usage(server, "completions", stream, prompt=[PROMPT, PROMPT]), 2 * p, 2 * c)
    check(usage(server, "completions", stream, prompt=[PROMPT, PROMPT], n=2), 2 * p, 4 * c)
    check(usage(server, "completions", stream, prompt=[PROMPT, OTHER], n=3), p + other["prompt_tokens"], 6 * c)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_completions_of_token_ids_count_each_list(server, stream):
    ids = [5, 6, 7, 8, 9, 10, 11]
    check(usage(server, "completions", stream, prompt=ids, n=3), len(ids), 3 * TOKENS)
    check(usage(server, "completions", stream, prompt=[ids, ids[:3]], n=2), len(ids) + 3, 4 * TOKENS)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_chat_counts_the_conversation_once_whatever_n(server, stream):
    one = usage(server, "chat/completions", stream, messages=MESSAGES)
    p, c = one["prompt_tokens"], one["completion_tokens"]
    assert p > usage(server, "completions", stream, prompt=PROMPT)["prompt_tokens"]  # the template's markers too
    assert c == TOKENS
    check(usage(server, "chat/completions", stream, messages=MESSAGES, n=3), p, 3 * c)
    check(usage(server, "chat/completions", stream, messages=MESSAGES, n=6), p, 6 * c)
