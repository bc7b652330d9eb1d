"""SpeculativeDecoder with sampling draws from the target's distribution; verify, statistics, self-drafting.

The distribution check: over N seeded runs, the first two tokens (as pairs) are tested against the
exact law of plain sampling, p(t1) * p(t2 | t1), computed from the target's logits by this file's
own float64 temperature / top-k / top-p (not runner's, so a bug there cannot hide in the law),
by a chi-square goodness-of-fit test at ALPHA. The runs are seeded 0..N-1, so the outcome is fixed;
ALPHA is the chance a correct decoder would have failed for an arbitrary choice of seeds.
"""
import math
from collections import Counter
from functools import lru_cache
from typing import NamedTuple

import pytest
import torch

from runner.decoders import speculative
from runner.decoders.plain import PlainDecoder
from runner.decoders.proposers import DraftModelProposer
from runner.decoders.sampling import Sampling
from runner.decoders.speculative import SpeculativeDecoder, SpeculativeStats, verify
from tests.decoders.tiny import chi_square_pvalue, prefill_logits, tiny

V = 12
PROMPT = [5, 2]
RUNS = 2000
ALPHA = 1e-3
NEW_TOKENS = 3


class Case(NamedTuple):
    target_seed: int
    draft_seed: int
    sampling: Sampling
    draft_sampling: Sampling
    speculate_k: int  # the first round drafts min(speculate_k, NEW_TOKENS - 1)

    @property
    def first_round_drafts(self) -> int:
        return min(self.speculate_k, NEW_TOKENS - 1)


# With two drafts in the first round both tokens may come from verify's accept/resample; with one,
# the second may be the bonus token. The draft's top-k leaves q = 0 where the target has mass, and
# the target's top-k/top-p leave p = 0 where the draft has mass.
CASES = {
    "temperature-1": Case(3, 4, Sampling(temperature=1.0), Sampling(temperature=1.0), speculate_k=4),
    "top-k-top-p": Case(1, 2, Sampling(temperature=1.0, top_k=6, top_p=0.9), Sampling(temperature=1.0, top_k=3),
                        speculate_k=1),
}



def models(case: str):
    c = CASES[case]
    return tiny("target-1layer", V, c.target_seed), tiny("draft", V, c.draft_seed), c.sampling, c.draft_sampling


