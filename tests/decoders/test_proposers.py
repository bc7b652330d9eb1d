"""Proposers: n-gram prompt lookup finds the right continuation; the draft model's cache stays in step."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.decoders.proposers import DraftModelProposer, NGramProposer, _lookup
from runner.decoders.sampling import Sampling, logits_to_probs
from tests.decoders.tiny import prefill_logits, tiny

PROPERTY = settings(max_examples=50, deadline=None)
V = 16



# --- n-gram lookup ---------------------------------------------------------------------------

def test_lookup_prefers_the_longest_matching_suffix():
    sequence = [2, 3, 8, 9, 3, 5, 2, 3]
    # [3] last occurred before at index 4 (then 5, 2); [2, 3] only at index 0 (then 8, 9).
    assert _lookup(sequence, 2, max_n=3, min_n=1) == [8, 9]
    assert _lookup(sequence, 2, max_n=1, min_n=1) == [5, 2]


def test_lookup_prefers_the_most_recent_occurrence():
    assert _lookup([4, 1, 4, 2, 4], 1, max_n=3, min_n=1) == [2]
    assert _lookup([6, 7, 1, 6, 7, 2, 6, 7], 3, max_n=2, min_n=2) == [2, 6, 7]


def test_lookup_returns_at_most_k_tokens():
    sequence = [1, 2, 3, 4, 5, 6, 1]
    assert _lookup(sequence, 3, max_n=2, min_n=1) == [2, 3, 4]
    assert _lookup(sequence, 10, max_n=2, min_n=1) == [2, 3, 4, 5, 6, 1]  # up to the end
    assert _lookup([7, 8, 7], 5, max_n=3, min_n=1) == [8, 7]


def test_lookup_is_empty_without_a_match():
    assert _lookup([1, 2, 3], 4, max_n=3, min_n=1) == []
    assert _lookup([5], 4, max_n=3, min_n=1) == []
    assert _lookup([1, 2, 9, 2], 4, max_n=3, min_n=2) == []  # only a 1-gram matches


def lookup_reference(sequence: list[int], k: int, max_n: int, min_n: int) -> list[int]:
    """Every (n, start) where the last n tokens occurred earlier; the largest n, then the latest start."""
    matches = [(n, start) for n in range(min_n, max_n + 1) for start in range(len(sequence) - n)
               if sequence[start:start + n] == sequence[len(sequence) - n:]]
    if not matches:
        return []
    n, start = max(matches)
    return sequence[start + n:start + n + k]


@PROPERTY
@given(sequence=st.lists(st.integers(0, 3), max_size=30), k=st.integers(1, 8), max_n=st.integers(1, 5),
       data=st.data())
def test_lookup_matches_a_brute_force_search(sequence, k, max_n, data):
    min_n = data.draw(st.integers(1, max_n), label="min_n")
    got = _lookup(sequence, k, max_n, min_n)
    assert got == lookup_reference(sequence, k, max_n, min_n)
    assert len(got) <= k


def test_ngram_proposer_drafts_with_one_hot_distributions():
    drafted, q = NGramProposer(V).propose([1, 2, 3, 1, 2], 4, None)
    assert drafted == [3, 1, 2]
    assert q.tolist() == torch.nn.functional.one_hot(torch.tensor(drafted), V).float().tolist()
    drafted, q = NGramProposer(V).propose([1, 2, 3], 4, None)
    assert drafted == [] and q.shape == (0, V)


# --- the draft model ---------------------------------------------------------------------------

@PROPERTY
@given(seed=st.integers(0, 3), prompt=st.lists(st.integers(0, V - 1), min_size=1, max_size=10),
       rounds=st.lists(st.tuples(st.integers(1, 5), st.integers(0, 5), st.integers(0, V - 1)), min_size=1, max_size=5),
       sampling=st.sampled_from([Sampling(temperature=0), Sampling(temperature=1.0, top_k=5)]),
       generator_seed=st.integers(0, 2**32 - 1))
def test_draft_distributions_equal_a_fresh_prefill_across_rounds(seed, prompt, rounds, sampling, generator_seed):
    """Round after round, the sequence keeps some drafts and appends a token, as verify does; the
    proposer's q for every draft equals the draft model's distribution after a fresh prefill, so the
    cache it reuses is right, and each draft is a token q allows (its argmax when greedy)."""
    draft, twin = tiny("draft", V, seed), tiny("draft", V, seed, instance=1)
    proposer = DraftModelProposer(draft, sampling)
    proposer.reset(64)
    generator = torch.Generator().manual_seed(generator_seed)
    sequence = list(prompt)
    for k, keep, token in rounds:
        drafted, q = proposer.propose(sequence, k, generator)
        assert len(drafted) == k and q.shape == (k, V)
        for i, d in enumerate(drafted):
            want = logits_to_probs(prefill_logits(twin, sequence + drafted[:i])[-1], sampling)
            torch.testing.assert_close(q[i], want, rtol=1e-4, atol=1e-5)
            assert q[i, d] > 0
            if sampling.greedy:
                assert d == int(want.argmax())
        sequence += drafted[:keep] + [token]
