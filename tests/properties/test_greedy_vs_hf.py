"""Greedy decoding with PlainDecoder against HF's generate, token for token."""
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from runner.decoders.plain import PlainDecoder
from runner.decoders.sampling import Sampling
from tests.properties.strategies import build_twins, logits_bound, model_cases


@settings(max_examples=50, deadline=None)
@given(case=model_cases(max_batch=1), n=st.integers(1, 24))
def test_greedy_matches_hf_generate(case, n):
    spec, seed, tokens = case
    hf, ours = build_twins(spec, seed)
    stats = assert_greedy_matches_hf(hf, ours, tokens, n)
    assert stats.new_tokens == n


def assert_greedy_matches_hf(hf, ours, tokens: torch.Tensor, n: int):
    """PlainDecoder's n greedy tokens after tokens [1, T] equal HF generate's; its Stats."""
    with torch.no_grad():
        out = hf.generate(tokens, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          output_logits=True, return_dict_in_generate=True)
    # A near-tie in the argmax lets two correct implementations part ways: skip those examples.
    for step in out.logits:  # [1, V] per new token
        top2 = step[0].topk(2).values
        assume(top2[0] - top2[1] >= logits_bound(step))

    new_ids, stats = PlainDecoder(ours, Sampling(temperature=0)).generate(tokens[0].tolist(), n)

    assert new_ids == out.sequences[0, tokens.shape[1]:].tolist()
    return stats
