"""int4: asymmetric groupwise round-to-nearest and the neutral nibble packing (runner/quant/int4.py)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.quant import int4
from tests.quant.bounds import step_limit_int4, within_half_step
from tests.quant.strategies import DTYPES, weights, within_range_of


@settings(max_examples=50, deadline=None)
@given(weights(), st.sampled_from(DTYPES))
def test_every_element_within_half_a_step_of_its_group(case, scale_dtype):
    w, groupsize = case
    w = within_range_of(scale_dtype, w)
    q, scales, zeros = int4.quantize(w, groupsize, scale_dtype)
    out, n = w.shape
    assert q.dtype == torch.uint8 and q.shape == w.shape and q.max() <= 15
    assert scales.shape == zeros.shape == (out, n // groupsize) and scales.dtype == zeros.dtype == scale_dtype
    w_hat = int4.dequantize(q, scales, zeros)
    steps = scales.repeat_interleave(groupsize, dim=1)  # [out, in]: each element's group step
    ok = within_half_step(w, w_hat, steps)
    assert ok.all(), f"{(~ok).sum()} elements out of bound, first at {(~ok).nonzero()[0].tolist()}"
    assert (scales.double() <= step_limit_int4(w, groupsize, scale_dtype)).all()


@settings(max_examples=50, deadline=None)
@given(weights())
def test_zero_groups_come_back_exactly_zero(case):
    w, groupsize = case
    w[-1, :groupsize] = 0
    q, scales, zeros = int4.quantize(w, groupsize)
    assert torch.equal(int4.dequantize(q, scales, zeros)[-1, :groupsize], torch.zeros(groupsize))


def test_a_group_spans_its_min_and_max_with_the_kernels_zero_convention():
    w = torch.linspace(-1.0, 2.0, 32)[None, :]  # 15 steps of 0.2 over 16 levels, min and max included
    q, scales, zeros = int4.quantize(w, 32)
    assert torch.allclose(scales, torch.tensor([[0.2]])) and torch.allclose(zeros, torch.tensor([[-1.0 + 8 * 0.2]]))
    assert q[0, 0] == 0 and q[0, -1] == 15  # dequantized as (q - 8) * scale + zero


def test_a_groupsize_that_does_not_divide_is_refused():
    with pytest.raises(ValueError, match="does not divide"):
        int4.quantize(torch.randn(4, 96), 64)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 40), st.integers(1, 64), st.integers(0, 2**32 - 1))
def test_pack_and_unpack_round_trip_exactly(out, half, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (out, 2 * half), generator=g, dtype=torch.uint8)
    packed = int4.pack(q)
    assert packed.dtype == torch.uint8 and packed.shape == (out, half)
    assert torch.equal(int4.unpack(packed), q)
    as_bytes = torch.randint(0, 256, (out, half), generator=g, dtype=torch.uint8)
    assert torch.equal(int4.pack(int4.unpack(as_bytes)), as_bytes)


def test_the_neutral_layout_puts_the_even_column_in_the_low_nibble():
    q = torch.tensor([[1, 2, 3, 4]], dtype=torch.uint8)
    assert int4.pack(q).tolist() == [[0x21, 0x43]]


def test_scales_and_zeros_layout_is_groups_by_rows_by_two():
    scales, zeros = torch.arange(6.0).view(2, 3), -torch.arange(6.0).view(2, 3)  # [out=2, G=3]
    sz = int4.scales_and_zeros(scales, zeros)
    assert sz.shape == (3, 2, 2)
    assert sz[2, 1].tolist() == [scales[1, 2].item(), zeros[1, 2].item()]
