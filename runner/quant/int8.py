"""int8 weight-only quantization: symmetric, one scale per output channel.

    w[o, i] ~= q[o, i] * scale[o]     q int8 in [-127, 127], scale in the weight's float dtype

The neutral layout (what a checkpoint stores) is exactly what torch's CPU kernel takes.
"""
from __future__ import annotations

import torch

from runner.quant.storage import round_up

QMAX = 127  # symmetric: -128 is never used, so negation is exact


def quantize(w: torch.Tensor, scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q int8 [out, in] and scales [out] (in scale_dtype, default w's) for w [out, in].

    Every |w - q * scale| <= scale / 2, up to fp32 rounding (see tests/quant/test_int8.py).
    """
    wf = w.float()
    scales = round_up(wf.abs().amax(dim=1) / QMAX, scale_dtype or w.dtype)  # [out]
    q = torch.round(wf / scales.float()[:, None]).clamp(-QMAX, QMAX).to(torch.int8)  # [out, in]
    return q, scales


def dequantize(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The fp32 weights [..., out, in] that q [..., out, in] and scales [..., out] stand for."""
    return q.float() * scales.float()[..., None]
