"""Decoders: how tokens are produced from a loaded model."""
from __future__ import annotations

from runner.config.schema import Recipe
from runner.decoders.plain import PlainDecoder
from runner.decoders.sampling import Sampling

DECODERS = {"plain": PlainDecoder}


def sampling_of(recipe: Recipe) -> Sampling:
    g = recipe.generate
    return Sampling(temperature=g.temperature, top_k=g.top_k, top_p=g.top_p)


def build(recipe: Recipe, model) -> PlainDecoder:
    return DECODERS["plain"](model, sampling_of(recipe), cache_len=recipe.generate.cache_len)
