"""int4 weight-only quantization: asymmetric, a scale and a zero per group of input columns.

    w[o, i] ~= (q[o, i] - 8) * scale[o, g] + zero[o, g]     g = i // groupsize, q in 0..15

This is the zero-point convention of torch's int4 kernels (tinygemm): `zero` is the value
of the middle level q = 8, a float in the model's dtype, so no conversion is needed.

Neutral (device-independent) layout, what a checkpoint stores:
    weight  uint8 [out, in / 2]   column 2j in the low nibble, column 2j + 1 in the high nibble
    scales  [out, in / groupsize] the model's float dtype
    zeros   [out, in / groupsize]
"""
from __future__ import annotations

import torch

from runner.quant.storage import round_up

LEVELS = 16
MID = 8  # the level whose value is `zero`


def group_params(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero [...] (as `dtype`) for groups w [..., groupsize] whose 16 levels span [min, max].

    The zero is rounded to `dtype` first, then the step widened just enough that the levels
    zero - 8 * scale .. zero + 7 * scale still cover the group's range despite that rounding.
    """
    wf = w.float()
    lo, hi = wf.amin(dim=-1), wf.amax(dim=-1)
    zero = (lo + MID * (hi - lo) / (LEVELS - 1)).to(dtype)
    zf = zero.float()
    scale = round_up(torch.maximum((zf - lo) / MID, (hi - zf) / (LEVELS - 1 - MID)), dtype)
    return scale, zero


def quantize_with(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Levels q uint8 for w [..., n] on the grid of scale, zero [..., 1] (broadcast): nearest, clamped."""
    q = torch.round((w.float() - zero.float()) / scale.float()) + MID
    return q.clamp(0, LEVELS - 1).to(torch.uint8)


def quantize(w: torch.Tensor, groupsize: int, scale_dtype: torch.dtype | None = None):
    """Round to nearest: q uint8 [out, in] (unpacked levels), scales and zeros [out, in / groupsize].

    Every |w - dequantized| <= its group's scale / 2, up to fp32 rounding.
    """
    out, n = w.shape
    if n % groupsize:
        raise ValueError(f"groupsize {groupsize} does not divide the {n} input columns")
    groups = w.reshape(out, n // groupsize, groupsize)  # [out, G, gs]
    scales, zeros = group_params(groups, scale_dtype or w.dtype)  # [out, G]
    q = quantize_with(groups, scales[..., None], zeros[..., None])  # [out, G, gs]
    return q.reshape(out, n), scales, zeros


def dequantize(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """The fp32 weights [..., out, in] for levels q [..., out, in] and scales, zeros [..., out, G]."""
    groups = q.unflatten(-1, (scales.shape[-1], -1)).float()  # [..., out, G, gs]
    w = (groups - MID) * scales.float()[..., None] + zeros.float()[..., None]
    return w.flatten(-2)


def pack(q: torch.Tensor) -> torch.Tensor:
    """Levels q [out, in] (0..15, in even) -> uint8 [out, in / 2], even column in the low nibble."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., out, in / 2] -> levels uint8 [..., out, in]; the inverse of pack."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)  # [..., in/2, 2] -> [..., in]


def scales_and_zeros(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """The kernels' parameter layout: [G, out, 2] with [..., 0] the scale and [..., 1] the zero."""
    return torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()
