"""Qwen2, Qwen3, Gemma 2, Gemma 3 and Phi-3 against HF's own classes: same weights, same logits,
prefill and cached decode, with windows, local layers, soft-capping and every RoPE scaling type.

HF is run with its own cache over the same chunks: dynamic and longrope RoPE pick their
frequencies per forward (from the longest position it holds), so a cached decode is not a
whole-sequence forward there, in HF as in runner.
"""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

from runner.loaders.hf_layout import from_hf, to_hf
from tests.properties.families import family_specs
from tests.properties.strategies import logits_bound, model_cases, twins

PROPERTY = settings(max_examples=40, deadline=None)


def run_both(hf, ours, tokens: torch.Tensor, splits: list[int], spare: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [B, T, V] of each model fed tokens [B, T] in chunks that end at each split (and at T)."""
    ours.setup_cache(tokens.shape[0], tokens.shape[1] + spare)
    cache = DynamicCache(config=hf.config)
    bounds = [0, *splits, tokens.shape[1]]
    mine, theirs = [], []
    for a, b in zip(bounds, bounds[1:]):
        mine.append(ours(tokens[:, a:b], torch.arange(a, b)))
        theirs.append(hf(tokens[:, a:b], past_key_values=cache, use_cache=True).logits)
    return torch.cat(mine, dim=1), torch.cat(theirs, dim=1)


def assert_logits_match(ours: torch.Tensor, reference: torch.Tensor) -> None:
    assert ours.shape == reference.shape
    diff, bound = (ours - reference).abs().max().item(), logits_bound(reference)
    assert diff <= bound, f"max abs diff {diff:.3g} > {bound:.3g}"


@PROPERTY
@given(case=model_cases(specs=family_specs()), spare=st.integers(0, 8))
@torch.no_grad()
def test_prefill_matches_hf(case, spare):
    spec, seed, tokens = case
    hf, ours = twins(spec, seed)
    assert_logits_match(*run_both(hf, ours, tokens, [], spare))


@PROPERTY
@given(case=model_cases(specs=family_specs(), max_len=24), spare=st.integers(0, 4))
@torch.no_grad()
def test_token_by_token_decode_matches_hf(case, spare):
    spec, seed, tokens = case
    hf, ours = twins(spec, seed)
    assert_logits_match(*run_both(hf, ours, tokens, list(range(1, tokens.shape[1])), spare))


@PROPERTY
@given(case=model_cases(specs=family_specs(), min_len=2), data=st.data())
@torch.no_grad()
def test_prefill_then_decode_matches_hf(case, data):
    spec, seed, tokens = case
    hf, ours = twins(spec, seed)
    split = data.draw(st.integers(1, tokens.shape[1] - 1), label="prompt length")
    assert_logits_match(*run_both(hf, ours, tokens, list(range(split, tokens.shape[1])), 0))


@settings(max_examples=20, deadline=None)
@given(spec=family_specs(), seed=st.integers(0, 2**32 - 1))
def test_hf_layout_round_trips(spec, seed):
    hf, ours = twins(spec, seed)
    hf_state, our_state = hf.state_dict(), ours.state_dict()
    back = to_hf(from_hf(hf_state, spec), spec)
    assert back.keys() == hf_state.keys()
    for key, tensor in hf_state.items():  # Gemma's norms go through w + 1 - 1 in fp32: half an ulp of w + 1
        torch.testing.assert_close(back[key], tensor, rtol=0, atol=2.5e-7 if spec.norm_offset else 0, msg=key)
    again = from_hf(to_hf(our_state, spec), spec)
    assert again.keys() == our_state.keys()
    for key, tensor in our_state.items():
        torch.testing.assert_close(again[key], tensor, rtol=0, atol=2.5e-7 if spec.norm_offset else 0, msg=key)
