"""Weight matrices that stress quantization: varied shapes and magnitudes, outliers, zero rows and
groups, constant groups and rows far from zero; and tiny random Transformers."""
from __future__ import annotations

import torch
from hypothesis import strategies as st

from runner.config.schema import INT4_GROUPSIZES, ModelSpec

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@st.composite
def weights(draw, groupsizes=INT4_GROUPSIZES, max_groups: int = 4, max_rows: int = 40, dtypes=DTYPES):
    """(w [out, in] in a float dtype, groupsize dividing in)."""
    groupsize = draw(st.sampled_from(groupsizes))
    out, n = draw(st.integers(1, max_rows)), groupsize * draw(st.integers(1, max_groups))
    dtype = draw(st.sampled_from(dtypes))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    w = torch.randn(out, n, generator=g) * 10 ** draw(st.floats(-4, 2))
    w *= 10 ** (torch.rand(out, 1, generator=g) * 2 - 1)  # rows an order of magnitude apart
    if draw(st.booleans()):  # outliers
        spots = torch.rand(out, n, generator=g) < 0.01
        w = torch.where(spots, w * draw(st.floats(10, 100)), w)
    if draw(st.booleans()):  # rows offset from zero (asymmetric ranges)
        w += torch.randn(out, 1, generator=g) * w.abs().amax() * 3
    if draw(st.booleans()):
        w[draw(st.integers(0, out - 1))] = 0  # an all-zero row
    if draw(st.booleans()):
        row, group = draw(st.integers(0, out - 1)), draw(st.integers(0, n // groupsize - 1))
        w[row, group * groupsize:(group + 1) * groupsize] = 0  # an all-zero group
    if draw(st.booleans()):
        row, group = draw(st.integers(0, out - 1)), draw(st.integers(0, n // groupsize - 1))
        w[row, group * groupsize:(group + 1) * groupsize] = draw(st.floats(-3, 3))  # a constant group
    return within_range_of(dtype, w).to(dtype), groupsize


def within_range_of(dtype: torch.dtype, w: torch.Tensor) -> torch.Tensor:
    """w clamped to what `dtype` holds with room to spare: scales and zeros stored in a narrower
    dtype than the weights (never the case in a model, where both are the model's) could overflow."""
    limit = torch.finfo(dtype).max / 4
    return w.float().clamp(-limit, limit).to(w.dtype)


@st.composite
def tiny_specs(draw) -> ModelSpec:
    """Small MHA/GQA models, tied or not; every linear's input width is a multiple of 32 (int4-ready)."""
    n_heads = 2 * draw(st.integers(1, 2))
    return ModelSpec(
        dim=n_heads * 16 * draw(st.integers(1, 2)), n_layers=draw(st.integers(1, 2)), n_heads=n_heads,
        n_kv_heads=draw(st.sampled_from([n for n in (1, 2, n_heads) if n_heads % n == 0])),
        vocab_size=draw(st.integers(16, 200)), intermediate_size=32 * draw(st.integers(1, 3)),
        max_seq_len=64, tie_embeddings=draw(st.booleans()),
    )
