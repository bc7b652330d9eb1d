"""runner's GGUF block kernels (runner/kernels/gguf.cpp) against the `gguf` package's numpy code:
dequantize_gguf equals gguf.quants.dequantize bit for bit, and gguf_linear equals a float64
x @ W^T with W that dequantized weight.

Bounds, relative to m = |x| @ |W|^T (the sum the output's rounding scales with), the form
tests/quant/test_kernels.py holds the int4 and int8 linears to:
    K * 2^-23 * m       fp32 accumulation of K products (the worst case, twice over)
  + eps(out) * m        the output's rounding to bf16
  + tiny(out)           underflow
The float path decodes each weight to exactly W's fp32 value, so only its sums round. The int8_x
path is held to the same bound against x_hat @ W^T, x_hat the activations as int8_x quantizes
them: per block of 32 columns of each row, d = max|x| / 127 and q = x / d rounded half to even,
x_hat = q d (runner.model.functional.quantize_rows on each block of 32, in fp32); its integer sums
are exact and it rounds a few times per group of 32 products.
"""
import numpy as np
import pytest
import torch
from gguf import quants
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from hypothesis import given, settings
from hypothesis import strategies as st

from runner import kernels
from runner.model import functional as fn

PROPERTY = settings(max_examples=50, deadline=None)
LEGACY = {2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0"}  # quantizable by the gguf package
K_QUANTS = {12: "Q4_K", 13: "Q5_K", 14: "Q6_K"}
TYPES = sorted(LEGACY | K_QUANTS)
# Where each type's fp16 fields (d, and a min or dmin) sit in its block.
HALVES = {2: [0], 3: [0, 2], 6: [0], 7: [0, 2], 8: [0], 12: [0, 2], 13: [0, 2], 14: [208]}


@pytest.fixture(scope="module", autouse=True)
def built():
    return kernels.load()


def sizes(qtype: int) -> tuple[int, int]:
    """(values, bytes) per block."""
    return GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]


