"""GGUF blocks as stored (runner/quant/gguf.py, gguf_layers.py): their values are the gguf
package's own dequantize, bit for bit; the layers multiply and split by them."""
import gguf
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.quant import gguf as blocks_math
from runner.quant.gguf_layers import GGUFEmbedding, GGUFLinear

Q = gguf.GGMLQuantizationType
# Where each type keeps its fp16 fields (d, and dmin or m), as byte offsets in a block.
HALVES = {Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2),
          Q.Q6_K: (208,)}
LEGACY = (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0)  # the types the gguf package can also quantize


def random_blocks(kind: Q, rows: int, n_blocks: int, seed: int, scale: float = 1.0) -> np.ndarray:
    """Rows of random bytes as blocks of `kind`, every fp16 field a finite value of about `scale`
    (every level, sign and sub-block scale occurs)."""
    rng = np.random.default_rng(seed)
    size, type_size = gguf.GGML_QUANT_SIZES[kind]
    data = rng.integers(0, 256, size=(rows * n_blocks, type_size), dtype=np.uint8)
    for at in HALVES[kind]:
        halves = (rng.standard_normal(rows * n_blocks) * scale).astype(np.float16)
        data[:, at:at + 2] = halves.view(np.uint8).reshape(-1, 2)
    return data.reshape(rows, n_blocks * type_size)


def exact(ours: torch.Tensor, theirs: np.ndarray) -> bool:
    """Bit for bit (signed zeros too): both fp32, compared as integers."""
    return ours.dtype == torch.float32 and torch.equal(ours.view(torch.int32), torch.from_numpy(theirs).view(torch.int32))


@settings(max_examples=80, deadline=None)
@given(st.sampled_from(blocks_math.SUPPORTED), st.integers(1, 6), st.integers(1, 4), st.integers(0, 2**32 - 1),
       st.sampled_from([1e-4, 1.0, 300.0]))
def test_random_blocks_dequantize_as_gguf_does_bit_for_bit(kind, rows, n_blocks, seed, scale):
    data = random_blocks(kind, rows, n_blocks, seed, scale)
    ours = blocks_math.dequantize(torch.from_numpy(data), kind)
    theirs = gguf.quants.dequantize(data, kind)
    assert ours.shape == theirs.shape == (rows, n_blocks * blocks_math.block_size(kind))
    assert exact(ours, theirs)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(LEGACY), st.integers(1, 5), st.integers(1, 6), st.integers(0, 2**32 - 1))
def test_blocks_the_gguf_quantizers_write_dequantize_bit_for_bit(kind, rows, n_blocks, seed):
    w = np.random.default_rng(seed).standard_normal((rows, n_blocks * 32)).astype(np.float32)
    data = gguf.quants.quantize(w, kind)
    assert exact(blocks_math.dequantize(torch.from_numpy(data), kind), gguf.quants.dequantize(data, kind))


def test_sizes_follow_the_block_table():
    assert blocks_math.row_bytes(Q.Q4_K, 512) == 288 and blocks_math.row_values(Q.Q4_K, 288) == 512
    assert blocks_math.row_bytes(Q.Q8_0, 64) == 68 and blocks_math.block_size(Q.Q6_K) == 256


def _linear(kinds, width, rows, seed):
    parts = [(kind, torch.from_numpy(random_blocks(kind, r, width // blocks_math.block_size(kind), seed + i, 0.01)))
             for i, (kind, r) in enumerate(zip(kinds, rows))]
    return GGUFLinear(width, parts), parts


@settings(max_examples=30, deadline=None)
@given(st.lists(st.sampled_from(blocks_math.SUPPORTED), min_size=1, max_size=3), st.integers(0, 2**16),
       st.integers(1, 20), st.sampled_from([torch.float32, torch.bfloat16]))
def test_a_layer_of_parts_multiplies_by_their_rows_stacked(kinds, seed, m, dtype):
    layer, parts = _linear(kinds, 256, [3 + i for i in range(len(kinds))], seed)
    w = torch.cat([blocks_math.dequantize(b, k) for k, b in parts]).double()
    x = torch.randn(m, 256, generator=torch.Generator().manual_seed(seed)).to(dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (m, layer.out_features)
    expected = x.double() @ w.T
    bound = (x.double().abs() @ w.abs().T) * (256 * 2**-24) + (expected.abs() * 2**-8 if dtype == torch.bfloat16 else 0)
    assert ((y.double() - expected).abs() <= bound + 1e-30).all()
    assert torch.equal(layer.dequantize(), w.float())


def test_splitting_rows_across_parts_and_whole_blocks_of_columns():
    layer, _ = _linear([Q.Q8_0, Q.Q4_1, Q.Q6_K], 512, [4, 5, 6], 7)
    w = layer.dequantize()
    rows = torch.tensor([1, 3, 4, 8, 9, 14])  # parts 0, 1 and 2
    out = GGUFLinear(512, layer.parts)
    out.shard_("out", rows)
    assert torch.equal(out.dequantize(), w[rows]) and out.out_features == 6 and out.kinds == [Q.Q8_0, Q.Q4_1, Q.Q6_K]
    cols = torch.arange(256, 512)  # the second block of 256: whole blocks of every part's type
    layer.shard_("in", cols)
    assert torch.equal(layer.dequantize(), w[:, cols]) and layer.in_features == 256


def test_a_column_split_inside_a_block_is_refused_naming_the_block_size():
    layer, _ = _linear([Q.Q4_K], 512, [4], 3)
    with pytest.raises(ValueError, match="whole blocks of 256"):
        layer.shard_("in", torch.arange(128, 384))


def test_the_embedding_dequantizes_only_the_rows_looked_up():
    data = torch.from_numpy(random_blocks(Q.Q8_0, 50, 2, 5))
    table = GGUFEmbedding(Q.Q8_0, data).to(torch.bfloat16)
    tokens = torch.tensor([[3, 49, 3]])
    rows = table(tokens)
    assert rows.dtype == torch.bfloat16 and rows.shape == (1, 3, 64)
    assert torch.equal(rows, blocks_math.dequantize(data, Q.Q8_0)[tokens].bfloat16())


def test_neighbouring_parts_of_one_type_become_one_part_with_the_same_rows():
    layer, parts = _linear([Q.Q8_0, Q.Q8_0, Q.Q4_1, Q.Q8_0], 64, [2, 3, 4, 5], 11)
    assert layer.kinds == [Q.Q8_0, Q.Q4_1, Q.Q8_0] and layer.out_features == 14
    assert torch.equal(layer.dequantize(), torch.cat([blocks_math.dequantize(b, k) for k, b in parts]))
