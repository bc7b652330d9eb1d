"""RoPE for every scaling type HF transformers defines: the inverse frequencies, and the module that
turns positions into cos and sin.

Each type's formula follows transformers' ROPE_INIT_FUNCTIONS op for op in fp32, so where the ops
run on the same device the values are HF's to the last bit. `dim` is the rotary dimension: with a
partial rotary factor, only that many leading dimensions of each head turn.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from runner.config.schema import ROPE_TYPES, RopeScaling


def frequencies(dim: int, theta: float, scaling: RopeScaling | None = None, max_position_embeddings: int | None = None,
                seq_len: int | torch.Tensor | None = None, device=None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim // 2] (fp32) and the attention factor cos and sin are multiplied by.

    seq_len matters to two types. dynamic: the base grows with seq_len past max_position_embeddings
    (an int computes as HF's init does, a 0-dim tensor as HF's per-forward update does). longrope:
    long factors when seq_len > original_max_position_embeddings, short ones otherwise (and for None).
    """
    if scaling is None:
        return _default(dim, theta, device), 1.0
    return _TYPES[scaling.type](dim, theta, scaling, max_position_embeddings, seq_len, device)


def _exponents(dim: int, device=None) -> torch.Tensor:
    return torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim  # [dim // 2]


def _default(dim: int, theta: float, device=None) -> torch.Tensor:
    return 1.0 / (theta ** _exponents(dim, device))


def _linear(dim, theta, scaling, max_position_embeddings, seq_len, device):
    return _default(dim, theta, device) / scaling.factor, 1.0


def _llama3(dim, theta, scaling, max_position_embeddings, seq_len, device):
    inv_freq = _default(dim, theta, device)
    original, factor = scaling.original_max_position_embeddings, scaling.factor
    low_wavelen = original / scaling.low_freq_factor
    high_wavelen = original / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed by `factor`, short ones kept; in between, interpolate.
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    mid = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(mid, blended, scaled), 1.0


def _dynamic(dim, theta, scaling, max_position_embeddings, seq_len, device):
    # NTK: the base rises so that the longest wavelength spans seq_len. A tensor seq_len stays a
    # tensor (fp32 arithmetic, no host sync), as in HF's per-forward update.
    factor, exponent = scaling.factor, dim / (dim - 2)
    if isinstance(seq_len, torch.Tensor):
        seq_len = seq_len.clamp(min=max_position_embeddings)
        base = theta * ((factor * seq_len / max_position_embeddings) - (factor - 1)) ** exponent
        return 1.0 / (base ** _exponents(dim, seq_len.device)), 1.0
    seq_len = max(seq_len or max_position_embeddings, max_position_embeddings)
    base = theta * ((factor * seq_len / max_position_embeddings) - (factor - 1)) ** exponent
    return _default(dim, base, device), 1.0


def _mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature (its paper's eq. 21)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(dim, theta, scaling, max_position_embeddings, seq_len, device):
    factor, original = scaling.factor, scaling.original_max_position_embeddings
    attention_factor = scaling.attention_factor
    if attention_factor is None and scaling.mscale and scaling.mscale_all_dim:
        attention_factor = float(_mscale(factor, scaling.mscale) / _mscale(factor, scaling.mscale_all_dim))
    elif attention_factor is None:
        attention_factor = _mscale(factor)
    beta_fast, beta_slow = scaling.beta_fast or 32, scaling.beta_slow or 1  # HF's `or`: 0 means the default

    def correction_dim(rotations: float) -> float:
        """The dimension whose wavelength turns `rotations` times over the original length."""
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as HF: keeps the ramp finite
    # Dimensions below `low` keep RoPE's frequencies (extrapolate), above `high` are divided by
    # `factor` (interpolate), and a linear ramp blends the band between.
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1).to(device)
    pos_freqs = theta ** _exponents(dim, device)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp
    return interpolation * (1 - keep) + extrapolation * keep, attention_factor


def _longrope(dim, theta, scaling, max_position_embeddings, seq_len, device):
    original = scaling.original_max_position_embeddings
    attention_factor = scaling.attention_factor
    if attention_factor is None:
        factor = scaling.factor
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    ext = scaling.long_factor if seq_len and seq_len > original else scaling.short_factor
    ext = torch.tensor(ext, dtype=torch.float32, device=device)
    return 1.0 / (ext * theta ** _exponents(dim, device)), attention_factor


_TYPES = {"linear": _linear, "llama3": _llama3, "dynamic": _dynamic, "yarn": _yarn, "longrope": _longrope}
assert set(_TYPES) == set(ROPE_TYPES), "every RoPE type the schema accepts has its formula here"


