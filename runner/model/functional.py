"""The model's math as small pure functions: RMSNorm, RoPE, attention over a static cache.

These are the reference ops. runner.kernels.KernelOps has the same signatures and swaps in
runner's CPU kernels where they apply; the model calls whichever its `ops` attribute names.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from runner.config.schema import RopeScaling


linear = F.linear


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in fp32 whatever the activations' dtype, as the reference does.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2], with Llama-3.1's scaling of the long wavelengths.

    Computed in fp32 as Meta's and HF's references do, so band edges fall on the same side.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed by `factor`, short ones kept; in between, interpolate.
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(mid, blended, scaled)


def rope_cache(inv_freq: torch.Tensor, max_len: int) -> torch.Tensor:
    """cos and sin for every position: [max_len, 2, head_dim]."""
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # [max_len, head_dim/2]
    angles = torch.cat([angles, angles], dim=-1)  # [max_len, head_dim]
    return torch.stack([angles.cos(), angles.sin()], dim=1)


def apply_rope(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, D] by cos_sin [T, 2, D] (or [B, T, 2, D]: each row at its own positions).

    The native layout pairs dimension i with i + D/2 (HF's "rotate half"); Meta and GGUF
    checkpoints, which pair neighbours, are permuted into it when they are loaded.
    """
    cos, sin = cos_sin[..., 0, :].to(x.dtype), cos_sin[..., 1, :].to(x.dtype)  # [(B,) T, D]
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, D], against x's heads
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Causal attention of q [B, H, T, D] over the cache k, v [B, KVH, L, D]; mask [T, L] or, a row
    each, [B, T, L] (True: attend)."""
    if mask.dim() == 3:
        mask = mask[:, None]  # [B, 1, T, L]: every head of a row alike
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] as int8 [..., D] times fp32 scales [...]: d = max|x| / 127 per row, x / d rounded half
    to even (an int8 KV cache's keys and values, and the queries that score against its keys)."""
    xf = x.float()
    scales = xf.abs().amax(dim=-1) / 127
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))[..., None]
    return (xf / safe).round().clamp(-127, 127).to(torch.int8), scales


def dequantize_rows(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scales[..., None]).to(dtype)


def causal_mask(input_pos: torch.Tensor, cache_len: int, window: int | None = None) -> torch.Tensor:
    """[T, cache_len] (or [B, T, cache_len] for per-row positions [B, T]): a query at position p sees cache slots 0..p, or with a sliding window only
    the last `window` of them, p - window + 1..p (HF's and Mistral's convention)."""
    slots = torch.arange(cache_len, device=input_pos.device)
    mask = slots <= input_pos[..., None]  # input_pos [T] or [B, T] -> [(B,) T, L]
    return mask if window is None else mask & (slots > input_pos[..., None] - window)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [..., 2 * I] holding gate then up."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def route(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral's routing, as HF computes it: softmax over every expert in fp32, the top k, their
    weights renormalised to sum to 1. logits [N, E] -> weights fp32 [N, k], expert ids [N, k]."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), ids


GATHER_ROWS = 4  # up to this many rows (a decoded token's experts), expert_linear gathers; above, it groups


def expert_linear(x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, matmul=None) -> torch.Tensor:
    """Row m of x [M, K] times expert ids[m] of w [E, N, K] -> [M, N]; experts no row chose are never read.

    A few rows (decoding) gather their experts' matrices; many rows (a prompt) are grouped by
    expert, one matmul per expert in use. A compiled step cannot group (the groups' sizes are
    data), so there every expert runs on every row and the rows keep their own expert's result.
    matmul(rows, e) -> rows @ w[e].T, for a group, when the caller has a better one than F.linear.
    """
    M = x.shape[0]
    if M <= GATHER_ROWS:
        return torch.bmm(w[ids], x[:, :, None])[..., 0]  # [M, N, K] @ [M, K, 1]
    if torch.compiler.is_compiling():
        out = x.new_zeros(M, w.shape[1])
        for e in range(w.shape[0]):
            out = torch.where((ids == e)[:, None], F.linear(x, w[e]), out)
        return out
    order = torch.argsort(ids, stable=True)
    out = x.new_empty(M, w.shape[1])
    start = 0
    for e, count in enumerate(torch.bincount(ids, minlength=w.shape[0]).tolist()):
        if count:
            rows = order[start:start + count]
            out[rows] = F.linear(x[rows], w[e]) if matmul is None else matmul(x[rows], e)
            start += count
    return out


def decode_layers(model, x: torch.Tensor, cos_sin: torch.Tensor, input_pos: torch.Tensor, row) -> None:
    """Every layer in one call, where an ops namespace has one (runner.kernels.KernelOps); the
    reference runs each layer's modules one by one."""
    return None


def operands_changed() -> None:
    """The model's tensors were replaced: the reference keeps none of them, so nothing to drop."""


def attend(qkv: torch.Tensor, cos_sin: torch.Tensor, cache, input_pos: torch.Tensor, mask: torch.Tensor,
           n_heads: int, n_kv_heads: int, window: int | None = None) -> torch.Tensor:
    """One attention layer past its wqkv: RoPE, the cache write, attention over the cache.
    `mask` already holds any sliding `window` (which runner's kernel applies itself).

    qkv [B, T, (n_heads + 2 n_kv_heads) * D] -> [B, T, n_heads * D]; cache is a KVCache.
    """
    B, T, _ = qkv.shape
    D = cache.k.shape[-1]
    q, k, v = qkv.split([n_heads * D, n_kv_heads * D, n_kv_heads * D], dim=-1)
    q = q.view(B, T, n_heads, D).transpose(1, 2)  # [B, H, T, D]
    k = k.view(B, T, n_kv_heads, D).transpose(1, 2)  # [B, KVH, T, D]
    v = v.view(B, T, n_kv_heads, D).transpose(1, 2)
    q, k = apply_rope(q, cos_sin), apply_rope(k, cos_sin)
    if cache.quantized:  # the queries on int8's grid too, as runner's kernels score them
        q = dequantize_rows(*quantize_rows(q), q.dtype)
    k, v = cache.update(input_pos, k, v)  # [B, KVH, L, D], in the model's dtype
    y = attention(q, k, v, mask)  # [B, H, T, D]
    return y.transpose(1, 2).reshape(B, T, n_heads * D)
