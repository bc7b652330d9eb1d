"""Quantized linears against x @ dequantize(Wq).T, for every kernel this machine runs.

Tolerance, relative to m = |x| @ |w_hat|^T (the sum the output's rounding scales with):
    K * 2^-23 * m           accumulation of K products in fp32 (the worst case, twice over)
  + eps(out dtype) * m      the output's rounding to bf16 / fp16 and one intermediate rounding
  + tiny(out dtype)         underflow: results below the smallest normal lose absolute precision
so fp32 outputs must agree to ~K ulps and bf16 ones to about one bf16 ulp.

That bound is loose enough in bf16 to hide a 1% scale error, so each int4 kernel is also held
to exact equality on weights every dtype holds exactly (one-hot inputs read them back one by
one). The int4 reference is written here, in float64, from the neutral layout's description
(runner/quant/int4.py), not taken from runner: its dequantize is what the fallback runs.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from runner.kernels import MAX_ROWS
from runner.quant import int4, int8
from runner.kernels import gemm
from runner.quant.matmuls import INT4_KERNELS, INT8_KERNELS
from runner.quant.linear import Int4Linear, Int8Linear
from tests.quant.strategies import DTYPES, weights

CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def runner_kernels():
    """The registries' "runner" entries need runner's CPU kernels built and loaded."""
    from runner import kernels

    return kernels.load()


INT8_HERE = [name for name, k in INT8_KERNELS.items() if k.device in (None, "cpu")]
INT4_HERE = [name for name, k in INT4_KERNELS.items() if k.device in (None, "cpu")]


def int4_levels(packed: torch.Tensor) -> torch.Tensor:
    """Levels int64 [out, in] of neutral-layout bytes [out, in / 2]: byte j holds column 2j in its
    low nibble and column 2j + 1 in its high nibble."""
    b = packed.cpu().to(torch.int64)
    return torch.stack([b % 16, b // 16], dim=-1).reshape(b.shape[0], -1)  # [out, in/2, 2] -> [out, in]


def int4_weights(levels: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """float64 w [out, in] = (q - 8) * scale + zero, the group of column i being i // (in / groups)."""
    groupsize = levels.shape[1] // scales.shape[1]
    s = scales.cpu().double().repeat_interleave(groupsize, dim=1)  # [out, in]
    z = zeros.cpu().double().repeat_interleave(groupsize, dim=1)
    return (levels.cpu().double() - 8) * s + z


def int4_reference(layer) -> torch.Tensor:
    """The float64 weights [out, in] an Int4Linear's neutral buffers hold."""
    return int4_weights(int4_levels(layer.weight), layer.scales, layer.zeros)


# A few rows (decode, a speculative verify: runner's GEMV kernels) or a prompt's worth (more than
# MAX_ROWS: runner's kernels dequantize tiles for torch's GEMM).
ROWS = st.one_of(st.integers(1, 5), st.integers(MAX_ROWS + 1, MAX_ROWS + 24))


def tolerance(x: torch.Tensor, w_hat: torch.Tensor) -> torch.Tensor:
    m = x.double().abs() @ w_hat.double().abs().T
    eps = 0.0 if x.dtype == torch.float32 else torch.finfo(x.dtype).eps
    return m * (x.shape[-1] * 2.0 ** -23 + eps) + torch.finfo(x.dtype).tiny


def reference(x: torch.Tensor, w_hat: torch.Tensor) -> torch.Tensor:
    return x.double() @ w_hat.double().T


