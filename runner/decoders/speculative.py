"""Speculative decoding: a cheap proposer drafts k tokens, the target verifies them in one forward.

The accept/resample rule (Leviathan et al., Chen et al.) makes the output an exact draw from the
target's distribution whatever the proposer: draft token d ~ q is kept with probability
min(1, p(d) / q(d)); on the first rejection the token is drawn from normalize(max(p - q, 0)); when
all k are kept, a bonus token is drawn from the target's next distribution. Greedy is the limit
case where p and q are one-hot: a draft token is kept iff it is the target's argmax.

With a grammar (structured output) p at each verified position is the target's masked by the
grammar after the drafts before it; a draft the grammar forbids has p = 0 and is rejected, so the
output stays an exact draw from the masked target, whatever the proposer drafts.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

from runner.decoders.base import Constraint, Decoder, Forward, OnToken
from runner.decoders.grammar import Grammar
from runner.decoders.sampling import Sampling, logits_to_probs, sample
from runner.decoders.stats import Stats, peak_memory


def accept(p: torch.Tensor, q: torch.Tensor, token: int, u: float) -> bool:
    """Keep draft `token` (drawn from q [V]) under target p [V], given u ~ U[0, 1)."""
    # u * q < p  <=>  u < p / q, without dividing by a zero q.
    return bool(u * q[token] < p[token])


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The distribution to draw from after a rejection: normalize(max(p - q, 0)) over [V].

    A rejection has probability zero when p == q, so the residual is then never used; p itself
    is returned so that the function is total.
    """
    r = (p - q).clamp_min(0)
    total = r.sum()
    return r / total if total > 0 else p


def verify(drafted: list[int], q: torch.Tensor, p: torch.Tensor, generator: torch.Generator | None) -> list[int]:
    """The tokens one round produces: the kept prefix of `drafted` plus one token from the target.

    drafted: k draft tokens; q: [k, V] the proposer's distributions they were drawn from;
    p: [k + 1, V] the target's distributions at the same positions plus the next one.
    """
    out = []
    for i, token in enumerate(drafted):
        u = float(torch.rand((), generator=generator, device=p.device))
        if not accept(p[i], q[i], token, u):
            out.append(int(sample(residual(p[i], q[i]), generator)))
            return out
        out.append(token)
    out.append(int(sample(p[len(drafted)], generator)))  # every draft kept: the bonus token
    return out


def masked(logits: torch.Tensor, drafted: list[int], constraint: Constraint) -> tuple[torch.Tensor, int]:
    """logits [1 + k, V] of a verify forward, each position masked by the grammar after the drafts
    before it, and how many drafts the constraint accepted on the way (roll them back). Positions
    past a draft the grammar forbids are left as they are: verification rejects that draft first."""
    rows = [constraint.mask(logits[0])]
    for i, token in enumerate(drafted):
        try:
            constraint.accept(token)
        except ValueError:  # p(token) = 0 here
            return torch.cat([torch.stack(rows), logits[len(rows):]]), i
        rows.append(constraint.mask(logits[i + 1]))
    return torch.stack(rows), len(drafted)


class Proposer(Protocol):
    """Drafts up to k tokens continuing `sequence`, with the distributions q [n, V] they were drawn
    from (one-hot rows for a deterministic proposer)."""

    def propose(self, sequence: list[int], k: int, generator: torch.Generator | None) -> tuple[list[int], torch.Tensor]:
        ...

    def reset(self, cache_len: int) -> None:
        ...


@dataclass
class SpeculativeStats:
    speculate_k: int
    proposed: int = 0
    accepted: int = 0
    target_forwards: int = 0
    accepted_lengths: list[int] = field(default_factory=list)  # per round: how many drafts were kept

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else float("nan")

    def histogram(self) -> list[int]:
        counts = [0] * (self.speculate_k + 1)
        for n in self.accepted_lengths:
            counts[n] += 1
        return counts


