"""--api-key on tiny-moe (fp32), /health while loading, and the recipes `runner serve` refuses."""
from __future__ import annotations

import subprocess
import sys

import httpx
import openai
import pytest

from tests.serve.conftest import ROOT

KEY = "sk-test-123"


@pytest.fixture(scope="module")
def server(serve):
    return serve("recipes/tiny-moe.yaml", "dtype=float32", "--slots", "2", "--cache-len", "128", "--api-key", KEY,
                 "--model-name", "moe")


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                                     {"Authorization": f"Basic {KEY}"}], ids=["none", "wrong", "no-scheme", "basic"])
@pytest.mark.parametrize("path", ["/completions", "/chat/completions", "/models"])
def test_without_the_key_401(server, headers, path):
    call = httpx.get if path == "/models" else httpx.post
    kw = {} if path == "/models" else {"json": {"prompt": "x", "max_tokens": 2}}
    r = call(server.v1 + path, headers=headers, timeout=30, **kw)
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "authentication_error"


def test_with_the_key(server):
    good = openai.OpenAI(base_url=server.v1, api_key=KEY, max_retries=0, timeout=60)
    assert [m.id for m in good.models.list().data] == ["moe"]
    out = good.completions.create(model="moe", prompt="Once upon a time", max_tokens=40, temperature=0)
    assert out.usage.completion_tokens == 40 or out.choices[0].finish_reason == "stop"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.v1, api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        good.completions.create(model="tiny-moe", prompt="x", max_tokens=2)
    # /health and /metrics stay open (probes and scrapers carry no key).
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200


def test_loading_answers_503():
    from fastapi.testclient import TestClient

    from runner.decoders.sampling import Sampling
    from runner.serve.app import Settings, State, create_app
    from runner.serve.metrics import Metrics

    settings = Settings("m", None, slots=2, cache_len=64, sampling=Sampling(), max_tokens=8)
    with TestClient(create_app(State(settings, Metrics()))) as c:
        assert c.get("/health").status_code == 503
        r = c.post("/v1/completions", json={"prompt": "x"})
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
        assert c.get("/v1/models").json()["data"][0]["id"] == "m"


def test_refuses_a_draft_model():
    # n-gram drafts are served (tests/serve/test_ngram.py); a draft model is not.
    r = subprocess.run([sys.executable, "-m", "runner", "serve", "recipes/tiny-random.yaml", "draft.kind=model",
                        "draft.model=${model}"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "draft.kind:" in r.stderr and "n-gram lookup only" in r.stderr, r.stderr
