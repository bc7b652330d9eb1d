"""GPTQ (Frantar et al., 2022) for one weight matrix, on the int4 groupwise layout.

Quantizes the columns (inputs) of W one at a time, in order, and spreads each column's
rounding error over the columns not yet quantized so as to minimise ||X W^T - X Wq^T||^2,
using the inverse Hessian H^-1 of that objective, H = 2 X^T X / n. "Lazy batch" updates
apply the spread to the columns beyond the current block once per block; this changes
the speed, not the result. A group's scale and zero are computed from its columns as
updated when the group's first column is reached (static groups, no act-order).

Last, each row keeps whichever of GPTQ's levels and round-to-nearest's has the smaller
calibration error (w - w_hat) H (w - w_hat)^T. On degenerate calibration data (activations
of very low rank) the error feedback can push later columns of a group outside the grid
fixed at its first column, and clamping them can then lose to plain rounding; the row
choice makes "never worse than round-to-nearest on the calibration set" a guarantee.
"""
from __future__ import annotations

import torch

import runner.quant.int4 as int4


class NotPositiveDefinite(ValueError):
    """The damped Hessian has no Cholesky factor: more damping is needed."""


def hessian_add(h: torch.Tensor, count: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Fold activations x [..., in] into the running H = 2 X^T X / count (fp64 [in, in])."""
    x = x.reshape(-1, x.shape[-1]).double()  # [m, in]
    m = x.shape[0]
    h = h * (count / (count + m)) + (x.T @ x) * (2 / (count + m))
    return h, count + m


def inverse_hessian_factor(h: torch.Tensor, damping: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damping * mean(diag H) * I)^-1, so that H^-1 = U^T U.

    An input that was zero on every calibration token (diag 0) is decoupled: its column is
    rounded to nearest and neither receives nor spreads error (the reference implementation
    zeroes such weights instead, which would change the layer for inputs unseen in calibration).
    """
    h = h.clone()
    dead = torch.diagonal(h) == 0
    h[dead, :] = 0
    h[:, dead] = 0
    h[dead, dead] = 1
    h.diagonal().add_(damping * torch.diagonal(h).mean())
    factor, info = torch.linalg.cholesky_ex(h)
    if info != 0:
        raise NotPositiveDefinite("the damped Hessian is not positive definite")
    inverse = torch.cholesky_inverse(factor)
    upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
    if info != 0:
        raise NotPositiveDefinite("the inverse Hessian is not positive definite")
    return upper


def quantize(w: torch.Tensor, h: torch.Tensor, groupsize: int, damping: float = 0.01,
             block_size: int = 128, scale_dtype: torch.dtype | None = None):
    """GPTQ levels q uint8 [out, in], scales and zeros [out, in / groupsize] for w [out, in].

    h [in, in] is the layer's Hessian (hessian_add). Blocks are widened to whole groups
    so that every group's parameters see all the error fed into it.
    """
    scale_dtype = scale_dtype or w.dtype
    out, n = w.shape
    u = inverse_hessian_factor(h, damping).float()  # [in, in], upper
    original = w
    w = w.float().clone()
    q = torch.empty(out, n, dtype=torch.uint8, device=w.device)
    groups = n // groupsize
    scales = torch.empty(out, groups, dtype=scale_dtype, device=w.device)
    zeros = torch.empty(out, groups, dtype=scale_dtype, device=w.device)
    block = -(-block_size // groupsize) * groupsize
    for start in range(0, n, block):
        end = min(start + block, n)
        wb = w[:, start:end].clone()  # [out, b]: this block, updated column by column
        ub = u[start:end, start:end]  # [b, b]
        errors = torch.zeros_like(wb)  # [out, b]: each column's error / its pivot
        for i in range(end - start):
            col = start + i
            if col % groupsize == 0:
                g = col // groupsize
                scales[:, g], zeros[:, g] = int4.group_params(wb[:, i:i + groupsize], scale_dtype)
            s, z = scales[:, col // groupsize, None], zeros[:, col // groupsize, None]  # [out, 1]
            levels = int4.quantize_with(wb[:, i:i + 1], s, z)  # [out, 1]
            q[:, col] = levels[:, 0]
            rounded = (levels.float() - int4.MID) * s.float() + z.float()  # [out, 1]
            errors[:, i] = (wb[:, i] - rounded[:, 0]) / ub[i, i]
            wb[:, i:] -= errors[:, i:i + 1] * ub[i:i + 1, i:]  # [out, 1] x [1, b - i]
        w[:, end:] -= errors @ u[start:end, end:]  # lazy batch update of the later columns
    rounded = int4.quantize(original, groupsize, scale_dtype)
    keep = row_errors(original, (q, scales, zeros), h) <= row_errors(original, rounded, h)  # [out]
    return tuple(torch.where(keep[:, None], mine, theirs) for mine, theirs in zip((q, scales, zeros), rounded))


def row_errors(w: torch.Tensor, quantized, h: torch.Tensor) -> torch.Tensor:
    """Each row's calibration error (w - w_hat) H (w - w_hat)^T [out] for quantized = (q, scales, zeros)."""
    d = (w.double() - int4.dequantize(*quantized).double())  # [out, in]
    return ((d @ h) * d).sum(dim=1)
