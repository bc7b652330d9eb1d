"""The analytic error bounds of round-to-nearest quantization, shared by the tests.

An element w quantized with a stored step s (the row's scale for int8, the group's for int4)
comes back within half a step: |w - w_hat| <= s / 2. The fp32 arithmetic of quantize and
dequantize adds at most a few units of 2^-24: the quotient (w - zero) / s (magnitude <= 128)
and the product (q - 8) * s are each off by <= 2^-17 s, and the final addition of the zero
by <= 2^-24 |w_hat|. So the tests check, in float64,

    |w - w_hat| <= s * (1/2 + 2^-15) + 2^-22 * |w|

and, so that a huge step cannot pass, that s is no coarser than the range needs:
    int8  s <= max(amax / 127 * (1 + eps), tiny)
    int4  s <= max(((max - min) / 15 + eps * max(|min|, |max|) / 14) * (1 + eps), tiny)
eps and tiny being those of the scales' dtype (one upward rounding to it; for int4 the zero's
rounding to it, <= eps/2 * |zero|, widens the step by at most a seventh of that).
"""
import torch

SLACK_STEP, SLACK_VALUE = 2.0 ** -15, 2.0 ** -22


def within_half_step(w: torch.Tensor, w_hat: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Boolean [out, in]: every element within its bound; step broadcast to [out, in]."""
    w, w_hat, step = w.double(), w_hat.double(), step.double()
    return (w - w_hat).abs() <= step * (0.5 + SLACK_STEP) + SLACK_VALUE * w.abs()


def step_limit_int8(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    info = torch.finfo(dtype)
    amax = w.double().abs().amax(dim=1)
    return torch.clamp(amax / 127 * (1 + info.eps) * (1 + 2.0 ** -20), min=info.tiny)


def step_limit_int4(w: torch.Tensor, groupsize: int, dtype: torch.dtype) -> torch.Tensor:
    info = torch.finfo(dtype)
    groups = w.double().reshape(w.shape[0], -1, groupsize)
    lo, hi = groups.amin(-1), groups.amax(-1)
    limit = ((hi - lo) / 15 + info.eps * torch.maximum(lo.abs(), hi.abs()) / 14) * (1 + info.eps) * (1 + 2.0 ** -20)
    return torch.clamp(limit, min=info.tiny)
