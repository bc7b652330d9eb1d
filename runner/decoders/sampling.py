"""Turning logits into the next token: temperature, top-k, top-p, seeded sampling."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def logits_to_probs(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """The distribution sampling draws from: [..., V] logits -> [..., V] fp32 probabilities.

    Greedy is the limit case: all mass on the argmax (the first one, on ties).
    """
    logits = logits.float()
    if sampling.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is < top_p.
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= sampling.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one index per row of probs [..., V] -> [...].

    argmax(p / E) with E ~ Exp(1) is an exact draw from p (the exponential race), and unlike
    torch.multinomial it never waits for the device.
    """
    if probs.device.type == "cpu":
        # Only the tokens that can win race: top-k leaves tens of a vocabulary's 50k, and torch's
        # CPU exponential_ costs about 20 ns a draw (1 ms a token for SmolLM2's vocabulary).
        flat = probs.reshape(-1, probs.shape[-1])
        rows, cols = (flat > 0).nonzero(as_tuple=True)
        if len(rows) * 8 <= flat.numel():
            race = torch.empty(len(rows), dtype=probs.dtype).exponential_(1, generator=generator)
            scores = torch.zeros_like(flat).index_put_((rows, cols), flat[rows, cols] / race)
            return scores.argmax(-1).reshape(probs.shape[:-1])
    race = torch.empty_like(probs).exponential_(1, generator=generator)
    # A race time of exactly 0 would make 0/0 = nan for a zero-probability token, which argmax picks.
    return torch.where(probs > 0, probs / race, 0.0).argmax(-1)


TIES_SEEN = 16  # logits past the k-th that top-k sampling looks at for ties with it


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token for logits [..., V]."""
    if sampling.greedy:
        # The first maximum, as argmax; torch's bf16 argmax on the CPU is a scalar loop (176 us for
        # SmolLM2's 49152 logits, max 44).
        return logits.max(-1).indices
    if logits.device.type == "cpu" and sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        token = _top_k_race(logits, sampling, generator)
        if token is not None:
            return token
    return sample(logits_to_probs(logits, sampling), generator)


def _top_k_race(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor | None:
    """sample(logits_to_probs(logits)) for top-k, over the candidates only: the same
    distribution, and the same race (one exponential per candidate left, in vocabulary order), so
    the same token for the same generator. Masking, softmax and top-p over the whole vocabulary
    took 0.3 ms of a SmolLM2 step. The candidates are every logit >= the k-th largest, as the mask
    keeps them: bf16 logits often tie there. None where more ties than TIES_SEEN do."""
    k, vocab = sampling.top_k, logits.shape[-1]
    flat = logits.reshape(-1, vocab).float() / sampling.temperature  # [R, V]
    seen = min(vocab, k + TIES_SEEN)
    values, index = torch.topk(flat, seen, dim=-1)  # [R, seen], largest first
    kth = values[:, k - 1:k]
    if seen < vocab and (values[:, -1:] >= kth).any():
        return None
    probs = torch.softmax(values.masked_fill(values < kth, float("-inf")), dim=-1)
    if sampling.top_p < 1.0:  # as logits_to_probs: a token stays if the mass before it is < top_p
        probs = probs.masked_fill((probs.cumsum(-1) - probs) >= sampling.top_p, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    order = index.argsort(-1)
    index, probs = index.gather(-1, order), probs.gather(-1, order)
    rows, cols = (probs > 0).nonzero(as_tuple=True)
    race = torch.empty(len(rows), dtype=probs.dtype).exponential_(1, generator=generator)
    scores = torch.zeros_like(probs).index_put_((rows, cols), probs[rows, cols] / race)
    return index.gather(-1, scores.argmax(-1, keepdim=True)).reshape(logits.shape[:-1])