def sampling_law(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """What sampling draws from, for logits [V], in float64: softmax(logits / temperature) over the
    top_k largest logits (ties with the k-th kept), then over the fewest most probable tokens whose
    mass reaches top_p (a token stays while the mass before it is below top_p)."""
    assert not sampling.greedy
    x = logits.double() / sampling.temperature
    if sampling.top_k is not None:
        kth = sorted(x.tolist(), reverse=True)[min(sampling.top_k, len(x)) - 1]
        x = torch.where(x >= kth, x, -math.inf)
    p = torch.exp(x - x.max())
    p = p / p.sum()
    if sampling.top_p < 1.0:
        keep, before = torch.zeros(len(p), dtype=torch.bool), 0.0
        for i in sorted(range(len(p)), key=lambda i: -p[i].item()):
            keep[i] = before < sampling.top_p
            before += p[i].item()
        p = torch.where(keep, p, 0.0)
        p = p / p.sum()
    return p


def next_probs(model, tokens: list[int], sampling: Sampling) -> torch.Tensor:
    return sampling_law(prefill_logits(model, tokens)[-1], sampling)  # [V]


def exact_pairs(model, sampling: Sampling) -> dict[tuple[int, int], float]:
    """Plain sampling's law of the first two tokens after PROMPT: p(a) * p(b | a)."""
    p1 = next_probs(model, PROMPT, sampling)
    law = {}
    for a in p1.nonzero().flatten().tolist():
        p2 = next_probs(model, PROMPT + [a], sampling)
        for b in p2.nonzero().flatten().tolist():
            law[(a, b)] = p1[a].item() * p2[b].item()
    return law


def sample_pairs(decoder, runs: int = RUNS) -> tuple[Counter, Counter]:
    """The first two tokens of `runs` seeded generations, and (for a speculative decoder) how many of
    the first round's drafts were kept."""
    pairs, first_round = Counter(), Counter()
    for seed in range(runs):
        out, stats = decoder.generate(PROMPT, NEW_TOKENS, generator=torch.Generator().manual_seed(seed))
        pairs[tuple(out[:2])] += 1
        if stats.speculative is not None:
            first_round[stats.speculative.accepted_lengths[0]] += 1
    return pairs, first_round


def speculative_decoder(case: str) -> SpeculativeDecoder:
    target, draft, target_sampling, draft_sampling = models(case)
    return SpeculativeDecoder(target, DraftModelProposer(draft, draft_sampling), target_sampling,
                              CASES[case].speculate_k)


@lru_cache(maxsize=None)
def exact(case: str) -> dict:
    target, _, sampling, _ = models(case)
    return exact_pairs(target, sampling)


def test_chi_square_pvalue_matches_the_closed_form_and_pools_small_cells():
    law = {c: 0.25 for c in "abcd"}
    counts = Counter(a=30, b=20, c=25, d=25)  # stat = (25 + 25) / 25 = 2, df = 3
    x = 1.0  # stat / 2; the survival function is Q(3/2, x) = erfc(sqrt(x)) + 2 sqrt(x / pi) exp(-x)
    closed_form = math.erfc(math.sqrt(x)) + 2 * math.sqrt(x / math.pi) * math.exp(-x)
    assert chi_square_pvalue(counts, law) == pytest.approx(closed_form)
    # Cells expected < 5 times are pooled, with impossible outcomes (the tests check those apart).
    law = {"a": 0.5, "b": 0.49, "c": 0.006, "d": 0.004}  # of 1000: c and d pool to 10
    assert chi_square_pvalue(Counter(a=500, b=490, c=6, d=4), law) == pytest.approx(1.0)
    assert chi_square_pvalue(Counter(a=500, b=490, c=3, e=7), law) == pytest.approx(1.0)
    assert chi_square_pvalue(Counter(a=500, b=490, c=0, d=10), law) == pytest.approx(1.0)
    assert chi_square_pvalue(Counter(a=400, b=590, c=6, d=4), law) < ALPHA
    assert chi_square_pvalue(Counter(a=1000, z=1), {"a": 0.5, "b": 0.5}) == 0.0


@pytest.mark.parametrize("case", CASES)
def test_plain_sampling_passes_the_check(case):
    """A control: the decoder the rule must match passes the same test against the computed law."""
    target, _, sampling, _ = models(case)
    pairs, _ = sample_pairs(PlainDecoder(target, sampling))
    law = exact(case)
    assert set(pairs) <= set(law)
    assert chi_square_pvalue(pairs, law) > ALPHA


@pytest.mark.parametrize("case", CASES)
def test_speculative_sampling_draws_the_first_two_tokens_from_the_target(case):
    pairs, first_round = sample_pairs(speculative_decoder(case))
    law = exact(case)
    assert set(pairs) <= set(law)  # nothing the target rules out
    assert chi_square_pvalue(pairs, law) > ALPHA
    # Not vacuous: every number of kept drafts happened, all of them (then the bonus token) included.
    assert sorted(first_round) == list(range(CASES[case].first_round_drafts + 1))
    assert min(first_round.values()) >= 50, first_round


def test_the_check_rejects_resampling_from_p_after_a_rejection(monkeypatch):
    """Drawing from p instead of normalize(max(p - q, 0)) over-weights what the draft proposes."""
    target, draft, sampling, draft_sampling = models("temperature-1")
    p, q = next_probs(target, PROMPT, sampling), next_probs(draft, PROMPT, draft_sampling)
    biased = torch.minimum(p, q) + (1 - torch.minimum(p, q).sum()) * p  # the first token's law when broken
    assert RUNS * ((biased - p) ** 2 / p).sum() > 100  # chi-square's noncentrality on one token alone

    monkeypatch.setattr(speculative, "residual", lambda p, q: p)
    pairs, _ = sample_pairs(speculative_decoder("temperature-1"))
    assert chi_square_pvalue(pairs, exact("temperature-1")) < ALPHA


# --- verify with one-hot (greedy) distributions -----------------------------------------------

def one_hot(tokens: list[int]) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(tokens), V).float()  # [n, V]


def test_verify_keeps_drafts_up_to_the_first_mismatch_then_takes_the_target_token():
    drafted = [3, 4, 5]
    assert verify(drafted, one_hot(drafted), one_hot([3, 4, 5, 6]), None) == [3, 4, 5, 6]  # bonus token
    assert verify(drafted, one_hot(drafted), one_hot([3, 9, 5, 6]), None) == [3, 9]
    assert verify(drafted, one_hot(drafted), one_hot([7, 4, 5, 6]), None) == [7]


def test_verify_never_keeps_a_token_the_target_rules_out():
    p = torch.tensor([[0.0, 0.5, 0.5] + [0.0] * (V - 3), [1.0] + [0.0] * (V - 1)])  # [2, V]
    for seed in range(20):
        assert verify([0], one_hot([0]), p, torch.Generator().manual_seed(seed))[0] in (1, 2)


# --- statistics ------------------------------------------------------------------------------

def test_stats_histogram_and_rate():
    stats = SpeculativeStats(speculate_k=3, proposed=9, accepted=4, accepted_lengths=[0, 3, 1])
    assert stats.histogram() == [1, 1, 0, 1]
    assert stats.acceptance_rate == pytest.approx(4 / 9)
    assert math.isnan(SpeculativeStats(speculate_k=3).acceptance_rate)


@pytest.mark.parametrize("sampling", [Sampling(temperature=0), Sampling(temperature=1.0)], ids=["greedy", "sampled"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_self_drafting_keeps_every_draft(sampling, k):
    """A draft with the target's weights proposes from the target's own distribution: p == q, so
    every draft is kept and each round yields k + 1 tokens (fewer in the last)."""
    target, copy = tiny("target", V, 0), tiny("target", V, 0, instance=1)
    n = 20
    out, stats = SpeculativeDecoder(target, DraftModelProposer(copy, sampling), sampling, k).generate(
        [1, 2, 3], n, generator=torch.Generator().manual_seed(0))
    spec = stats.speculative
    assert len(out) == n
    assert spec.acceptance_rate == 1.0
    assert spec.target_forwards == math.ceil(n / (k + 1))
    if sampling.greedy:
        assert out == PlainDecoder(target, sampling).generate([1, 2, 3], n)[0]
