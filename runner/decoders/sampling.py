"""Turning logits into the next token: penalties and biases, temperature, top-k, top-p, min-p,
seeded sampling.

The controls that depend on the text so far (repetition, presence and frequency penalties, logit
biases) change the logits first (adjust); the rest shape the distribution drawn from, in HF
transformers' order: temperature, top-k, top-p, then min-p.

Every draw is an exponential race: an Exp(1) time per token (on the CPU, where few tokens can
win, only per token of nonzero probability), drawn in vocabulary order, and the token with the
largest probability / time wins. On the CPU, top-k's probabilities are computed over its
candidates only, by one function whichever path asks, so next_token and
sample(logits_to_probs(...)) draw the same token for the same generator.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


GREEDY_BELOW = 1e-5  # temperatures below it are greedy


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None
    top_p: float = 1.0
    min_p: float = 0.0  # 0: none; else tokens below min_p times the likeliest one's probability drop
    # HF's: a logit of a token in the prompt or the text so far is divided by it (multiplied where
    # negative); 1: none.
    repetition_penalty: float = 1.0
    # OpenAI's, over the generated tokens: each token's logit less presence_penalty if it occurs
    # and frequency_penalty times its count.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token, bias) added to its logit

    @property
    def greedy(self) -> bool:
        # Below GREEDY_BELOW a draw is the argmax anyway, and dividing by it overflows fp32
        # (inf - inf: NaN probabilities); vLLM draws the same line.
        return self.temperature < GREEDY_BELOW

    @property
    def adjusts(self) -> bool:
        """Whether the logits depend on the text so far or on biases (adjust has work to do)."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or bool(self.logit_bias))


