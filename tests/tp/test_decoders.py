"""Decoders under tensor parallelism, through the command line: speculative greedy (a sharded
int8 draft, an n-gram draft) prints what plain greedy prints at world size 1, and seeded
sampling draws what it draws at world size 1."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.tp
ROOT = Path(__file__).resolve().parents[2]
DRAFTS = {
    "none": [],
    "model": ["draft.kind=model", "draft.model=${model}", "draft.quant.mode=int8", "draft.speculate_k=3"],
    "ngram": ["draft.kind=ngram", "draft.speculate_k=4"],
}


def text(*overrides: str) -> str:
    """The generated text (stdout without the statistics lines) of the tiny random recipe."""
    run = subprocess.run([sys.executable, "-m", "runner", "recipes/tiny-random.yaml", "generate.max_new_tokens=40",
                          *overrides], cwd=ROOT, capture_output=True, text=True, timeout=300, env=os.environ)
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stdout.splitlines() if "tokens/s" not in line and not line.startswith("speculative")]
    return "\n".join(lines)


@pytest.mark.parametrize("draft", ["model", "ngram"])
def test_speculative_greedy_under_tp_prints_plain_greedy(draft):
    plain = text("generate.temperature=0")
    assert text("generate.temperature=0", "parallel.world_size=2", *DRAFTS[draft]) == plain


def test_sampling_under_tp_draws_what_one_rank_draws_with_the_seed():
    """Every rank draws from the same all-reduced logits with the same seeded generator, so the
    ranks stay in step, and (the logits agreeing to 1e-6) they draw what world size 1 draws."""
    sampled = text("generate.temperature=0.8", "generate.seed=5", "parallel.world_size=2")
    assert sampled == text("generate.temperature=0.8", "generate.seed=5")
    assert sampled != text("generate.temperature=0.8", "generate.seed=6")  # the seed decides: not greedy in disguise
