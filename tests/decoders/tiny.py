"""Tiny random target and draft models with peaked distributions, cache helpers, and a chi-square test.

random_state_dict's N(0, 0.02) weights give near-uniform next-token distributions, under which a
draft agrees with any target and a wrong rule hides; scaled by SCALE (std 0.5) the logits span
several units, so distributions are peaked and differ from model to model.
"""
from __future__ import annotations

from collections import Counter
from functools import lru_cache

import torch

from runner.checkpoint import random_state_dict
from runner.config.schema import ModelSpec
from runner.model.llama import Transformer

SCALE = 25.0
MAX_SEQ_LEN = 128
SIZES = {
    "target": dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=64),
    "target-1layer": dict(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, intermediate_size=64),
    "draft": dict(dim=16, n_layers=1, n_heads=2, intermediate_size=32),
}


def spec(size: str, vocab: int) -> ModelSpec:
    return ModelSpec(vocab_size=vocab, max_seq_len=MAX_SEQ_LEN, **SIZES[size])


@lru_cache(maxsize=None)
def tiny(size: str, vocab: int, seed: int, noise: float = 0.0, instance: int = 0) -> Transformer:
    """A model with SCALE-d random weights; noise > 0 adds noise * N(0, 1) times each weight's std.

    `instance` only tells copies apart: (size, vocab, seed, 0.0, 1) is a second model with the same
    weights and its own KV cache, for self-drafting.
    """
    s = spec(size, vocab)
    weights = random_state_dict(s, seed)
    generator = torch.Generator().manual_seed(10_000 + seed)
    state = {}
    for name, w in weights.items():
        if not name.endswith("norm.weight"):
            w = w * SCALE
            if noise:
                w = w + noise * w.std() * torch.randn(w.shape, generator=generator)
        state[name] = w
    model = Transformer(s)
    model.load_state_dict(state)
    return model.eval()


def prefill_logits(model: Transformer, tokens: list[int]) -> torch.Tensor:
    """Logits [T, V] of one prefill over `tokens` with a fresh cache (it overwrites the model's)."""
    model.setup_cache(1, len(tokens))
    with torch.inference_mode():
        return model(torch.tensor([tokens]), torch.arange(len(tokens)))[0].float()


def kv_cache(model: Transformer, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Copies of every layer's cached keys and values for positions 0..n-1: [1, KVH, n, D] each."""
    return [(layer.attention.kv_cache.k[:, :, :n].clone(), layer.attention.kv_cache.v[:, :, :n].clone())
            for layer in model.layers]


def chi_square_pvalue(counts: Counter, probs: dict, min_expected: float = 5.0) -> float:
    """Pearson's goodness of fit of `counts` (outcome -> count) to `probs` (outcome -> probability).

    Cells expected fewer than `min_expected` times are pooled into one (with outcomes of
    probability zero); if the pool is still below it, the next smallest cells join it.
    The p-value is the chi-square survival function, Q(df / 2, stat / 2).
    """
    n = sum(counts.values())
    cells = sorted(set(probs) | set(counts), key=lambda c: probs.get(c, 0.0))
    expected = [n * probs.get(c, 0.0) for c in cells]
    observed = [counts.get(c, 0) for c in cells]
    pool_e = pool_o = 0.0
    i = 0
    while i < len(cells) and (expected[i] < min_expected or 0 < pool_e < min_expected):
        pool_e, pool_o = pool_e + expected[i], pool_o + observed[i]
        i += 1
    bins = list(zip(expected[i:], observed[i:])) + ([(pool_e, pool_o)] if pool_e > 0 else [])
    if pool_e == 0 and pool_o > 0:
        return 0.0  # an impossible outcome was observed
    stat = sum((o - e) ** 2 / e for e, o in bins)
    df = len(bins) - 1
    if df < 1:
        raise ValueError("need at least two cells with enough expected counts")
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))