def table(inv_freq: torch.Tensor, max_len: int, attention_factor: float = 1.0) -> torch.Tensor:
    """cos and sin for positions 0..max_len-1: [max_len, 2, dim], times attention_factor."""
    angles = torch.arange(max_len, device=inv_freq.device).float()[:, None] * inv_freq  # [max_len, dim // 2]
    return _cos_sin(angles, attention_factor)


def _cos_sin(angles: torch.Tensor, attention_factor: float) -> torch.Tensor:
    """angles [..., dim // 2] -> [..., 2, dim]: cos then sin, "rotate half" layout."""
    angles = torch.cat([angles, angles], dim=-1)
    return torch.stack([angles.cos() * attention_factor, angles.sin() * attention_factor], dim=-2)


class Rope(nn.Module):
    """cos and sin for positions, as HF's rotary embedding gives them in each forward.

    Static types read a table built by setup(). Two types depend on how far a forward reaches,
    seq_len = max(input_pos) + 1 over the call's tokens of each row (HF takes it over the batch;
    a row here is the sequence it would be alone, whatever its batch-mates): longrope reads its
    long-factor table once seq_len passes original_max_position_embeddings, dynamic recomputes its
    frequencies from seq_len. Both stay on the device (no host sync), so a compiled step traces
    them. Each forward stands alone: HF's dynamic also keeps the longest forward's frequencies for a
    later one that reaches past max_position_embeddings but not as far (the same whenever lengths
    only grow, as in one generation). A forward's tokens share one choice, as in HF, so a chunk or
    a speculative round that crosses the switch turns its earlier tokens as a longer forward would.
    """

    def __init__(self, dim: int, theta: float, scaling: RopeScaling | None, max_position_embeddings: int):
        super().__init__()
        kind = "default" if scaling is None else scaling.type
        if dim < 2 or dim % 2:
            raise ValueError(f"RoPE turns pairs of dimensions: the rotary dim must be even and >= 2, got {dim}")
        if kind not in ("default", *ROPE_TYPES):
            raise ValueError(f"RoPE type {kind!r} is not one of {', '.join(ROPE_TYPES)}")
        if kind == "dynamic" and dim < 4:
            raise ValueError(f"dynamic RoPE raises its base to dim / (dim - 2): the rotary dim must be >= 4, got {dim}")
        if kind == "longrope":
            for key in ("short_factor", "long_factor"):
                got = len(getattr(scaling, key) or ())
                if got != dim // 2:
                    raise ValueError(f"longrope's {key} needs one entry per frequency ({dim // 2}), got {got}")
        self.dim, self.theta, self.scaling, self.kind = dim, theta, scaling, kind
        self.max_position_embeddings = max_position_embeddings
        inv_freq, self.attention_factor = frequencies(dim, theta, scaling, max_position_embeddings)
        # dynamic: the frequencies of every forward that stays within max_position_embeddings
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("table", None, persistent=False)
        self.max_len = 0

    def setup(self, max_len: int, device) -> None:
        """Build the tables for positions 0..max_len-1 on `device`."""
        self.max_len = max_len
        # Recomputed, not moved: a model.to(dtype) since __init__ may have rounded the buffer.
        self.inv_freq = frequencies(self.dim, self.theta, self.scaling, self.max_position_embeddings)[0].to(device)
        if self.kind == "dynamic":
            return
        self.table = table(self.inv_freq, max_len, self.attention_factor)  # [max_len, 2, dim]
        if self.kind == "longrope":
            # HF computes the long factors' frequencies on the device the forward runs on.
            long, _ = frequencies(self.dim, self.theta, self.scaling, self.max_position_embeddings,
                                  self.scaling.original_max_position_embeddings + 1, device)
            # The short factors' rows, then the long factors': a long forward reads max_len rows on.
            self.table = torch.cat([self.table, table(long, max_len, self.attention_factor)])  # [2 * max_len, 2, dim]

    def forward(self, input_pos: torch.Tensor) -> torch.Tensor:
        """input_pos [T] or [B, T] -> cos_sin [(B,) T, 2, dim], fp32, times the attention factor."""
        seq_len = input_pos.max(dim=-1, keepdim=True).values + 1  # [1] or [B, 1]: each row its own
        if self.kind == "dynamic":
            grown, _ = frequencies(self.dim, self.theta, self.scaling, self.max_position_embeddings, seq_len)
            inv_freq = torch.where(seq_len > self.max_position_embeddings, grown, self.inv_freq)  # [1 or B, dim // 2]
            if input_pos.dim() == 2:
                inv_freq = inv_freq[:, None]  # [B, 1, dim // 2], against each row's positions
            return _cos_sin(input_pos[..., None].float() * inv_freq, self.attention_factor)
        if self.table is None:
            raise RuntimeError("Rope.setup(max_len, device) must run before the first forward")
        if self.kind == "longrope":
            long = seq_len > self.scaling.original_max_position_embeddings
            input_pos = input_pos + long * self.max_len
        return self.table[input_pos]
