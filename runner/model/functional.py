"""The model's math as small pure functions: RMSNorm, RoPE's rotation, attention over a static cache.

These are the reference ops. runner.kernels.KernelOps has the same signatures and swaps in
runner's CPU kernels where they apply; the model calls whichever its `ops` attribute names.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


linear = F.linear


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in fp32 whatever the activations' dtype, as the reference does.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def apply_rope(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, D] by cos_sin [T, 2, D] (or [B, T, 2, D]: each row at its own positions).

    The native layout pairs dimension i with i + D/2 (HF's "rotate half"); Meta and GGUF
    checkpoints, which pair neighbours, are permuted into it when they are loaded.
    """
    cos, sin = cos_sin[..., 0, :].to(x.dtype), cos_sin[..., 1, :].to(x.dtype)  # [(B,) T, R]
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, R], against x's heads
    if cos.shape[-1] < x.shape[-1]:  # partial rotary: the leading R dimensions turn, the rest pass
        turned, kept = x.split([cos.shape[-1], x.shape[-1] - cos.shape[-1]], dim=-1)
        return torch.cat([apply_rope(turned, cos_sin), kept], dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float | None = None,
              softcap: float | None = None) -> torch.Tensor:
    """Causal attention of q [B, H, T, D] over the cache k, v [B, KVH, L, D]; mask [T, L] or, a row
    each, [B, T, L] (True: attend). Scores are scaled by `scale` (None: 1 / sqrt(D)) and, with
    `softcap` (Gemma 2), squashed to softcap * tanh(scores / softcap) before the mask."""
    if mask.dim() == 3:
        mask = mask[:, None]  # [B, 1, T, L]: every head of a row alike
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-2, -1) * (q.shape[-1] ** -0.5 if scale is None else scale)
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


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


def geglu(gate_up: torch.Tensor) -> torch.Tensor:
    """gelu(gate) * up with GELU's tanh approximation (Gemma's feed-forward), gate_up as swiglu's."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def norm_heads(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float, n_heads: int,
               n_kv_heads: int, rms_norm=rms_norm) -> torch.Tensor:
    """qkv [B, T, (n_heads + 2 n_kv_heads) * D] with each query and key head RMS-normalised over its
    D dimensions (Qwen3's and Gemma 3's q_norm and k_norm); values untouched."""
    B, T, _ = qkv.shape
    D = q_weight.shape[0]
    q, k, v = qkv.split([n_heads * D, n_kv_heads * D, n_kv_heads * D], dim=-1)
    q = rms_norm(q.reshape(B, T, n_heads, D), q_weight, eps).view(B, T, n_heads * D)
    k = rms_norm(k.reshape(B, T, n_kv_heads, D), k_weight, eps).view(B, T, n_kv_heads * D)
    return torch.cat([q, k, v], dim=-1)


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
           n_heads: int, n_kv_heads: int, window: int | None = None, scale: float | None = None,
           softcap: float | None = None) -> torch.Tensor:
    """One attention layer past its wqkv: RoPE, the cache write, attention over the cache.
    `mask` already holds any sliding `window` (which runner's kernel applies itself); `scale` and
    `softcap` as attention's.

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
    y = attention(q, k, v, mask, scale, softcap)  # [B, H, T, D]
    return y.transpose(1, 2).reshape(B, T, n_heads * D)
