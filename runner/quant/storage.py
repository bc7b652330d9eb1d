"""Storing a float quantization parameter in the model's dtype without breaking its error bound."""
from __future__ import annotations

import torch


def round_up(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x (fp32, >= 0) as `dtype`, never below x and never below dtype's smallest normal.

    A scale rounded down would let the largest weight of a row or group fall outside the
    quantization grid; rounding up keeps every weight within half a (stored) step.
    The floor keeps all-zero rows and groups from dividing by zero (and away from
    subnormals, which some CPUs flush to zero).
    """
    x = x.float().clamp(min=torch.finfo(dtype).tiny)
    stored = x.to(dtype)
    return torch.where(stored.float() < x, torch.nextafter(stored, torch.full_like(stored, float("inf"))), stored)
