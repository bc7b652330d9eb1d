"""Prompt-shaped matmuls (more rows than the GEMV kernels take): torch's GEMM on weights made
float a tile at a time, widened from bf16 or dequantized from int8/int4 by runner's kernels, in
the dtype the caller says (runner.kernels.prompt_dtype).

A bf16 prompt computed in fp32 has x and each tile widened exactly and the product rounded once
to bf16 at the end: what a bf16 GEMM's fp32 accumulation gives, up to the order of its sums.
Widening a tile costs one read of the weights, small beside a prompt's multiply-adds.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

TILE_BYTES = 8 << 20  # a tile of float weights: a few MB, not a 7B layer's 180


# tile(rows, dtype): the weights' rows [rows] as a float [len, K] matrix in dtype
Tile = Callable[[slice, torch.dtype], torch.Tensor]


def tiled(x: torch.Tensor, out_features: int, tile: Tile, dtype: torch.dtype) -> torch.Tensor:
    """x [M, K] @ W.T -> [M, out_features] in x's dtype, computed in `dtype`, W's rows made
    float by `tile` a few MB at a time (one GEMM where the layer fits one tile: no concatenation)."""
    wide = x.to(dtype)
    step = max(256, TILE_BYTES // (x.shape[-1] * wide.element_size()))
    if out_features <= step:
        y = F.linear(wide, tile(slice(0, out_features), dtype))
    else:
        y = torch.cat([F.linear(wide, tile(slice(start, start + step), dtype))
                       for start in range(0, out_features, step)], dim=-1)
    return y.to(x.dtype)


def linear(x: torch.Tensor, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x [..., K] @ w.T for a float w in x's dtype, computed in `dtype` (w widened a tile at a time)."""
    if dtype == x.dtype:
        return F.linear(x, w)
    flat = x.reshape(-1, x.shape[-1])
    y = tiled(flat, w.shape[0], lambda rows, wide: w[rows].to(wide), dtype)
    return y.reshape(*x.shape[:-1], w.shape[0])