class SpeculativeDecoder(Decoder):
    """Draft with a Proposer, verify with the target model over its static KV cache.

    Each call prefills its whole prompt (reuses_cache is False): the proposer's own cache would
    have to follow the target's.
    """

    def __init__(self, model: torch.nn.Module, proposer: Proposer, sampling: Sampling, speculate_k: int,
                 cache_len: int | None = None, forward: Forward | None = None, grammar: Grammar | None = None):
        self.model = model
        self.grammar = grammar
        self.forward = forward or model
        self.proposer = proposer
        self.sampling = sampling
        self.speculate_k = speculate_k
        self.lookahead = speculate_k  # the verify forward writes k + 1 positions past the accepted ones
        self.cache_len = cache_len
        self.device = next(model.parameters()).device

    def generate(
        self,
        prompt: list[int],
        max_new_tokens: int,
        eos_ids: frozenset[int] = frozenset(),
        generator: torch.Generator | None = None,
        on_token: OnToken | None = None,
        cached: int = 0,
    ) -> tuple[list[int], Stats]:
        """New tokens (ending with EOS if drawn) and statistics, exactly distributed as plain
        decoding's. `cached` is ignored: the whole prompt is prefilled."""
        cache_len = self._cache_for(len(prompt), max_new_tokens)
        if self.model.cache_len != cache_len:
            self.model.setup_cache(1, cache_len)
        self.proposer.reset(cache_len)
        spec = SpeculativeStats(self.speculate_k)

        sequence, out = list(prompt), []
        constraint = None if self.grammar is None else self.grammar.matcher()
        start = time.perf_counter()
        first = None
        with torch.inference_mode():
            # Prefill all but the last prompt token: each round feeds the pending token plus the drafts.
            if len(prompt) > 1:
                self.forward(torch.tensor([prompt[:-1]], device=self.device), torch.arange(len(prompt) - 1, device=self.device),
                             last_only=True)  # only the cache matters
            while len(out) < max_new_tokens:
                room = cache_len - len(sequence)  # positions left in the cache after the pending token
                k = max(0, min(self.speculate_k, max_new_tokens - len(out) - 1, room))
                drafted, q = self.proposer.propose(sequence, k, generator) if k else ([], None)
                pending = len(sequence) - 1
                tokens = torch.tensor([sequence[-1:] + drafted], device=self.device)  # [1, 1 + k]
                positions = torch.arange(pending, pending + 1 + len(drafted), device=self.device)
                logits = self.forward(tokens, positions)[0]  # [1 + k, V]
                walked = 0
                if constraint is not None:
                    logits, walked = masked(logits, drafted, constraint)
                p = logits_to_probs(logits, self.sampling)
                spec.target_forwards += 1
                new = verify(drafted, q.to(p.device), p, generator) if drafted else [int(sample(p[0], generator))]
                if constraint is not None:  # back to the round's start, then through what it produced
                    constraint.rollback(walked)
                    for token in new:
                        constraint.accept(token)
                appended, stop = 0, False
                for token in new:
                    appended += 1
                    out.append(token)
                    sequence.append(token)
                    if first is None:
                        first = time.perf_counter()
                    stop = on_token is not None and bool(on_token(token))
                    if stop or token in eos_ids or len(out) == max_new_tokens:
                        break
                if drafted:  # count only the kept drafts that were output (EOS or the budget may cut a round)
                    spec.proposed += len(drafted)
                    spec.accepted += min(len(new) - 1, appended)
                    spec.accepted_lengths.append(min(len(new) - 1, appended))
                if stop or out[-1] in eos_ids:
                    break
        end = time.perf_counter()
        stats = Stats(
            prompt_tokens=len(prompt), new_tokens=len(out), time_to_first_token=(first or end) - start,
            decode_seconds=end - (first or end), peak_memory_bytes=peak_memory(self.device), speculative=spec,
        )
        return out, stats
