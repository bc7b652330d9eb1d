"""Decoders: how tokens are produced from a loaded model (plain, or speculative with a proposer)."""
from __future__ import annotations

import torch

from runner.config.schema import DraftKind, Recipe
from runner.decoders.base import Decoder, Forward, SlotDecoder
from runner.decoders.grammar import Grammar
from runner.decoders.plain import PlainDecoder
from runner.decoders.proposers import DraftModelProposer, NGramProposer
from runner.decoders.sampling import Sampling
from runner.decoders.speculative import SpeculativeDecoder

# draft.kind -> the decoder it selects
DECODERS = {DraftKind.none: PlainDecoder, DraftKind.model: SpeculativeDecoder, DraftKind.ngram: SpeculativeDecoder}


def sampling_of(recipe: Recipe) -> Sampling:
    g = recipe.generate
    return Sampling(temperature=g.temperature, top_k=g.top_k, top_p=g.top_p, min_p=g.min_p,
                    repetition_penalty=g.repetition_penalty, presence_penalty=g.presence_penalty,
                    frequency_penalty=g.frequency_penalty, logit_bias=tuple(sorted(g.logit_bias.items())))


def ngram_proposer(recipe: Recipe, vocab_size: int) -> NGramProposer:
    """The prompt-lookup proposer of a recipe with draft.kind ngram."""
    return NGramProposer(vocab_size, recipe.draft.ngram.max_n, recipe.draft.ngram.min_n)


__all__ = ["DECODERS", "Decoder", "Forward", "SlotDecoder", "build", "ngram_proposer", "sampling_of"]


def build(recipe: Recipe, model: torch.nn.Module, draft_model: torch.nn.Module | None = None,
          forward: Forward | None = None, draft_forward: Forward | None = None, grammar: Grammar | None = None) -> Decoder:
    """The decoder the recipe's draft section selects; draft_model is required for draft.kind: model.

    forward: what the decoder calls instead of model(tokens, input_pos), e.g. its compiled steps;
    draft_forward: the same for the draft model; grammar: generate.json_schema compiled.
    """
    sampling, draft = sampling_of(recipe), recipe.draft
    cache_len = recipe.generate.cache_len
    if draft.kind is DraftKind.none:
        return PlainDecoder(model, sampling, cache_len=cache_len, forward=forward, grammar=grammar)
    if draft.kind is DraftKind.model:
        proposer = DraftModelProposer(draft_model, sampling, draft_forward)  # top-k / top-p shape q as they shape p
    else:
        proposer = ngram_proposer(recipe, model.spec.vocab_size)
    return SpeculativeDecoder(model, proposer, sampling, draft.speculate_k, cache_len=cache_len, forward=forward,
                              grammar=grammar)
