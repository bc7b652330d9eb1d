"""A recipe with n-gram drafts (draft.kind: ngram) served: concurrent greedy requests each answer
what plain decoding answers, while rows keep different numbers of drafts a step."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from tests.serve.conftest import cli_greedy

RECIPE = "recipes/tiny-random.yaml"
TOKENS = 32
PROMPTS = ["the cat sat on the mat, the cat sat on the mat, the cat", "Once upon a time", "a b a b a b a b",
           "one two three one two three"]


@pytest.fixture(scope="module")
def server(serve):
    return serve(RECIPE, "dtype=float32", "draft.kind=ngram", "draft.speculate_k=4", "--slots", "4",
                 "--cache-len", "256")


def test_concurrent_greedy_requests_answer_as_plain_decoding(server):
    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)

    def complete(prompt: str) -> str:
        out = client.completions.create(model="tiny-random", prompt=prompt, max_tokens=TOKENS, temperature=0)
        assert out.usage.completion_tokens == TOKENS and out.choices[0].finish_reason == "length"
        return out.choices[0].text

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        texts = list(pool.map(complete, PROMPTS))
    for prompt, text in zip(PROMPTS, texts):
        assert text == cli_greedy(RECIPE, prompt, TOKENS, "dtype=float32"), prompt