def linear(w: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
    layer.weight.data = w
    return layer


def activations(seed: int, rows: int, w_hat: torch.Tensor, dtype) -> torch.Tensor:
    """x [rows, in] with uneven channels; for fp16, small enough that x @ w_hat^T stays finite."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, w_hat.shape[1], generator=g) * torch.rand(w_hat.shape[1], generator=g) * 4
    if dtype == torch.float16:
        x *= min(1.0, 1e4 / max((x.abs() @ w_hat.abs().float().T).max().item(), 1e-30))
    return x.to(dtype)


@settings(max_examples=50, deadline=None)
@given(weights(max_groups=3), st.sampled_from(INT8_HERE), st.sampled_from(DTYPES), ROWS,
       st.integers(0, 2**32 - 1))
def test_int8_linear_is_x_times_dequantized_weight(case, kernel, x_dtype, rows, seed):
    w, _ = case
    layer = Int8Linear.from_float(linear(in_dtype_of(INT8_KERNELS[kernel], w)))
    assert layer.pack_for(CPU, kernel) == kernel
    w_hat = int8.dequantize(layer.weight, layer.scales)
    x = activations(seed, rows, w_hat, x_dtype).view(1, rows, -1)  # [B, T, in]
    y = layer(x)
    assert y.dtype == x_dtype and y.shape == (1, rows, w.shape[0])
    err = (y[0].double() - reference(x[0], w_hat)).abs()
    assert (err <= tolerance(x[0], w_hat)).all(), f"max error {err.max():.3g}"


def rows_to_16(w: torch.Tensor) -> torch.Tensor:
    """w with rows repeated up to a multiple of 16 (what the CPU int4 kernel takes)."""
    return w.repeat(16, 1)[: -(-w.shape[0] // 16) * 16]


def in_dtype_of(kernel, w: torch.Tensor) -> torch.Tensor:
    """w in a dtype the kernel takes (the layer's scales follow the weight's dtype)."""
    return w if kernel.dtypes is None or w.dtype in kernel.dtypes else w.to(kernel.dtypes[0])


def int4_layer(w, groupsize, kernel):
    w = in_dtype_of(INT4_KERNELS[kernel], rows_to_16(w) if kernel == "cpu" else w)
    layer = Int4Linear.from_float(linear(w), groupsize)
    assert layer.pack_for(CPU, kernel) == kernel
    return layer


@settings(max_examples=50, deadline=None)
@given(weights(max_groups=3), st.sampled_from(INT4_HERE), st.sampled_from(DTYPES), ROWS,
       st.integers(0, 2**32 - 1))
def test_int4_linear_is_x_times_dequantized_weight(case, kernel, x_dtype, rows, seed):
    w, groupsize = case
    layer = int4_layer(w, groupsize, kernel)
    w_hat = int4_reference(layer)
    x = activations(seed, rows, w_hat, x_dtype)
    y = layer(x)
    assert y.dtype == x_dtype and y.shape == (rows, layer.out_features)
    err = (y.double() - reference(x, w_hat)).abs()
    assert (err <= tolerance(x, w_hat)).all(), f"max error {err.max():.3g}"


@settings(max_examples=50, deadline=None)
@given(weights(max_groups=3, dtypes=(torch.bfloat16,)), st.integers(1, 4), st.integers(0, 2**32 - 1))
def test_int4_cpu_kernel_layout_agrees_with_the_fallback(case, rows, seed):
    w, groupsize = case
    kernel, fallback = int4_layer(rows_to_16(w), groupsize, "cpu"), int4_layer(rows_to_16(w), groupsize, "fallback")
    w_hat = int4_reference(kernel)
    x = activations(seed, rows, w_hat, torch.bfloat16)
    assert ((kernel(x).double() - fallback(x).double()).abs() <= 2 * tolerance(x, w_hat)).all()


@st.composite
def exact_cases(draw):
    """A layer and inputs whose whole computation is exact in bf16 and up: power-of-two scales,
    zeros on the grid, small levels, inputs in {-1, 0, 1} with at most 8 nonzero per row, so every
    dequantized weight and every output is a small multiple of the scale (< 256 of them)."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    out, groupsize = 16 * draw(st.integers(1, 3)), draw(st.sampled_from([32, 64]))
    n = groupsize * draw(st.integers(1, 3))
    scale = 2.0 ** draw(st.integers(-6, 2))
    x = torch.zeros(draw(st.integers(1, 4)), n)
    for row in x:
        row[torch.randperm(n, generator=g)[:8]] = torch.randint(-1, 2, (8,), generator=g).float()
    q8 = torch.randint(-15, 16, (out, n), generator=g, dtype=torch.int8)
    q4 = torch.randint(4, 13, (out, n), generator=g, dtype=torch.uint8)  # |level - 8| <= 4
    zeros = torch.randint(-3, 4, (out, n // groupsize), generator=g) * scale  # |w| <= 7 steps
    return x, q8, q4, torch.full((out,), scale), torch.full((out, n // groupsize), scale), zeros


@settings(max_examples=50, deadline=None)
@given(exact_cases(), st.sampled_from(DTYPES))
def test_every_kernel_is_exact_where_the_arithmetic_is(case, dtype):
    """A scale, zero or packing slip of any size shows here, which the rounding tolerance above can hide in bf16."""
    x, q8, q4, scales8, scales4, zeros = case
    layers = []
    for kernel in INT8_HERE:
        layer = Int8Linear(q8.shape[1], q8.shape[0], dtype)
        layer.weight, layer.scales = q8, scales8.to(dtype)
        layers.append((kernel, layer, int8.dequantize(q8, scales8)))
    for kernel in INT4_HERE:
        layer = Int4Linear.from_levels(q4, scales4.to(dtype), zeros.to(dtype))
        layers.append((kernel, layer, int4_weights(q4, scales4, zeros)))
    for kernel, layer, w_hat in layers:
        if kernel != "fallback" and dtype not in layer.KERNELS[kernel].dtypes:
            continue
        assert layer.pack_for(CPU, kernel) == kernel
        assert torch.equal(layer(x.to(dtype)).double(), reference(x, w_hat)), (type(layer).__name__, kernel)


def test_the_neutral_int4_layout_reads_as_documented():
    """Hand-built bytes with known nibbles: the reference above, and runner's int4 functions and
    fallback, read them as int4.py's docstring says."""
    packed = torch.tensor([[0x21, 0xF0, 0x98, 0x7A]], dtype=torch.uint8)
    levels = torch.tensor([[1, 2, 0, 15, 8, 9, 10, 7]])  # low nibble first: 0x21 -> 1, 2
    scales, zeros = torch.tensor([[0.5, 2.0]]), torch.tensor([[1.0, -1.0]])  # two groups of 4 columns
    expected = torch.tensor([[-2.5, -2.0, -3.0, 4.5,  # (q - 8) * 0.5 + 1
                              -1.0, 1.0, 3.0, -3.0]], dtype=torch.float64)  # (q - 8) * 2 - 1
    assert torch.equal(int4_levels(packed), levels)
    assert torch.equal(int4_weights(levels, scales, zeros), expected)
    assert torch.equal(int4.unpack(packed).long(), levels) and torch.equal(int4.pack(levels), packed)
    assert torch.equal(int4.dequantize(levels, scales, zeros).double(), expected)
    layer = Int4Linear(8, 1, 4)
    layer.weight, layer.scales, layer.zeros = packed, scales, zeros
    assert layer.kernel == "fallback"
    assert torch.equal(layer(torch.eye(8)).double(), expected.T)  # row i of eye(8) reads column i


@st.composite
def one_hot_cases(draw, rows: int = 16, groupsizes=(32, 64)):
    """(levels uint8 [out, in] over all of 0..15, scales, zeros [out, groups]) with
    scale = u * {4..7} and zero = u * {-16..16} for a power of two u, so every weight
    (q - 8) * scale + zero = u * (an integer of at most 7 bits): exact in bf16, fp16 and fp32.
    out is `rows` or twice that."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    out, groupsize = rows * draw(st.integers(1, 2)), draw(st.sampled_from(groupsizes))
    n = groupsize * draw(st.integers(1, 3))  # 3 x 32 ends a row on 48 bytes, 3 x 64 on 32 (the bf16 path's tails)
    unit = 2.0 ** draw(st.integers(-8, 4))  # fp16 keeps every weight (|w| <= 72 u) normal and finite
    q = torch.randint(0, 16, (out, n), generator=g, dtype=torch.uint8)
    scales = torch.randint(4, 8, (out, n // groupsize), generator=g) * unit
    zeros = torch.randint(-16, 17, (out, n // groupsize), generator=g) * unit
    return q, scales, zeros


@settings(max_examples=50, deadline=None)
@given(one_hot_cases(), st.sampled_from(INT4_HERE), st.sampled_from(DTYPES))
def test_every_int4_kernel_returns_each_weight_exactly_for_one_hot_inputs(case, kernel, dtype):
    """y = eye @ W^T reads every weight back; one output is one weight, so no sum can round a scale,
    zero or nibble slip away: a 1% scale error moves each weight of level 0 by 0.08 scale >= 0.32 u,
    over half a bf16 step (0.25 u at most, |w| <= 72 u)."""
    q, scales, zeros = case
    if INT4_KERNELS[kernel].dtypes is not None and dtype not in INT4_KERNELS[kernel].dtypes:
        dtype = INT4_KERNELS[kernel].dtypes[0]
    out, n = q.shape
    layer = Int4Linear(n, out, n // scales.shape[1], dtype)
    # Bytes laid out here by the documented rule: the kernels answer to it, not to runner's pack.
    layer.weight = q[:, 0::2] | (q[:, 1::2] << 4)
    layer.scales, layer.zeros = scales.to(dtype), zeros.to(dtype)
    assert layer.pack_for(CPU, kernel) == kernel
    expected = int4_weights(q, scales, zeros)  # [out, in]
    eye = torch.eye(n, dtype=dtype)
    for start in range(0, n, MAX_ROWS):  # runner's kernel takes up to MAX_ROWS rows, more go elsewhere
        y = layer(eye[start:start + MAX_ROWS])  # [rows, out]
        assert y.dtype == dtype
        assert torch.equal(y.double(), expected[:, start:start + MAX_ROWS].T), (kernel, dtype, start)


@settings(max_examples=50, deadline=None)
@given(one_hot_cases(rows=1, groupsizes=(32, 64, 128, 256)), st.integers(0, 15),
       st.sampled_from([torch.float32, torch.bfloat16]))
def test_runner_int4_op_reads_every_weight_exactly_for_any_row_count(case, extra_rows, dtype):
    """The op itself, on any number of output rows (its blocks of eight and four rows and their
    tail) and every groupsize, held to the documented layout exactly as above."""
    q, scales, zeros = case
    q, scales, zeros = (torch.cat([t, t[:extra_rows]]) for t in (q, scales, zeros))
    n = q.shape[1]
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    y = torch.ops.runner.int4_linear(torch.eye(n, dtype=dtype), packed, scales.to(dtype), zeros.to(dtype),
                                     n // scales.shape[1])
    assert torch.equal(y.double(), int4_weights(q, scales, zeros).T)


def quantized_activations(x: torch.Tensor, groupsize: int) -> torch.Tensor:
    """x as int8 activations stand for it, in float64, from the documented rule (Int4Linear's
    int8_x): per group of `groupsize` columns, d = max|x| / 127 and q = x / d rounded half to
    even, in float32; x stands for q * d."""
    xf = x.float().reshape(x.shape[0], -1, groupsize)
    d = xf.abs().amax(-1, keepdim=True) / 127
    q = torch.where(d > 0, torch.round(xf / torch.where(d > 0, d, 1)), 0)
    assert q.abs().max() <= 127
    return (q.double() * d.double()).reshape(x.shape)


@settings(max_examples=60, deadline=None)
@given(weights(max_groups=5, groupsizes=(32, 64, 128, 256), dtypes=(torch.float32, torch.bfloat16)), ROWS,
       st.integers(0, 2**32 - 1), st.booleans())
def test_int4_with_int8_activations_decodes_the_quantized_x_times_dequantized_weight(case, rows, seed, zero_group):
    # A few rows (decode, verify) multiply the int8 stand-in of x; a prompt's GEMM takes x as it is.
    w, groupsize = case
    layer = Int4Linear.from_float(linear(w), groupsize)
    assert layer.pack_for(CPU, "runner") == "runner"
    layer.int8_x = True
    w_hat = int4_reference(layer)
    x = activations(seed, rows, w_hat, w.dtype)
    if zero_group:  # an all-zero group of x: d = 0
        x[:, :groupsize] = 0
    y = layer(x)
    assert y.dtype == x.dtype and y.shape == (rows, layer.out_features)
    x_seen = quantized_activations(x, groupsize) if rows <= MAX_ROWS else x.double()
    err = (y.double() - reference(x_seen, w_hat)).abs()
    assert (err <= tolerance(x, w_hat)).all(), f"max error {err.max():.3g}"


def test_float64_activations_take_the_fallback_in_float64():
    g = torch.Generator().manual_seed(0)
    layer = Int4Linear.from_float(linear(torch.randn(32, 64, generator=g, dtype=torch.bfloat16)), 32)
    layer.pack_for(CPU)
    x = torch.randn(3, 64, generator=g, dtype=torch.float64)
    w_hat = int4_reference(layer)
    assert layer.kernel == "cpu" and layer(x).dtype == torch.float64
    assert torch.allclose(layer(x), reference(x, w_hat), rtol=1e-12, atol=1e-12)


def test_the_choice_follows_the_registry_the_shape_and_the_dtype():
    bf16 = torch.bfloat16
    assert Int4Linear.from_float(linear(torch.randn(32, 64, dtype=bf16)), 32).pack_for(CPU) == "cpu"
    assert Int4Linear.from_float(linear(torch.randn(24, 64, dtype=bf16)), 32).pack_for(CPU) == "fallback"  # 24 % 16
    assert Int4Linear.from_float(linear(torch.randn(32, 64)), 32).pack_for(CPU) == "fallback"  # fp32
    assert Int8Linear.from_float(linear(torch.randn(5, 7, dtype=bf16))).pack_for(CPU) == "cpu"
    assert Int8Linear.from_float(linear(torch.randn(5, 7, dtype=torch.float16))).pack_for(CPU) == "fallback"
    with pytest.raises(ValueError, match="multiple of 16"):
        Int4Linear.from_float(linear(torch.randn(24, 64, dtype=bf16)), 32).pack_for(CPU, "cpu")
    with pytest.raises(ValueError, match="takes bfloat16 only"):
        Int8Linear.from_float(linear(torch.randn(32, 64))).pack_for(CPU, "cpu")
    with pytest.raises(ValueError, match="runs on cuda only"):
        Int4Linear.from_float(linear(torch.randn(32, 64, dtype=bf16)), 32).pack_for(CPU, "cuda")


def test_a_layer_packed_for_another_device_refuses_to_run():
    layer = Int4Linear.from_float(linear(torch.randn(32, 64, dtype=torch.bfloat16)), 32)
    layer.pack_for(CPU)
    layer.kernel = "cuda"  # as if packed on a GPU and then moved
    with pytest.raises(RuntimeError, match="pack_for"):
        layer(torch.randn(2, 64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_prompt_through_dequantized_tiles_equals_the_whole_layer(monkeypatch, mode, dtype):
    # A prompt's GEMM takes runner's dequantized weights TILE_BYTES at a time (a 7B layer would be
    # 180 MB at once); tiles of 256 rows must give the whole layer's product, column for column.
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(600, 64, generator=gen).to(dtype)
    layer = Int8Linear.from_float(linear(w)) if mode == "int8" else Int4Linear.from_float(linear(w), 32)
    assert layer.pack_for(CPU, "runner") == "runner"
    x = torch.randn(1, MAX_ROWS + 9, 64, generator=gen).to(dtype)
    whole = layer(x)
    monkeypatch.setattr(gemm, "TILE_BYTES", 1)
    tiled = layer(x)
    assert torch.equal(tiled, whole)
    w_hat = int8.dequantize(layer.weight, layer.scales) if mode == "int8" else int4_reference(layer)
    err = (tiled[0].double() - reference(x[0], w_hat)).abs()
    assert (err <= tolerance(x[0], w_hat)).all(), f"max error {err.max():.3g}"


def quantized_blocks(x: torch.Tensor) -> torch.Tensor:
    """x as an int8 layer's int8 activations stand for it (Int8Linear's int8_x): the int4 rule
    per block of 32 columns."""
    return quantized_activations(x, 32)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 70), st.integers(1, 6), ROWS, st.sampled_from([torch.float32, torch.bfloat16]),
       st.integers(0, 2**32 - 1), st.booleans())
def test_int8_with_int8_activations_decodes_the_quantized_x_times_dequantized_weight(n, blocks, rows, dtype, seed,
                                                                                       zero_block):
    # An int4 mode's int8 output layer with quant.activations int8: x quantized per block of 32
    # columns, integer products; a prompt's GEMM takes x as it is.
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, 32 * blocks, generator=gen) * torch.rand(n, 1, generator=gen)).to(dtype)
    layer = Int8Linear.from_float(linear(w))
    assert layer.pack_for(CPU, "runner") == "runner"
    layer.int8_x = True
    w_hat = int8.dequantize(layer.weight, layer.scales)
    x = activations(seed, rows, w_hat, dtype)
    if zero_block:  # an all-zero block of x: d = 0
        x[:, :32] = 0
    y = layer(x)
    assert y.dtype == x.dtype and y.shape == (rows, n)
    x_seen = quantized_blocks(x) if rows <= MAX_ROWS else x.double()
    err = (y.double() - reference(x_seen, w_hat)).abs()
    assert (err <= tolerance(x, w_hat)).all(), f"max error {err.max():.3g}"
