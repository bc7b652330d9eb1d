"""Our Transformer against HF's LlamaForCausalLM: same weights, same logits, through every cache path."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.loaders.hf_layout import from_hf, to_hf
from tests.properties.strategies import build_twins, logits_bound, model_cases, model_specs

PROPERTY = settings(max_examples=50, deadline=None)


def assert_logits_match(ours: torch.Tensor, reference: torch.Tensor) -> None:
    assert ours.shape == reference.shape
    diff, bound = (ours - reference).abs().max().item(), logits_bound(reference)
    assert diff <= bound, f"max abs diff {diff:.3g} > {bound:.3g}"


def run_chunks(model, tokens: torch.Tensor, splits: list[int], cache_len: int) -> torch.Tensor:
    """Logits [B, T, V] from feeding tokens [B, T] in chunks that end at each split (and at T)."""
    model.setup_cache(tokens.shape[0], cache_len)
    bounds = [0, *splits, tokens.shape[1]]
    out = [model(tokens[:, a:b], torch.arange(a, b)) for a, b in zip(bounds, bounds[1:])]
    return torch.cat(out, dim=1)


@PROPERTY
@given(case=model_cases(), spare=st.integers(0, 8))
@torch.no_grad()
def test_prefill_matches_hf(case, spare):
    spec, seed, tokens = case
    hf, ours = build_twins(spec, seed)
    # Spare cache slots beyond the prompt must stay masked out.
    assert_logits_match(run_chunks(ours, tokens, [], tokens.shape[1] + spare), hf(tokens).logits)


@PROPERTY
@given(case=model_cases(), spare=st.integers(0, 8))
@torch.no_grad()
def test_token_by_token_decode_matches_hf(case, spare):
    spec, seed, tokens = case
    hf, ours = build_twins(spec, seed)
    length = tokens.shape[1]
    ours_logits = run_chunks(ours, tokens, list(range(1, length)), length + spare)
    assert_logits_match(ours_logits, hf(tokens).logits)


@PROPERTY
@given(case=model_cases(min_len=2), data=st.data())
@torch.no_grad()
def test_split_prefill_matches_hf(case, data):
    spec, seed, tokens = case
    hf, ours = build_twins(spec, seed)
    split = data.draw(st.integers(1, tokens.shape[1] - 1), label="first chunk")
    assert_logits_match(run_chunks(ours, tokens, [split], tokens.shape[1]), hf(tokens).logits)


@PROPERTY
@given(spec=model_specs(), seed=st.integers(0, 2**32 - 1))
def test_hf_layout_round_trips_exactly(spec, seed):
    hf, ours = build_twins(spec, seed)
    hf_state, our_state = hf.state_dict(), ours.state_dict()
    for original, back in ((hf_state, to_hf(from_hf(hf_state, spec), spec)),
                           (our_state, from_hf(to_hf(our_state, spec), spec))):
        assert back.keys() == original.keys()
        for key, tensor in original.items():
            assert torch.equal(back[key], tensor), key
