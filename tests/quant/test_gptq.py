"""GPTQ on one matrix (runner/quant/gptq.py)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.quant import gptq, int4
from tests.quant.bounds import step_limit_int4, within_half_step


@st.composite
def layer_and_activations(draw, well_conditioned: bool = False):
    """(w [out, in], X [m, in], groupsize): X low-rank plus noise, channels of uneven scale.

    Without well_conditioned, X may be of rank 1 and noiseless (a singular Hessian).
    """
    groupsize = draw(st.sampled_from([32, 64, 128]))
    n = groupsize * draw(st.integers(1, 256 // groupsize))
    out = draw(st.integers(4 if well_conditioned else 1, 32))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    rank = draw(st.integers(n // 4, n // 2) if well_conditioned else st.integers(1, n // 2))
    noise = draw(st.sampled_from([0.1, 0.3] if well_conditioned else [0.0, 0.01, 0.1, 1.0]))
    x = torch.randn(2 * n, rank, generator=g) @ torch.randn(rank, n, generator=g) / rank ** 0.5  # correlated
    x += torch.randn(2 * n, n, generator=g) * noise
    x *= torch.rand(n, generator=g) * 3
    w = torch.randn(out, n, generator=g) * 10 ** draw(st.floats(-3, 0))
    if draw(st.booleans()):
        w += torch.randn(out, 1, generator=g) * w.abs().amax()  # rows offset from zero
    return w, x, groupsize


def hessian(x: torch.Tensor) -> torch.Tensor:
    return gptq.hessian_add(torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64), 0, x)[0]


def output_error(x, w, w_hat) -> float:
    return (x.double() @ (w.double() - w_hat.double()).T).norm().item()


@settings(max_examples=50, deadline=None)
@given(layer_and_activations())
def test_gptq_reconstructs_outputs_no_worse_than_round_to_nearest(case):
    w, x, groupsize = case
    q, scales, zeros = gptq.quantize(w, hessian(x), groupsize)
    gptq_error = output_error(x, w, int4.dequantize(q, scales, zeros))
    rtn_error = output_error(x, w, int4.dequantize(*int4.quantize(w, groupsize)))
    assert gptq_error <= rtn_error * (1 + 1e-9)  # the row choice is made in float64 on H, this on X


@settings(max_examples=50, deadline=None)
@given(layer_and_activations(well_conditioned=True))
def test_gptq_clearly_beats_round_to_nearest_on_correlated_activations(case):
    """So that the guarantee above is not met by falling back to round-to-nearest everywhere."""
    w, x, groupsize = case
    q, scales, zeros = gptq.quantize(w, hessian(x), groupsize)
    gptq_error = output_error(x, w, int4.dequantize(q, scales, zeros))
    rtn_error = output_error(x, w, int4.dequantize(*int4.quantize(w, groupsize)))
    assert gptq_error <= 0.9 * rtn_error  # typically 0.5; the worst of 300 random cases was 0.75


def test_with_an_identity_hessian_gptq_is_round_to_nearest():
    """No correlation between inputs: no error to spread, so the very same levels."""
    w = torch.randn(24, 128, generator=torch.Generator().manual_seed(2))
    q, scales, zeros = gptq.quantize(w, torch.eye(128, dtype=torch.float64), 32)
    rq, rscales, rzeros = int4.quantize(w, 32)
    assert torch.equal(q, rq) and torch.equal(scales, rscales) and torch.equal(zeros, rzeros)


def test_dead_inputs_are_rounded_to_nearest_not_zeroed():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(16, 64, generator=g), torch.randn(256, 64, generator=g)
    x[:, :32] = 0  # the first group never fires during calibration
    q, scales, zeros = gptq.quantize(w, hessian(x), 32)
    w_hat = int4.dequantize(q, scales, zeros)
    assert within_half_step(w[:, :32], w_hat[:, :32], scales[:, :1].expand(-1, 32)).all()
    assert (scales[:, 0].double() <= step_limit_int4(w[:, :32], 32, torch.float32)[:, 0]).all()


def test_block_size_changes_the_speed_not_the_result():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 8, generator=g) @ torch.randn(8, 256, generator=g) + 0.1 * torch.randn(512, 256, generator=g)
    w, h = torch.randn(16, 256, generator=g), hessian(x)
    ref = int4.dequantize(*gptq.quantize(w, h, 32, block_size=256))
    for block_size in (1, 64, 100):
        other = int4.dequantize(*gptq.quantize(w, h, 32, block_size=block_size))
        assert output_error(x, ref, other) <= 1e-3 * output_error(x, w, ref)


def test_hessian_accumulates_in_pieces_like_at_once():
    x = torch.randn(100, 16, generator=torch.Generator().manual_seed(3))
    h, n = gptq.hessian_add(torch.zeros(16, 16, dtype=torch.float64), 0, x[:30])
    h, n = gptq.hessian_add(h, n, x[30:].view(7, 10, 16))
    assert n == 100 and torch.allclose(h, 2 * x.double().T @ x.double() / 100)


def test_an_indefinite_hessian_is_reported():
    with pytest.raises(gptq.NotPositiveDefinite):
        gptq.inverse_hessian_factor(torch.diag(torch.tensor([-1.0, -1.0, -1.0, 3.0], dtype=torch.float64)), 0.01)
