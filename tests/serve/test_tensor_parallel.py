"""`runner serve` of a tensor-parallel recipe: rank 0 serves and schedules, rank 1 repeats its
decoder's calls. Its answers are the one-process server's: greedy, seeded samples in a batch, and
structured output (each rank masks with its own copy of the row's grammar)."""
from __future__ import annotations

import time

import httpx
import pytest

from tests.serve.conftest import ROOT

pytestmark = pytest.mark.tp
RECIPE = str(ROOT / "recipes" / "tiny-moe.yaml")  # experts split over the ranks, and a sliding window
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                          "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


def answers(server) -> list:
    out = []
    with httpx.Client(base_url=server.v1, timeout=60) as c:
        for body in ({"prompt": "Once upon a time", "max_tokens": 40, "temperature": 0},
                     {"prompt": ["The cat", "One two"], "max_tokens": 24, "temperature": 1.0, "seed": 5, "n": 2},
                     {"prompt": "A person:", "max_tokens": 48, "temperature": 1.0, "seed": 3, "n": 2,
                      "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}}):
            r = c.post("/completions", json={"model": "tiny-moe", **body})
            assert r.status_code == 200, r.text
            out.append([choice["text"] for choice in r.json()["choices"]])
    return out


def test_two_ranks_answer_what_one_process_does(serve):
    one = serve(RECIPE, "--slots", "4")
    two = serve(RECIPE, "--slots", "4", "parallel.world_size=2")
    expected = answers(one)
    assert answers(two) == expected
    time.sleep(12)  # idle past a heartbeat: the ranks still agree afterwards
    assert answers(two) == expected
