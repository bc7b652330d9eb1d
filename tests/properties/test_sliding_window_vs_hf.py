"""Sliding-window attention against HF's MistralForCausalLM (and MixtralForCausalLM, experts and a
window): prompts longer than the window, prefilled, decoded token by token across the window's
edge and in random chunks, through torch's ops and runner's kernels; and causal_mask against its
definition."""
import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from runner import kernels
from runner.model import functional as fn
from tests.properties.strategies import model_specs, moe_specs, twins
from tests.properties.test_model_vs_hf import assert_logits_match, run_chunks

PROPERTY = settings(max_examples=50, deadline=None)


@pytest.fixture(scope="module")
def kernel_ops():
    kernels.load()
    return kernels.KernelOps


@st.composite
def window_cases(draw, max_batch: int = 2):
    """(spec, init seed, tokens [B, T], cache_len): Mistral or Mixtral, a window of 1 to T - 1."""
    spec = draw(model_specs() | moe_specs())
    length = draw(st.integers(2, 40))
    spec = dataclasses.replace(spec, sliding_window=draw(st.integers(1, length - 1)))
    batch = draw(st.integers(1, max_batch))
    row = st.lists(st.integers(0, spec.vocab_size - 1), min_size=length, max_size=length)
    tokens = torch.tensor(draw(st.lists(row, min_size=batch, max_size=batch)))
    cache_len = length + draw(st.integers(0, 8))  # spare slots beyond the prompt stay masked out
    return spec, draw(st.integers(0, 2**32 - 1)), tokens, cache_len


@st.composite
def chunkings(draw, length: int) -> list[int]:
    """Where chunks of a prompt of `length` tokens end (length itself left out): any split points."""
    return sorted(draw(st.sets(st.integers(1, length - 1))))


@PROPERTY
@given(case=window_cases())
@torch.no_grad()
def test_prefill_matches_hf(case):
    spec, seed, tokens, cache_len = case
    hf, ours = twins(spec, seed)
    assert_logits_match(run_chunks(ours, tokens, [], cache_len), hf(tokens).logits)


@PROPERTY
@given(case=window_cases())
@torch.no_grad()
def test_token_by_token_decode_across_the_window_matches_hf(case):
    spec, seed, tokens, cache_len = case
    hf, ours = twins(spec, seed)
    ours_logits = run_chunks(ours, tokens, list(range(1, tokens.shape[1])), cache_len)
    assert_logits_match(ours_logits, hf(tokens).logits)


@PROPERTY
@given(case=window_cases(), data=st.data())
@torch.no_grad()
def test_chunked_prefill_matches_hf(case, data):
    spec, seed, tokens, cache_len = case
    hf, ours = twins(spec, seed)
    splits = data.draw(chunkings(tokens.shape[1]), label="chunk ends")
    assert_logits_match(run_chunks(ours, tokens, splits, cache_len), hf(tokens).logits)


@PROPERTY
@given(case=window_cases(max_batch=1), data=st.data())
@torch.no_grad()
def test_kernels_match_hf(case, data, kernel_ops):
    """The attend kernel applies the window itself (16 rows or fewer); a longer prompt goes through
    torch's attention with the mask."""
    spec, seed, tokens, cache_len = case
    hf, ours = twins(spec, seed)
    ours.use_ops(kernel_ops())
    reference, length = hf(tokens).logits, tokens.shape[1]
    splits = data.draw(chunkings(length), label="chunk ends")
    for chunk_ends in ([], list(range(1, length)), splits):
        assert_logits_match(run_chunks(ours, tokens, chunk_ends, cache_len), reference)


@PROPERTY
@given(cache_len=st.integers(1, 64), data=st.data())
def test_causal_mask_is_its_definition(cache_len, data):
    """Query position p sees slot s iff s <= p, and with a window w also p - w < s (w slots in all)."""
    start = data.draw(st.integers(0, cache_len - 1), label="first position")
    end = data.draw(st.integers(start + 1, cache_len), label="end")
    window = data.draw(st.none() | st.integers(1, cache_len + 2), label="window")
    positions = list(range(start, end))

    mask = fn.causal_mask(torch.tensor(positions), cache_len, window)

    expected = [[s <= p and (window is None or s > p - window) for s in range(cache_len)] for p in positions]
    assert mask.dtype == torch.bool and mask.tolist() == expected