def random_blocks(qtype: int, n: int, k: int, quantized: bool, rng: np.random.Generator) -> np.ndarray:
    """uint8 [n, k / values * bytes]: gguf's quantization of random floats, or random bytes (every
    level and sub-block scale) with each fp16 field a finite value of moderate size."""
    values, size = sizes(qtype)
    if quantized:
        return quants.quantize((rng.standard_normal((n, k)) * rng.uniform(0.01, 4)).astype(np.float32),
                               GGMLQuantizationType(qtype))
    blocks = rng.integers(0, 256, (n, k // values, size), dtype=np.uint8)
    for at in HALVES[qtype]:
        field = rng.standard_normal((n, k // values)) * 2.0 ** rng.integers(-12, 4, (n, k // values))
        blocks[..., at:at + 2] = field.astype(np.float16)[..., None].view(np.uint8)
    return blocks.reshape(n, -1)


@st.composite
def cases(draw):
    qtype = draw(st.sampled_from(TYPES))
    values, _ = sizes(qtype)
    k = values * draw(st.integers(1, 3072 // values))
    quantized = qtype in LEGACY and draw(st.booleans())
    return qtype, draw(st.integers(1, 24)), k, quantized, draw(st.integers(0, 2**32 - 1))


def dequantized(blocks: np.ndarray, qtype: int) -> torch.Tensor:
    return torch.from_numpy(quants.dequantize(blocks, GGMLQuantizationType(qtype)))


@PROPERTY
@given(case=cases())
def test_dequantize_gguf_is_gguf_bit_for_bit(case):
    qtype, n, k, quantized, seed = case
    blocks = random_blocks(qtype, n, k, quantized, np.random.default_rng(seed))
    reference = dequantized(blocks, qtype)
    ours = torch.ops.runner.dequantize_gguf(torch.from_numpy(blocks), qtype, torch.float32)
    assert ours.dtype == torch.float32 and ours.shape == (n, k)
    assert torch.equal(ours.view(torch.int32), reference.view(torch.int32))
    ours = torch.ops.runner.dequantize_gguf(torch.from_numpy(blocks), qtype, torch.bfloat16)
    assert ours.dtype == torch.bfloat16 and torch.equal(ours, reference.to(torch.bfloat16))


def bound(x: torch.Tensor, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    m = x.double().abs() @ w.double().abs().T
    eps = 0.0 if dtype == torch.float32 else torch.finfo(dtype).eps
    return m * (x.shape[-1] * 2.0**-23 + eps) + torch.finfo(dtype).tiny


def activations(rows: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """x [rows, k] with uneven columns, some blocks of 32 all zero (a zero int8_x scale)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g) * torch.rand(k, generator=g) * 4
    x.view(rows, k // 32, 32)[torch.rand(rows, k // 32, generator=g) < 0.05] = 0
    return x.to(dtype)


def int8_grid(x: torch.Tensor) -> torch.Tensor:
    """x as int8_x quantizes it, dequantized: q d per block of 32 columns of each row, in fp32."""
    rows, k = x.shape
    q, d = fn.quantize_rows(x.view(rows, k // 32, 32))  # [rows, k / 32, 32], [rows, k / 32]
    return (q.float() * d[..., None]).view(rows, k)


@PROPERTY
@given(case=cases(), rows=st.integers(1, kernels.MAX_ROWS), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       int8_x=st.booleans())
def test_gguf_linear_is_x_times_the_dequantized_weight(case, rows, dtype, int8_x):
    qtype, n, k, quantized, seed = case
    blocks = random_blocks(qtype, n, k, quantized, np.random.default_rng(seed))
    w = dequantized(blocks, qtype)
    x = activations(rows, k, dtype, seed)
    ours = torch.ops.runner.gguf_linear(x, torch.from_numpy(blocks), qtype, int8_x)
    assert ours.dtype == dtype and ours.shape == (rows, n)
    x_hat = int8_grid(x) if int8_x else x
    error = (ours.double() - x_hat.double() @ w.double().T).abs()
    assert (error <= bound(x_hat, w, dtype)).all(), f"max error {error.max():.3g}"


@pytest.mark.parametrize("int8_x", [False, True])
def test_gguf_linear_splits_rows_across_threads(int8_x):
    blocks = random_blocks(12, 1031, 512, False, np.random.default_rng(0))
    w = dequantized(blocks, 12)
    x = activations(3, 512, torch.float32, 1)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ours = torch.ops.runner.gguf_linear(x, torch.from_numpy(blocks), 12, int8_x)
    finally:
        torch.set_num_threads(before)
    x_hat = int8_grid(x) if int8_x else x
    assert ((ours.double() - x_hat.double() @ w.double().T).abs() <= bound(x_hat, w, torch.float32)).all()


@PROPERTY
@given(qtype=st.sampled_from(TYPES), rows=st.integers(1, kernels.MAX_ROWS), n=st.integers(1, 9),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), int8_x=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_gguf_linear_gives_a_row_the_same_bits_whatever_rows_share_the_call(qtype, rows, n, dtype, int8_x, seed):
    # Batch invariance: a decode step's logits must not depend on which other sequences share it.
    values, _ = sizes(qtype)
    k = values * (1 + seed % (1024 // values))
    blocks = torch.from_numpy(random_blocks(qtype, n, k, False, np.random.default_rng(seed)))
    x = activations(rows, k, dtype, seed)
    together = torch.ops.runner.gguf_linear(x, blocks, qtype, int8_x)
    for i in range(rows):
        alone = torch.ops.runner.gguf_linear(x[i:i + 1], blocks, qtype, int8_x)
        assert torch.equal(together[i:i + 1], alone), f"row {i} of {rows}"


def test_int8_x_quantizes_each_block_of_32_on_its_own():
    # One block's large values must not coarsen its neighbour's grid: with one scale for the row,
    # the second block's 0.001s would round to 0.
    x = torch.cat([torch.full((32,), 1.0), torch.full((32,), 0.001)]).view(1, 64)
    blocks = quants.quantize(np.ones((1, 64), np.float32), GGMLQuantizationType.Q8_0)
    w = dequantized(blocks, 8).double()
    ours = torch.ops.runner.gguf_linear(x, torch.from_numpy(blocks), 8, True).double()
    per_row = fn.dequantize_rows(*fn.quantize_rows(x), torch.float32).double() @ w.T
    per_block = int8_grid(x).double() @ w.T
    assert (ours - per_block).abs().item() <= bound(x, w, torch.float32).item() < (per_block - per_row).abs().item()


@pytest.mark.parametrize("call, message", [
    (lambda: torch.ops.runner.gguf_linear(torch.ones(1, 32), torch.zeros(4, 18, dtype=torch.uint8), 1), "GGUF type 1"),
    (lambda: torch.ops.runner.dequantize_gguf(torch.zeros(4, 18, dtype=torch.uint8), 10, torch.float32), "GGUF type 10"),
    (lambda: torch.ops.runner.gguf_linear(torch.ones(1, 32), torch.zeros(4, 19, dtype=torch.uint8), 2), "18-byte blocks"),
    (lambda: torch.ops.runner.gguf_linear(torch.ones(1, 64), torch.zeros(4, 18, dtype=torch.uint8), 2), "K = 32"),
    (lambda: torch.ops.runner.gguf_linear(torch.ones(1, 32), torch.zeros(4, 18, dtype=torch.int8), 2), "uint8"),
    (lambda: torch.ops.runner.dequantize_gguf(torch.zeros(4, 18, dtype=torch.uint8), 2, torch.float16), "dtype"),
])
def test_bad_arguments_are_refused_by_name(call, message):
    with pytest.raises(RuntimeError, match=message):
        call()


@pytest.mark.parametrize("qtype", TYPES)
def test_fake_implementations_give_the_ops_shapes(qtype):
    from torch._subclasses.fake_tensor import FakeTensorMode

    values, size = sizes(qtype)
    with FakeTensorMode():
        blocks = torch.empty(5, 2 * size, dtype=torch.uint8)
        y = torch.ops.runner.gguf_linear(torch.empty(3, 2 * values, dtype=torch.bfloat16), blocks, qtype)
        w = torch.ops.runner.dequantize_gguf(blocks, qtype, torch.bfloat16)
    assert y.shape == (3, 5) and y.dtype == torch.bfloat16
    assert w.shape == (5, 2 * values) and w.dtype == torch.bfloat16
