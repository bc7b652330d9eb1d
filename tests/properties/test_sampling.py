"""Sampling: top-k and top-p keep what they promise, greedy is the argmax, draws follow the probabilities."""
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from runner.decoders.sampling import Sampling, logits_to_probs, next_token, sample

PROPERTY = settings(max_examples=50, deadline=None)
seeds = st.integers(0, 2**32 - 1)
temperatures = st.floats(0.2, 5.0)


@st.composite
def distinct_logits(draw) -> torch.Tensor:
    """[V] logits, all different, spanning at most 10 so no kept probability underflows."""
    vocab = draw(st.integers(2, 60))
    order = torch.randperm(vocab, generator=torch.Generator().manual_seed(draw(seeds)))
    return order.float() * (draw(st.floats(0.5, 10.0)) / vocab) - draw(st.floats(-5.0, 5.0))


def kept(probs: torch.Tensor) -> set[int]:
    return set(probs.nonzero().flatten().tolist())


def top(logits: torch.Tensor, n: int) -> set[int]:
    return set(logits.topk(n).indices.tolist())


@PROPERTY
@given(logits=distinct_logits(), data=st.data(), temperature=temperatures)
def test_top_k_keeps_exactly_the_k_largest(logits, data, temperature):
    k = data.draw(st.integers(1, len(logits)), label="top_k")
    probs = logits_to_probs(logits, Sampling(temperature=temperature, top_k=k))
    assert kept(probs) == top(logits, k)
    torch.testing.assert_close(probs.sum(), torch.tensor(1.0))


@PROPERTY
@given(logits=distinct_logits(), top_p=st.floats(0.01, 0.99), temperature=temperatures)
def test_top_p_keeps_the_smallest_prefix_reaching_p(logits, top_p, temperature):
    full = torch.softmax(logits.double() / temperature, -1)
    mass = full.sort(descending=True).values.cumsum(-1)
    assume((mass - top_p).abs().min() > 1e-5)  # fp32 rounding decides exact boundary cases
    n = int((mass < top_p).sum()) + 1

    probs = logits_to_probs(logits, Sampling(temperature=temperature, top_p=top_p))

    assert kept(probs) == top(logits, n)
    expected = torch.zeros_like(full).scatter(-1, full.topk(n).indices, full.topk(n).values)
    torch.testing.assert_close(probs.double(), expected / expected.sum(), rtol=1e-4, atol=1e-6)


@PROPERTY
@given(logits=distinct_logits(), seed=seeds)
def test_greedy_is_one_hot_at_the_argmax(logits, seed):
    probs = logits_to_probs(logits, Sampling(temperature=0))
    assert probs.tolist() == torch.nn.functional.one_hot(logits.argmax(), len(logits)).float().tolist()
    assert next_token(logits, Sampling(temperature=0)) == logits.argmax()
    assert sample(probs, torch.Generator().manual_seed(seed)) == logits.argmax()


@PROPERTY
@given(batch=st.integers(1, 4), vocab=st.integers(2, 60), seed=seeds, temperature=temperatures)
def test_sample_with_a_seeded_generator_is_deterministic(batch, vocab, seed, temperature):
    logits = 3 * torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed))
    probs = logits_to_probs(logits, Sampling(temperature=temperature))  # [B, V]
    first = sample(probs, torch.Generator().manual_seed(seed))
    assert first.shape == (batch,)
    assert torch.equal(first, sample(probs, torch.Generator().manual_seed(seed)))


@PROPERTY
@given(weights=st.lists(st.sampled_from([0.0, 0.0, 0.05, 0.2, 0.5, 1.0, 3.0]), min_size=2, max_size=8)
       .filter(lambda w: sum(w) > 0), seed=seeds)
def test_sample_draws_follow_the_probabilities(weights, seed):
    probs = torch.tensor(weights) / sum(weights)  # [V], zeros included
    draws = sample(probs.repeat(20000, 1), torch.Generator().manual_seed(seed))  # 20000 independent rows
    freq = torch.bincount(draws, minlength=len(weights)).double() / len(draws)
    assert (freq - probs.double()).abs().max() < 0.02
    assert (freq[probs == 0] == 0).all()


@settings(max_examples=20, deadline=None)
@given(weights=st.lists(st.sampled_from([0.05, 0.2, 0.5, 1.0, 3.0]), min_size=1, max_size=6), seed=seeds)
def test_sparse_draws_follow_the_probabilities(weights, seed):
    """Top-k's case: a few tokens of a large vocabulary carry all the mass (the CPU path races only
    those); they land wherever the vocabulary puts them."""
    g = torch.Generator().manual_seed(seed)
    where = torch.randperm(2048, generator=g)[:len(weights)]
    probs = torch.zeros(2048).index_put_((where,), torch.tensor(weights) / sum(weights))
    draws = sample(probs.repeat(5000, 1), g)
    freq = torch.bincount(draws, minlength=2048).double() / len(draws)
    assert (freq - probs.double()).abs().max() < 0.03
    assert freq[probs == 0].sum() == 0


@PROPERTY
@given(rows=st.integers(1, 3), vocab=st.integers(64, 400), data=st.data(), temperature=temperatures, seed=seeds,
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_top_k_over_the_candidates_is_the_whole_vocabularys_draw(rows, vocab, data, temperature, seed, dtype):
    # next_token's top-k path softmaxes and races only the candidates (the k largest and any ties
    # with the k-th: bf16 logits have many): the same token as the whole-vocabulary path for the
    # same generator.
    k = data.draw(st.integers(1, vocab // 8), label="top_k")
    top_p = data.draw(st.sampled_from([1.0, 0.95, 0.6]), label="top_p")
    logits = (torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 4).to(dtype)
    sampling = Sampling(temperature=temperature, top_k=k, top_p=top_p)
    if top_p < 1.0:  # distinct probabilities: which of two equal ones top-p keeps first is either's
        assume(all(len(torch.unique(row)) == vocab for row in logits))
    ours = next_token(logits, sampling, torch.Generator().manual_seed(seed))
    whole = sample(logits_to_probs(logits, sampling), torch.Generator().manual_seed(seed))
    assert torch.equal(ours, whole)
