"""Speculative decoding keeps plain decoding's output: token for token in greedy mode, and by the
accept/resample rule leaving exactly the target's distribution at every position; the KV caches it
leaves behind are the ones a plain prefill over the kept tokens computes."""
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from runner.decoders.plain import PlainDecoder
from runner.decoders.proposers import DraftModelProposer, NGramProposer
from runner.decoders.sampling import Sampling
from runner.decoders.speculative import SpeculativeDecoder, accept, residual
from tests.decoders.tiny import kv_cache, prefill_logits, tiny

PROPERTY = settings(max_examples=50, deadline=None)
V = 16
GREEDY = Sampling(temperature=0)
SAMPLED = Sampling(temperature=1.0)
prompts = st.lists(st.integers(0, V - 1), min_size=1, max_size=12)



@st.composite
def target_and_draft(draw):
    """A 2-layer target and a draft: an independent 1-layer model (nearly always rejected), the
    target with noisy weights (partly accepted), or a copy of the target (always accepted)."""
    seed = draw(st.integers(0, 3), label="target seed")
    kind = draw(st.sampled_from(["small", "noisy", "copy"]), label="draft")
    if kind == "small":
        draft = tiny("draft", V, draw(st.integers(0, 3), label="draft seed"))
    elif kind == "noisy":
        draft = tiny("target", V, seed, noise=draw(st.sampled_from([0.05, 0.15]), label="noise"))
    else:
        draft = tiny("target", V, seed, instance=1)
    return tiny("target", V, seed), draft


def assume_clear_argmaxes(model, prompt: list[int], out: list[int]) -> None:
    """Skip examples where an argmax along `out` is a near tie, which fp32 rounding may break
    differently in a batched verify than in a one-token step; `out` must be the argmax path."""
    logits = prefill_logits(model, prompt + out[:-1])[len(prompt) - 1:]  # [len(out), V]
    top2 = logits.topk(2, dim=-1).values
    assume(bool(((top2[:, 0] - top2[:, 1]) >= 1e-4 * max(1.0, logits.abs().max().item())).all()))
    assert logits.argmax(-1).tolist() == out


def stops(plain: list[int], eos_ids: frozenset[int]) -> list[int]:
    """Plain output cut after its first EOS token."""
    for i, token in enumerate(plain):
        if token in eos_ids:
            return plain[:i + 1]
    return plain


class CountingProposer:
    """Wraps a proposer and records how many tokens each call drafted (k may be cut near the end),
    and per run (each generate resets it) where each call's sequence stood and what it drafted."""

    def __init__(self, inner):
        self.inner, self.drafted, self.runs = inner, [], []

    def reset(self, cache_len: int) -> None:
        self.inner.reset(cache_len)
        self.runs.append([])

    def propose(self, sequence, k, generator):
        drafted, q = self.inner.propose(sequence, k, generator)
        assert len(drafted) <= k and q.shape == (len(drafted), V)
        self.drafted.append(len(drafted))
        self.runs[-1].append((len(sequence), list(drafted)))
        return drafted, q

    def rounds(self, accepted_lengths: list[int]) -> list[tuple[int, int]]:
        """(kept, drafted) for every round that verified drafts, given the runs' accepted lengths."""
        drafted = [d for d in self.drafted if d]
        assert len(drafted) == len(accepted_lengths)
        return list(zip(accepted_lengths, drafted))


def check_greedy_equivalence(target, proposer, prompt, k, n, tight, data) -> list[tuple[int, int]]:
    """Speculative greedy == plain greedy, without and with EOS; returns both runs' (kept, drafted) rounds."""
    proposer = CountingProposer(proposer)
    plain, _ = PlainDecoder(target, GREEDY).generate(prompt, n)
    assume_clear_argmaxes(target, prompt, plain)
    decoder = SpeculativeDecoder(target, proposer, GREEDY, k, cache_len=len(prompt) + n if tight else None)

    out, stats = decoder.generate(prompt, n)
    assert out == plain
    assert stats.new_tokens == n

    # EOS ids: one token the plain output holds (so the run stops there), maybe others.
    eos_ids = frozenset({data.draw(st.sampled_from(plain), label="eos")}
                        | data.draw(st.sets(st.integers(0, V - 1), max_size=2), label="more eos"))
    expected = stops(plain, eos_ids)
    assert PlainDecoder(target, GREEDY).generate(prompt, n, eos_ids)[0] == expected
    out_eos, stats_eos = decoder.generate(prompt, n, eos_ids)
    assert out_eos == expected
    return proposer.rounds(stats.speculative.accepted_lengths + stats_eos.speculative.accepted_lengths)


