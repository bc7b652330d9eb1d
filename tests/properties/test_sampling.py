"""Sampling: top-k and top-p keep what they promise, greedy is the argmax, draws follow the probabilities."""
import torch
from hypothesis import assume, example, given, settings
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


def vocab_and_k(smallest: int, largest: int):
    """(V, top_k) with top_k in [1, V]."""
    return st.integers(smallest, largest).flatmap(lambda v: st.tuples(st.just(v), st.integers(1, v)))


@PROPERTY
@example(rows=1, vocab_k=(240, 30), top_p=1.0, temperature=2.0, seed=4294967293, dtype=torch.bfloat16)  # 31 candidates
@given(rows=st.integers(1, 3), vocab_k=vocab_and_k(64, 400), top_p=st.sampled_from([1.0, 0.95, 0.6]),
       temperature=temperatures, seed=seeds, dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_top_k_over_the_candidates_is_the_whole_vocabularys_draw(rows, vocab_k, top_p, temperature, seed, dtype):
    # next_token's top-k path softmaxes and races only the candidates (the k largest and any ties
    # with the k-th: bf16 logits have many): the same token as the whole-vocabulary path for the
    # same generator.
    vocab, k = vocab_k
    logits = (torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 4).to(dtype)
    sampling = Sampling(temperature=temperature, top_k=k, top_p=top_p)
    ours = next_token(logits, sampling, torch.Generator().manual_seed(seed))
    whole = sample(logits_to_probs(logits, sampling), torch.Generator().manual_seed(seed))
    assert torch.equal(ours, whole)


@st.composite
def tied_logits(draw) -> torch.Tensor:
    """[R, V] fp32 or bf16 logits full of ties: a few levels, all equal, or rounded Gaussians;
    some or most -inf (never a whole row)."""
    rows, vocab = draw(st.integers(1, 3), label="rows"), draw(st.integers(2, 300), label="vocab")
    g = torch.Generator().manual_seed(draw(seeds, label="seed"))
    kind = draw(st.sampled_from(["levels", "equal", "gaussian"]), label="kind")
    if kind == "levels":
        levels = torch.tensor(draw(st.lists(st.floats(-4.0, 4.0), min_size=1, max_size=4), label="levels"))
        logits = levels[torch.randint(len(levels), (rows, vocab), generator=g)]
    elif kind == "equal":
        logits = torch.full((rows, vocab), draw(st.floats(-4.0, 4.0), label="level"))
    else:
        logits = torch.randn(rows, vocab, generator=g) * 4
    gone = torch.rand(rows, vocab, generator=g) < draw(st.sampled_from([0.0, 0.5, 0.95]), label="-inf share")
    gone[torch.arange(rows), torch.randint(vocab, (rows,), generator=g)] = False
    return logits.masked_fill(gone, float("-inf")).to(draw(st.sampled_from([torch.float32, torch.bfloat16])))


@PROPERTY
@given(logits=tied_logits(), data=st.data(), temperature=temperatures, seed=seeds)
def test_ties_and_infinities_draw_the_same_token_on_either_path(logits, data, temperature, seed):
    """Both paths take the same candidates, ties at the k-th logit or at top-p's boundary included,
    and race them alike: one draw per candidate, in vocabulary order (both generators end in the
    same state)."""
    vocab = logits.shape[-1]
    top_k = data.draw(st.none() | st.integers(1, vocab + 3), label="top_k")  # k >= V: no top-k
    # Equal probabilities put top-p's boundary on sums like 1/4 + 1/4.
    top_p = data.draw(st.sampled_from([1.0, 0.25, 0.5, 0.6, 0.75, 0.95]) | st.floats(0.01, 1.0), label="top_p")
    if len(logits) == 1 and data.draw(st.booleans(), label="one row as [V]"):
        logits = logits[0]
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p)
    ours_g, whole_g = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    ours = next_token(logits, sampling, ours_g)
    probs = logits_to_probs(logits, sampling)
    whole = sample(probs, whole_g)
    assert torch.equal(ours, whole)
    assert torch.equal(ours_g.get_state(), whole_g.get_state())
    assert (probs.gather(-1, whole.unsqueeze(-1)) > 0).all()


@PROPERTY
@given(logits=tied_logits(), seed=seeds)
def test_greedy_takes_the_first_maximum(logits, seed):
    first = torch.stack([(row == row.max()).nonzero()[0, 0] for row in logits])  # ties: the lowest index
    greedy = Sampling(temperature=0)
    assert torch.equal(next_token(logits, greedy), first)
    assert torch.equal(sample(logits_to_probs(logits, greedy), torch.Generator().manual_seed(seed)), first)
