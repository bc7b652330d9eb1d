"""The model's own switches, against its full forward."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from runner import kernels
from tests.properties.strategies import build_twins, model_cases


@settings(max_examples=50, deadline=None)
@given(case=model_cases(min_len=2, max_len=30, max_batch=2), on_kernels=st.booleans(), start=st.integers(0, 3))
@torch.no_grad()
def test_last_only_is_the_last_row_of_the_full_logits(case, on_kernels, start):
    spec, seed, tokens = case
    _, model = build_twins(spec, seed)
    if on_kernels and tokens.shape[0] == 1:
        kernels.load()
        model.use_ops(kernels.KernelOps())
    positions = torch.arange(start, start + tokens.shape[1])
    outs = []
    for last_only in (False, True):
        model.setup_cache(tokens.shape[0], start + tokens.shape[1])
        outs.append(model(tokens, positions, last_only=last_only))
    full, last = outs
    assert last.shape == (tokens.shape[0], 1, spec.vocab_size)
    # The same math on other matmul shapes (1 row, not T): fp32 sums in another order, so the
    # bound scales with the logits' size (a wrong row or position would be off by O(them)).
    scale = full.abs().max().clamp(min=1).item()
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-5, atol=1e-5 * scale * 4)
