"""int8: symmetric per-channel round-to-nearest (runner/quant/int8.py)."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.quant import int8
from tests.quant.bounds import step_limit_int8, within_half_step
from tests.quant.strategies import DTYPES, weights, within_range_of


@settings(max_examples=50, deadline=None)
@given(weights(), st.sampled_from(DTYPES))
def test_every_element_within_half_a_step_of_its_row(case, scale_dtype):
    w, _ = case
    w = within_range_of(scale_dtype, w)
    q, scales = int8.quantize(w, scale_dtype)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert scales.dtype == scale_dtype and scales.shape == (w.shape[0],)
    assert q.abs().max() <= 127
    w_hat = int8.dequantize(q, scales)
    ok = within_half_step(w, w_hat, scales[:, None].expand_as(w))
    assert ok.all(), f"{(~ok).sum()} elements out of bound, first at {(~ok).nonzero()[0].tolist()}"
    assert (scales.double() <= step_limit_int8(w, scale_dtype)).all()


@settings(max_examples=50, deadline=None)
@given(weights())
def test_zero_rows_come_back_exactly_zero(case):
    w, _ = case
    w[0] = 0
    q, scales = int8.quantize(w)
    assert torch.equal(int8.dequantize(q, scales)[0], torch.zeros(w.shape[1]))


def test_the_largest_weight_of_a_row_is_exact():
    w = torch.tensor([[-2.0, 0.5, 1.0], [0.0, 3.0, -1.0]])
    q, scales = int8.quantize(w)
    assert q[:, :].abs().amax(dim=1).tolist() == [127, 127]
    assert torch.allclose(int8.dequantize(q, scales)[[0, 1], [0, 1]], torch.tensor([-2.0, 3.0]))