def test_greedy_with_a_draft_model_equals_plain_greedy():
    rounds = []

    @PROPERTY
    @given(pair=target_and_draft(), prompt=prompts, k=st.integers(1, 8), n=st.integers(1, 24),
           tight=st.booleans(), data=st.data())
    def check(pair, prompt, k, n, tight, data):
        target, draft = pair
        rounds.extend(check_greedy_equivalence(target, DraftModelProposer(draft, GREEDY), prompt, k, n, tight, data))

    check()
    # Not vacuous: rounds that kept none, some and all of several drafts were all verified.
    assert any(kept == 0 for kept, drafted in rounds)
    assert any(0 < kept < drafted for kept, drafted in rounds)
    assert any(kept == drafted > 1 for kept, drafted in rounds)


@st.composite
def repetitive_prompts(draw):
    """A motif repeated, then a few tokens: the n-gram lookup finds matches in the prompt."""
    motif = draw(st.lists(st.integers(0, V - 1), min_size=1, max_size=5), label="motif")
    tail = draw(st.lists(st.integers(0, V - 1), max_size=3), label="tail")
    return motif * draw(st.integers(1, 4), label="repeats") + tail


def test_greedy_with_ngram_lookup_equals_plain_greedy():
    rounds = []

    @PROPERTY
    @given(seed=st.integers(0, 3), prompt=repetitive_prompts(), k=st.integers(1, 8), n=st.integers(1, 24),
           max_n=st.integers(1, 4), tight=st.booleans(), data=st.data())
    def check(seed, prompt, k, n, max_n, tight, data):
        proposer = NGramProposer(V, max_n=max_n, min_n=1)
        rounds.extend(check_greedy_equivalence(tiny("target", V, seed), proposer, prompt, k, n, tight, data))

    check()
    # Not vacuous: n-gram drafts were kept, so verify's accept path ran, and some were rejected.
    assert any(kept > 0 for kept, drafted in rounds)
    assert any(kept < drafted for kept, drafted in rounds)


# --- the single-position rule, exactly ---------------------------------------------------------

BELOW_ONE = math.nextafter(1.0, 0.0)  # the largest u ~ U[0, 1) can be


def acceptance_probability(p: torch.Tensor, q: torch.Tensor, token: int) -> float:
    """P(accept keeps `token`) over u ~ U[0, 1): the length of the u interval it accepts.

    The rule must be a threshold in u (keep for small u, reject for large): checked on a grid,
    then the threshold is found by bisection.
    """
    grid = [i / 64 for i in range(64)] + [BELOW_ONE]
    kept = [accept(p, q, token, u) for u in grid]
    assert kept == sorted(kept, reverse=True), "accept is not a threshold in u"
    if not kept[0]:
        return 0.0
    if kept[-1]:
        return 1.0
    lo, hi = 0.0, BELOW_ONE  # accept(lo) and not accept(hi)
    for _ in range(80):
        mid = (lo + hi) / 2
        if accept(p, q, token, mid):
            lo = mid
        else:
            hi = mid
    return hi


@st.composite
def distributions(draw, vocab: int) -> torch.Tensor:
    """[vocab] probabilities: random with zeros, or one-hot (greedy's case)."""
    if draw(st.booleans(), label="one-hot"):
        return torch.nn.functional.one_hot(torch.tensor(draw(st.integers(0, vocab - 1))), vocab).double()
    weights = draw(st.lists(st.sampled_from([0.0, 0.0, 0.05, 0.3, 1.0, 2.0, 7.0]), min_size=vocab, max_size=vocab)
                   .filter(lambda w: sum(w) > 0))
    w = torch.tensor(weights, dtype=torch.float64)
    return w / w.sum()


