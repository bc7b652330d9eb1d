"""Stacked experts (a mixture of experts' feed-forward), float and quantized, on every path: each
row's output is x @ dequantize(W_e).T for its own expert e; experts no row chose are never read;
int8 keeps the float model's greedy choices.

Paths: runner's gather+GEMV kernels (up to MAX_ROWS rows), the reference's gather (a decoded
token's few rows) and its grouping by expert (a prompt), runner's dequantize-then-GEMM for a
prompt; fp32 and bf16. Tolerances as in test_kernels.py (relative to |x| @ |w_hat|^T).
"""
import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from runner import kernels
from runner.config.schema import ModelSpec, QuantMode, QuantSection
from runner.kernels import MAX_ROWS
from runner.model import functional as fn
from runner.model.llama import ExpertLinear
from runner.quant import quantize
from runner.quant.linear import Int4Experts, Int8Experts
from tests.quant.helpers import float_model, logits, prompts
from tests.quant.strategies import tiny_specs
from tests.quant.test_kernels import reference, tolerance

CPU = torch.device("cpu")
ROWS = st.one_of(st.integers(1, fn.GATHER_ROWS), st.integers(fn.GATHER_ROWS + 1, MAX_ROWS),
                 st.integers(MAX_ROWS + 1, MAX_ROWS + 24))


@pytest.fixture(scope="module", autouse=True)
def runner_kernels():
    return kernels.load()


def experts(n: int, out: int, inner: int, seed: int, dtype) -> ExpertLinear:
    layer = ExpertLinear(n, inner, out)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(n, out, inner, generator=g) * 10 ** (torch.rand(n, out, 1, generator=g) - 1))
    return layer.to(dtype).requires_grad_(False)


@st.composite
def cases(draw):
    """(float ExpertLinear, kind, groupsize, x, ids): 1-8 experts, each row routed anywhere."""
    n, out, groupsize = draw(st.integers(1, 8)), draw(st.integers(1, 48)), draw(st.sampled_from([32, 64]))
    inner = groupsize * draw(st.integers(1, 3))
    dtype, seed = draw(st.sampled_from([torch.float32, torch.bfloat16])), draw(st.integers(0, 2**31))
    rows = draw(ROWS)
    g = torch.Generator().manual_seed(seed + 1)
    x = (torch.randn(rows, inner, generator=g) * 3).to(dtype)
    ids = torch.tensor(draw(st.lists(st.integers(0, n - 1), min_size=rows, max_size=rows)))
    return experts(n, out, inner, seed, dtype), draw(st.sampled_from(["float", "int8", "int4"])), groupsize, x, ids


def quantized(layer: ExpertLinear, kind: str, groupsize: int):
    if kind == "float":
        return layer, layer.weight.double()
    if kind == "int8":
        q = Int8Experts.from_float(layer)
    else:
        q = Int4Experts.from_float(layer, groupsize)
    return q, q.dequantize(torch.arange(layer.n_experts)).double()


@settings(max_examples=60, deadline=None)
@given(case=cases(), on_kernels=st.booleans())
def test_each_row_is_x_times_its_own_dequantized_expert(case, on_kernels):
    layer, kind, groupsize, x, ids = case
    layer, w_hat = quantized(layer, kind, groupsize)
    if on_kernels:
        layer.ops = kernels.KernelOps  # float: through the ops namespace (quantized layers: their kernel)
        if kind != "float":
            assert layer.pack_for(CPU, "runner") == "runner"
    y = layer(x, ids)
    assert y.dtype == x.dtype and y.shape == (x.shape[0], w_hat.shape[1])
    for m in range(x.shape[0]):
        row, expert = x[m:m + 1], w_hat[ids[m]]
        err = (y[m:m + 1].double() - reference(row, expert)).abs()
        assert (err <= tolerance(row, expert)).all(), (kind, on_kernels, m, err.max().item())


@pytest.mark.parametrize("kind", ["float", "int8", "int4"])
@pytest.mark.parametrize("on_kernels", [False, True])
@pytest.mark.parametrize("rows", [2, MAX_ROWS, MAX_ROWS + 9])
def test_experts_no_row_chose_are_never_read(kind, on_kernels, rows):
    """Poison every expert but the chosen ones with NaN: a path that reads them (a dense matmul
    over all experts, a gather of the wrong ones) returns NaN."""
    layer, _ = quantized(experts(6, 24, 64, 0, torch.float32), kind, 32)
    chosen = torch.tensor([1, 4])
    ids = chosen[torch.arange(rows) % 2]
    unread = torch.tensor([e for e in range(6) if e not in chosen.tolist()])
    with torch.no_grad():
        (layer.weight if kind == "float" else layer.scales)[unread] = float("nan")
    if on_kernels:
        layer.ops = kernels.KernelOps
        if kind != "float":
            layer.pack_for(CPU, "runner")
    y = layer(torch.randn(rows, 64), ids)
    assert torch.isfinite(y).all()


def test_the_kernels_refuse_an_expert_id_out_of_range():
    layer = Int8Experts.from_float(experts(4, 8, 32, 0, torch.float32))
    layer.pack_for(CPU, "runner")
    with pytest.raises(RuntimeError, match="not one of the 4"):
        layer(torch.randn(2, 32), torch.tensor([0, 4]))


def test_quantized_experts_describe_themselves():
    # repr(model) prints every layer; an int4 mixture's experts once raised on a dense layer's attribute.
    layer = experts(4, 8, 32, 0, torch.float32)
    assert "groupsize=32" in repr(Int4Experts.from_float(layer, 32))
    assert "Int8Experts" in repr(Int8Experts.from_float(layer))


@st.composite
def moe_specs(draw) -> ModelSpec:
    """tiny_specs with 2-8 experts, top 1-2, and a sliding window or none."""
    spec = draw(tiny_specs())
    experts = draw(st.integers(2, 8))
    return dataclasses.replace(spec, n_experts=experts, n_experts_per_token=draw(st.integers(1, 2)),
                               sliding_window=draw(st.none() | st.integers(4, 24)))


@settings(max_examples=50, deadline=None)
@given(moe_specs(), st.integers(0, 2**16))
def test_int8_mixture_of_experts_keeps_the_float_models_top1(spec, seed):
    """As for dense models (test_model.py): int8 experts, attention and router-fed routing agree
    with float on >= 90% of the greedy choices of random prompts."""
    reference = float_model(spec, seed)
    model = quantize(float_model(spec, seed), QuantSection(mode=QuantMode.int8))
    assert isinstance(model.layers[0].feed_forward.experts.w13, Int8Experts)
    assert type(model.layers[0].feed_forward.gate).__name__ == "Linear"  # the router stays float
    tokens = prompts(spec, seed)
    agree = (logits(model, tokens).argmax(-1) == logits(reference, tokens).argmax(-1)).float().mean()
    assert agree >= 0.9