def adjust(logits: torch.Tensor, sampling: Sampling, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """logits [V] of the next token after `prompt` + `generated`, penalised and biased as
    `sampling` says (a new fp32 tensor; `logits` itself is left alone)."""
    logits = logits.float().clone()
    if sampling.repetition_penalty != 1.0:
        seen = torch.tensor(prompt + generated, dtype=torch.long, device=logits.device).unique()
        score = logits[seen]
        logits[seen] = torch.where(score < 0, score * sampling.repetition_penalty, score / sampling.repetition_penalty)
    if (sampling.presence_penalty or sampling.frequency_penalty) and generated:
        counts = torch.bincount(torch.tensor(generated, dtype=torch.long), minlength=logits.shape[-1])
        counts = counts[:logits.shape[-1]].to(logits.device, torch.float32)
        logits -= counts * sampling.frequency_penalty + (counts > 0).float() * sampling.presence_penalty
    if sampling.logit_bias:
        tokens, biases = zip(*sampling.logit_bias)
        index = torch.tensor(tokens, dtype=torch.long, device=logits.device)
        logits.index_add_(0, index, torch.tensor(biases, dtype=torch.float32, device=logits.device))
    return logits


def logits_to_probs(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """The distribution sampling draws from: [..., V] logits -> [..., V] fp32 probabilities.

    Greedy is the limit case: all mass on the argmax (the first one, on ties).
    """
    logits = logits.float()
    if sampling.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / sampling.temperature
    vocab = logits.shape[-1]
    if sampling.top_k is not None and sampling.top_k < vocab:
        if logits.device.type == "cpu":
            flat = logits.reshape(-1, vocab)
            index, probs = _top_k_candidates(flat, sampling)
            return torch.zeros_like(flat).scatter_(-1, index, probs).reshape(logits.shape)
        # On an accelerator, counting the candidates would wait for the device: mask instead.
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return _min_p(_top_p(torch.softmax(logits, dim=-1), sampling.top_p), sampling.min_p)


def _top_p(probs: torch.Tensor, top_p: float, largest_first: bool = False) -> torch.Tensor:
    """probs [..., C] with the smallest prefix of the largest whose mass reaches top_p kept
    (a token stays if the mass before it is < top_p); largest_first: probs are sorted so."""
    if top_p >= 1.0:
        return probs
    if largest_first:
        drop = (probs.cumsum(-1) - probs) >= top_p
    else:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
    probs = probs.masked_fill(drop, 0.0)
    return probs / probs.sum(-1, keepdim=True)


def _min_p(probs: torch.Tensor, min_p: float) -> torch.Tensor:
    """probs [..., C] less the tokens below min_p times the row's largest, renormalised."""
    if min_p <= 0.0:
        return probs
    probs = probs.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), 0.0)
    return probs / probs.sum(-1, keepdim=True)


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one index per row of probs [..., V] -> [...].

    argmax(p / E) with E ~ Exp(1) is an exact draw from p (the exponential race), and unlike
    torch.multinomial it never waits for the device.
    """
    if probs.device.type == "cpu":
        return _race(probs.reshape(-1, probs.shape[-1]), generator).reshape(probs.shape[:-1])
    # One time per entry, zeros included: counting the nonzero ones would wait for the device.
    race = torch.empty_like(probs).exponential_(1, generator=generator)
    # A race time of exactly 0 would make 0/0 = nan for a zero-probability token, which argmax picks.
    return torch.where(probs > 0, probs / race, 0.0).argmax(-1)


def _race(probs: torch.Tensor, generator: torch.Generator | None, index: torch.Tensor | None = None,
          vocab: int | None = None) -> torch.Tensor:
    """The race on the CPU over probs [R, C] -> [R] winning columns. `index` [R, C]: the token
    each column is (top-k's candidates, in vocabulary order) out of `vocab`; None: the columns
    are the vocabulary. Where few tokens can win, only they get times, row by row in vocabulary
    order (torch's CPU exponential_ is slow, and top-k leaves tens of tens of thousands); else
    every token of the vocabulary gets one. Both depend only on the distribution, so a
    candidate race and a whole-vocabulary race draw alike."""
    rows, cols = (probs > 0).nonzero(as_tuple=True)
    vocab = probs.shape[-1] if index is None else vocab
    if len(rows) * 8 <= probs.shape[0] * vocab:
        race = torch.empty(len(rows), dtype=probs.dtype).exponential_(1, generator=generator)
        return torch.zeros_like(probs).index_put_((rows, cols), probs[rows, cols] / race).argmax(-1)
    race = torch.empty(probs.shape[0], vocab, dtype=probs.dtype).exponential_(1, generator=generator)
    if index is not None:
        race = race.gather(-1, index)
    # A race time of exactly 0 would make 0/0 = nan for a zero-probability token, which argmax picks.
    return torch.where(probs > 0, probs / race, 0.0).argmax(-1)


TIES_SEEN = 16  # logits past the k-th that top-k looks at first for ties with it


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token for logits [..., V]: the draw sample(logits_to_probs(logits)) makes."""
    if sampling.greedy:
        # The first maximum, as argmax; torch's bf16 argmax on the CPU is a scalar loop.
        return logits.max(-1).indices
    vocab = logits.shape[-1]
    if logits.device.type == "cpu" and sampling.top_k is not None and sampling.top_k < vocab:
        # The candidates and race of logits_to_probs + sample, without scattering them into
        # the whole vocabulary and finding them there again: a large part of a small model's step.
        index, probs = _top_k_candidates(logits.reshape(-1, vocab).float() / sampling.temperature, sampling)
        return index.gather(-1, _race(probs, generator, index, vocab)[:, None]).reshape(logits.shape[:-1])
    return sample(logits_to_probs(logits, sampling), generator)


def _top_k_candidates(logits: torch.Tensor, sampling: Sampling) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (then top-p) over tempered logits [R, V]: the candidates' token ids [R, C] in
    vocabulary order and their probabilities [R, C]. The candidates are every logit >= the k-th
    largest (bf16 logits often tie there); a row with fewer than C of them is padded with other
    tokens at probability 0."""
    k, vocab = sampling.top_k, logits.shape[-1]
    seen = min(vocab, k + TIES_SEEN)
    values, index = torch.topk(logits, seen, dim=-1)  # [R, seen], largest first
    kth = values[:, k - 1:k]
    count = int((values >= kth).sum(-1).max())  # the most candidates a row has
    if count == seen < vocab:  # ties may run past what was seen: take them all
        count = int((logits >= kth).sum(-1).max())
        values, index = torch.topk(logits, count, dim=-1)
    values, index = values[:, :count], index[:, :count]
    probs = torch.softmax(values.masked_fill(values < kth, float("-inf")), dim=-1)
    probs = _min_p(_top_p(probs, sampling.top_p, largest_first=True), sampling.min_p)
    index, order = index.sort(-1)  # vocabulary order: the order of the race's times
    return index, probs.gather(-1, order)