@st.composite
def target_and_proposal(draw):
    """(p, q) over 2..6 tokens, in float32 (as decoding runs) or float64; q may equal p."""
    vocab = draw(st.integers(2, 6), label="vocab")
    p = draw(distributions(vocab), label="p")
    q = p.clone() if draw(st.booleans(), label="q == p") else draw(distributions(vocab), label="q")
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    return p.to(dtype), q.to(dtype)


@PROPERTY
@given(pq=target_and_proposal())
def test_accept_then_residual_yields_exactly_p(pq):
    """Draw d ~ q, keep it when accept(u) for u ~ U[0, 1), else draw from residual(p, q): the
    output's distribution, summed over every draft and decision, is p."""
    p, q = pq
    r = residual(p, q).double()
    out = torch.zeros(len(p), dtype=torch.float64)
    rejected = 0.0
    for d in range(len(p)):
        if q[d] == 0:
            continue  # never drafted
        a = acceptance_probability(p, q, d)
        assert a == pytest.approx(min(1.0, p[d].item() / q[d].item()), abs=1e-6)
        out[d] += q[d].item() * a
        out += q[d].item() * (1 - a) * r
        rejected += q[d].item() * (1 - a)
    if rejected > 1e-6:  # the residual is used: it must be a distribution
        assert (r >= 0).all() and r.sum().item() == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(out, p.double(), rtol=0, atol=1e-6)


# --- the caches after a run ---------------------------------------------------------------------

def assert_same_cache(got: list, want: list) -> None:
    """Equal up to fp32 rounding: 1e-5 relative to each tensor's largest entry (keys and values reach
    about 8 with these weights; a stale entry from a rejected draft is off by units)."""
    for pair_got, pair_want in zip(got, want, strict=True):
        for g, w in zip(pair_got, pair_want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * max(1.0, w.abs().max().item()))


def test_caches_after_a_run_equal_a_plain_prefill():
    """The target's cache holds K/V for prompt + out[:-1] (the last token was never fed), the draft's
    for DraftModelProposer.cached; both equal what one prefill over those tokens computes, so the
    positions written by rejected drafts were all overwritten."""
    partial = []

    @PROPERTY
    @given(seed=st.integers(0, 3), draft_seed=st.integers(0, 3), noisy=st.booleans(), prompt=prompts,
           k=st.integers(1, 8), n=st.integers(1, 24), sampling=st.sampled_from([GREEDY, SAMPLED]),
           generator_seed=st.integers(0, 2**32 - 1))
    def check(seed, draft_seed, noisy, prompt, k, n, sampling, generator_seed):
        target = tiny("target", V, seed)
        draft = tiny("target", V, seed, noise=0.05) if noisy else tiny("draft", V, draft_seed)
        proposer = DraftModelProposer(draft, sampling)
        counting = CountingProposer(proposer)
        out, stats = SpeculativeDecoder(target, counting, sampling, k).generate(
            prompt, n, generator=torch.Generator().manual_seed(generator_seed))
        partial.extend(0 < kept < drafted for kept, drafted in counting.rounds(stats.speculative.accepted_lengths))

        fed = prompt + out[:-1]
        target_kv, held = kv_cache(target, len(fed)), list(proposer.cached)
        draft_kv = kv_cache(draft, len(held))
        prefill_logits(target, fed)
        assert_same_cache(target_kv, kv_cache(target, len(fed)))
        if held:  # empty when nothing was ever drafted (n == 1)
            prefill_logits(draft, held)
            assert_same_cache(draft_kv, kv_cache(draft, len(held)))

    check()
    assert sum(partial) >= 10  # many rounds rejected a draft after keeping some


# --- statistics ---------------------------------------------------------------------------------

def kept_per_round(calls: list[tuple[int, list[int]]], prompt_len: int, out: list[int]) -> list[int]:
    """For each round that verified drafts, how many of them it kept and output, read off `out` alone.

    A round outputs from where its proposer call's sequence stood up to where the next call's
    stood (or the end): its kept drafts, then a token of the target's, unless EOS or the budget
    cut it first. The token drawn after a rejection is never the rejected draft (the residual
    gives it no mass), so the kept drafts that were output are the longest common prefix.
    """
    ends = [start - prompt_len for start, _ in calls[1:]] + [len(out)]
    kept = []
    for (start, drafted), end in zip(calls, ends):
        if drafted:
            emitted = out[start - prompt_len:end]
            n = 0
            while n < min(len(drafted), len(emitted)) and drafted[n] == emitted[n]:
                n += 1
            kept.append(n)
    return kept


def check_statistics(calls, prompt: list[int], out: list[int], stats, forwards: int, k: int) -> list[int]:
    """The speculative statistics agree with what the run drafted and output; returns the kept counts."""
    spec = stats.speculative
    kept = kept_per_round(calls, len(prompt), out)
    assert spec.accepted_lengths == kept
    assert spec.accepted == sum(kept)
    assert spec.proposed == sum(len(drafted) for _, drafted in calls)
    assert spec.histogram() == [kept.count(i) for i in range(k + 1)]
    assert spec.target_forwards == forwards - (len(prompt) > 1)  # the prefill is not a round
    # Every round outputs its kept drafts and one token of the target's, except a last round that
    # EOS cut on a kept draft.
    last_start = calls[-1][0] - len(prompt) if calls else len(out)
    ended_on_a_draft = bool(calls and calls[-1][1] and kept[-1] == len(out) - last_start)
    assert len(out) == stats.new_tokens == spec.accepted + spec.target_forwards - ended_on_a_draft
    return kept


def test_statistics_count_what_the_output_kept_with_and_without_eos():
    """Without EOS and with an EOS that the run outputs (often among its kept drafts, or as the
    budget's last token), the statistics count the drafts that were output, not all verify kept."""
    cut_on_a_draft, eos_last = [], []

    # Derandomized: the count of rounds EOS cut (checked below) varies from run to run with the
    # examples drawn (4 to 15 seen in 50), and that check must not be a coin toss in CI.
    @settings(PROPERTY, derandomize=True)
    @given(seed=st.integers(0, 3), draft=st.sampled_from(["ngram", 0.0, 0.05, 0.15]), prompt=repetitive_prompts(),
           k=st.integers(1, 8), n=st.integers(1, 24), sampling=st.sampled_from([GREEDY, SAMPLED]),
           generator_seed=st.integers(0, 2**32 - 1), data=st.data())
    def check(seed, draft, prompt, k, n, sampling, generator_seed, data):
        """draft: n-gram lookup, or the target with this much noise (0: a copy, whose drafts are all kept)."""
        target = tiny("target", V, seed)
        inner = (NGramProposer(V) if draft == "ngram"
                 else DraftModelProposer(tiny("target", V, seed, noise=draft, instance=1), sampling))
        proposer = CountingProposer(inner)
        decoder = SpeculativeDecoder(target, proposer, sampling, k)
        forwards = []
        hook = target.register_forward_hook(lambda *args: forwards.append(1))
        try:
            out, stats = decoder.generate(prompt, n, generator=torch.Generator().manual_seed(generator_seed))
            kept = check_statistics(proposer.runs[-1], prompt, out, stats, len(forwards), k)
            assert len(out) == n

            # EOS: a token first output as a kept draft followed by another kept draft (so EOS cuts the
            # round short of what verify kept), or the run's last token.
            starts = [start - len(prompt) for start, drafted in proposer.runs[-1] if drafted]
            inside = sorted({out[i] for start, m in zip(starts, kept) for i in range(start, start + m - 1)
                             if out.index(out[i]) == i})
            eos = data.draw(st.sampled_from(inside) if inside else st.just(out[-1]), label="eos")
            forwards.clear()
            out_eos, stats_eos = decoder.generate(prompt, n, frozenset({eos}),
                                                  generator=torch.Generator().manual_seed(generator_seed))
            # The same draws up to EOS: the run without EOS, cut there.
            assert out_eos == stops(out, frozenset({eos}))
            kept_eos = check_statistics(proposer.runs[-1], prompt, out_eos, stats_eos, len(forwards), k)
        finally:
            hook.remove()
        last = len(kept_eos) - 1
        cut_on_a_draft.append(last >= 0 and kept_eos[last] < kept[last])
        eos_last.append(len(out_eos) == n and out_eos[-1] == eos)

    check()
    # Not vacuous: EOS often cut a round inside its kept drafts, and sometimes ended the budget.
    assert sum(cut_on_a_draft) >= 5 and sum(eos_last) >= 5, (sum(cut_on_a_draft), sum(eos_last))  # ~12 and ~25
