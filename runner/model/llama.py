"""The LLaMA-family decoder: one forward for prefill and for single-token decode.

Native state dict layout (what every loader converts to):
  tok_embeddings.weight                  [vocab, dim]
  layers.N.attention_norm.weight         [dim]
  layers.N.attention.wqkv.weight         [(n_heads + 2 * n_kv_heads) * head_dim, dim]  q, k, v stacked
  layers.N.attention.wo.weight           [dim, n_heads * head_dim]
  layers.N.ffn_norm.weight               [dim]
  layers.N.feed_forward.w13.weight       [2 * intermediate, dim]  gate (w1) then up (w3)
  layers.N.feed_forward.w2.weight        [dim, intermediate]
  with n_experts (mixture of experts) the feed-forward is instead:
  layers.N.feed_forward.gate.weight              [n_experts, dim]  the router
  layers.N.feed_forward.experts.w13.weight       [n_experts, 2 * intermediate, dim]
  layers.N.feed_forward.experts.w2.weight        [n_experts, dim, intermediate]
  norm.weight                            [dim]
  output.weight                          [vocab, dim]  (absent when embeddings are tied)
and where the spec (runner.config.schema.ModelSpec) asks for them:
  layers.N.attention.qkv_bias            [(n_heads + 2 * n_kv_heads) * head_dim]  qkv_bias (Qwen2)
  layers.N.attention.q_norm.weight       [head_dim]  qk_norm (Qwen3, Gemma 3)
  layers.N.attention.k_norm.weight       [head_dim]
  layers.N.post_attention_norm.weight    [dim]  sandwich_norms (Gemma 2/3): on attention's output,
  layers.N.post_ffn_norm.weight          [dim]  and on the feed-forward's, before each residual add
q and k rows are in the "rotate half" order of runner.model.functional.apply_rope. Every norm
weight is the multiplier itself (Gemma's checkpoints store it less spec.norm_offset: loaders add it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from runner.config.schema import ModelSpec
from runner.model import functional as fn
from runner.model.rope import Rope


def _update(cache, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Write k, v [B, KVH, T, D] at input_pos ([T], shared by the rows, or [B, T], each row its own);
    returns the whole cache's keys and values [B, KVH, L, D] in the model's dtype."""
    # Slots beyond a row's current position may hold stale values: the causal mask never reads them.
    if not cache.quantized:
        _write(cache.k, input_pos, k), _write(cache.v, input_pos, v)
        return cache.k, cache.v
    for x, values, scales in ((k, cache.k, cache.k_scales), (v, cache.v, cache.v_scales)):
        q, d = fn.quantize_rows(x)
        _write(values, input_pos, q), _write(scales, input_pos, d)
    return (fn.dequantize_rows(cache.k, cache.k_scales, cache.dtype),
            fn.dequantize_rows(cache.v, cache.v_scales, cache.dtype))


def _write(buffer: torch.Tensor, input_pos: torch.Tensor, x: torch.Tensor) -> None:
    """x [B, KVH, T, ...] into buffer [B, KVH, L, ...] at input_pos [T] or [B, T]."""
    if input_pos.dim() == 1:
        buffer.index_copy_(2, input_pos, x)
    else:
        rows = torch.arange(x.shape[0], device=x.device)[:, None]  # [B, 1], against positions [B, T]
        buffer[rows, :, input_pos] = x.transpose(1, 2)  # [B, T, KVH, ...]


class KVCache(nn.Module):
    """A static cache: [B, n_kv_heads, max_len, head_dim] for keys and values; row b is batch row
    (or decoding slot) b. With int8, keys and values are int8 with a scale per position and key
    head (k_scales, v_scales [B, n_kv_heads, max_len], fp32): runner.model.functional.quantize_rows."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype, device, int8: bool = False):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.dtype = dtype  # what attention reads the cache as
        store = torch.int8 if int8 else dtype
        self.register_buffer("k", torch.zeros(shape, dtype=store, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=store, device=device), persistent=False)
        if int8:
            self.register_buffer("k_scales", torch.zeros(shape[:3], device=device), persistent=False)
            self.register_buffer("v_scales", torch.zeros(shape[:3], device=device), persistent=False)
        else:
            self.k_scales = self.v_scales = None

    update = _update

    @property
    def quantized(self) -> bool:
        return self.k_scales is not None

    def row(self, index: "int | slice") -> "CacheRow":
        return CacheRow(self, index)


class CacheRow:
    """Row `index` (or the rows of a slice) of a KVCache as a cache of its own (views: writes land
    in the whole cache)."""

    update = _update
    quantized = KVCache.quantized

    def __init__(self, cache: KVCache, index: "int | slice"):
        rows = index if isinstance(index, slice) else slice(index, index + 1)
        self.dtype = cache.dtype
        self.k, self.v = cache.k[rows], cache.v[rows]
        self.k_scales, self.v_scales = (cache.k_scales[rows], cache.v_scales[rows]) if cache.quantized else (None, None)


class Linear(nn.Linear):
    """nn.Linear through the model's ops (so runner's kernels can take it); quantization replaces it."""

    ops = fn

    def forward(self, x):
        return self.ops.linear(x, self.weight)

    def kernel_operands(self, dtype: torch.dtype) -> tuple[tuple[torch.Tensor, ...], int, bool] | None:
        """What runner's decode_layers takes for this layer with activations in `dtype`: its
        tensors ({w}, {w, scales} or {w, scales, zeros}), groupsize (0 if none) and whether its
        activations are quantized to int8 (int4 only), or None where it runs no runner kernel in
        that dtype. Every linear type implements it."""
        return ((self.weight,), 0, False) if self.weight.dtype == dtype else None

    def shard_(self, dim: str, keep: torch.Tensor) -> None:
        """Keep only the output rows (dim "out") or input columns ("in") at indices `keep`, as
        copies: tensor parallelism's protocol, which every linear type implements for itself."""
        axis = 0 if dim == "out" else 1
        self.weight = nn.Parameter(self.weight.detach().index_select(axis, keep.to(self.weight.device)),
                                   requires_grad=False)
        self.out_features, self.in_features = self.weight.shape


class ExpertLinear(nn.Module):
    """n_experts linears stacked, weight [E, out, in]: row m of the input goes through expert ids[m]."""

    ops = fn

    def __init__(self, n_experts: int, in_features: int, out_features: int):
        super().__init__()
        self.n_experts, self.in_features, self.out_features = n_experts, in_features, out_features
        self.weight = nn.Parameter(torch.empty(n_experts, out_features, in_features))

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.ops.expert_linear(x, self.weight, ids)  # [M, in], [M] -> [M, out]

    def shard_(self, dim: str, keep: torch.Tensor) -> None:
        """Keep the output rows ("out") or input columns ("in") at `keep` in every expert."""
        axis = 1 if dim == "out" else 2
        self.weight = nn.Parameter(self.weight.detach().index_select(axis, keep.to(self.weight.device)),
                                   requires_grad=False)
        _, self.out_features, self.in_features = self.weight.shape


class Attention(nn.Module):
    ops = fn

    def __init__(self, spec: ModelSpec, layer: int = 0):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = spec.n_heads, spec.kv_heads, spec.head_size
        self.window = spec.window(layer)
        self.local_rope = spec.local_rope(layer)  # turns by the model's local RoPE, not its global one
        rows = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        self.wqkv = Linear(spec.dim, rows, bias=False)
        self.wo = Linear(self.n_heads * self.head_dim, spec.dim, bias=False)
        # A bias of its own rather than wqkv's: every linear type (quantized ones too) stays bias-free.
        self.qkv_bias = nn.Parameter(torch.zeros(rows)) if spec.qkv_bias else None
        self.q_norm = RMSNorm(self.head_dim, spec.norm_eps) if spec.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, spec.norm_eps) if spec.qk_norm else None
        scalar = spec.query_pre_attn_scalar
        self.scale = None if scalar is None or scalar == self.head_dim else scalar ** -0.5  # None: 1 / sqrt(head_dim)
        self.softcap = spec.attn_logit_softcap
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos_sin, mask, input_pos, row: int | slice | None = None,
                parts: list[LayerPart] | None = None):
        qkv = self.wqkv(x)
        if self.qkv_bias is not None:
            qkv = qkv + self.qkv_bias
        if self.q_norm is not None:
            qkv = self.ops.norm_heads(qkv, self.q_norm.weight, self.k_norm.weight, self.q_norm.eps, self.n_heads,
                                      self.n_kv_heads)
        if parts is None:
            y = self._attend(qkv, cos_sin, mask, input_pos, row)
        else:  # a mixed forward (Transformer.forward_parts): each part attends over its own cache rows
            ys, start = [], 0
            for part in parts:
                rows, tokens = part.tokens.shape
                piece = qkv[:, start:start + rows * tokens].reshape(rows, tokens, -1)
                ys.append(self._attend(piece, part.cos_sin, part.mask, part.input_pos, part.row).reshape(1, rows * tokens, -1))
                start += rows * tokens
            y = torch.cat(ys, dim=1)
        return self.wo(y)

    def _attend(self, qkv, cos_sin, mask, input_pos, row: int | slice | None):
        cache = self.kv_cache if row is None else self.kv_cache.row(row)
        return self.ops.attend(qkv, cos_sin, cache, input_pos, mask, self.n_heads, self.n_kv_heads, self.window,
                               self.scale, self.softcap)

    @property
    def plain(self) -> bool:
        """Whether it is LLaMA's attention, which runner's fused decode step computes whole."""
        return (self.qkv_bias is None and self.q_norm is None and self.scale is None and self.softcap is None
                and not self.local_rope)


class FeedForward(nn.Module):
    ops = fn

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.w13 = Linear(spec.dim, 2 * spec.intermediate_size, bias=False)
        self.w2 = Linear(spec.intermediate_size, spec.dim, bias=False)
        self.activation = spec.activation

    def forward(self, x):
        gate_up = self.w13(x)
        return self.w2(self.ops.swiglu(gate_up) if self.activation == "silu" else self.ops.geglu(gate_up))


class Experts(nn.Module):
    """The experts' SwiGLU feed-forwards: each token through its chosen experts, weighted."""

    ops = fn

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.w13 = ExpertLinear(spec.n_experts, spec.dim, 2 * spec.intermediate_size)
        self.w2 = ExpertLinear(spec.n_experts, spec.intermediate_size, spec.dim)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [N, dim], weights and ids [N, k] -> [N, dim]."""
        N, k = ids.shape
        rows = x.repeat_interleave(k, dim=0)  # [N * k, dim]: token n's copies at n * k ...
        chosen = ids.reshape(-1)  # ... each through its own expert
        y = self.w2(self.ops.swiglu(self.w13(rows, chosen)), chosen)  # [N * k, dim]
        # Weighted and summed in fp32, rounded once: eager and compiled steps then agree in bf16.
        return (y.view(N, k, -1).float() * weights[..., None]).sum(dim=1).to(y.dtype)


class MoEFeedForward(nn.Module):
    """Mixtral's sparse feed-forward: a router picks n_experts_per_token experts per token."""

    ops = fn

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.top_k = spec.n_experts_per_token
        self.gate = Linear(spec.dim, spec.n_experts, bias=False)  # never quantized: it is tiny, and decides
        self.experts = Experts(spec)

    def forward(self, x):
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        weights, ids = self.ops.route(self.gate(flat), self.top_k)  # [B * T, k] each
        return self.experts(flat, weights, ids).view(B, T, D)


class RMSNorm(nn.Module):
    ops = fn

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.ops.rms_norm(x, self.weight, self.eps)


class Block(nn.Module):
    ops = fn

    def __init__(self, spec: ModelSpec, layer: int = 0):
        super().__init__()
        self.attention_norm = RMSNorm(spec.dim, spec.norm_eps)
        self.attention = Attention(spec, layer)
        self.ffn_norm = RMSNorm(spec.dim, spec.norm_eps)
        self.feed_forward = MoEFeedForward(spec) if spec.moe else FeedForward(spec)
        sandwich = spec.sandwich_norms
        self.post_attention_norm = RMSNorm(spec.dim, spec.norm_eps) if sandwich else None
        self.post_ffn_norm = RMSNorm(spec.dim, spec.norm_eps) if sandwich else None

    def forward(self, x, cos_sin, mask, input_pos, row: int | slice | None = None,
                parts: list[LayerPart] | None = None):
        y = self.attention(self.attention_norm(x), cos_sin, mask, input_pos, row, parts)
        h = x + (y if self.post_attention_norm is None else self.post_attention_norm(y))
        y = self.feed_forward(self.ffn_norm(h))
        return h + (y if self.post_ffn_norm is None else self.post_ffn_norm(y))

    def kernel_operands(self, dtype: torch.dtype) -> tuple[list[tuple[torch.Tensor, ...]], list[int], list[bool]] | None:
        """The four linears' operands (wqkv, wo, w13, w2), groupsizes and int8 flags for runner's decode_layers,
        or None where a part needs calls of its own: a mixture of experts, tensor parallelism's
        all-reduce, a layer on another kernel or in another dtype."""
        if not isinstance(self.feed_forward, FeedForward) or any(
                norm.weight.dtype != dtype for norm in (self.attention_norm, self.ffn_norm)):
            return None
        if not (self.attention.plain and self.post_ffn_norm is None and self.feed_forward.activation == "silu"):
            return None  # a family's extras: each op on its own
        linears = (self.attention.wqkv, self.attention.wo, self.feed_forward.w13, self.feed_forward.w2)
        operands = [linear.kernel_operands(dtype) for linear in linears]
        if any(o is None for o in operands):
            return None
        return [o[0] for o in operands], [o[1] for o in operands], [o[2] for o in operands]


class Transformer(nn.Module):
    ops = fn

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.tok_embeddings = nn.Embedding(spec.vocab_size, spec.dim)
        self.layers = nn.ModuleList(Block(spec, i) for i in range(spec.n_layers))
        self.norm = RMSNorm(spec.dim, spec.norm_eps)
        self.output = None if spec.tie_embeddings else Linear(spec.dim, spec.vocab_size, bias=False)
        self.cache_len = 0
        self.int8_cache = False  # setup_cache's caches store int8 (quant.kv_cache)
        self.rope, self.local_rope = ropes(spec)

    def setup_cache(self, batch: int, cache_len: int) -> None:
        """Allocate the static KV caches (and RoPE table) for `cache_len` positions."""
        if cache_len > self.spec.max_seq_len:
            raise ValueError(f"cache of {cache_len} positions exceeds max_seq_len {self.spec.max_seq_len}")
        weight = self.norm.weight  # float even when the embedding is quantized
        dtype = weight.dtype
        for layer in self.layers:  # n_kv_heads: this rank's share under tensor parallelism
            layer.attention.kv_cache = KVCache(batch, layer.attention.n_kv_heads, cache_len, self.spec.head_size, dtype,
                                               weight.device, self.int8_cache)
        for rope in (self.rope, self.local_rope):
            if rope is not None:
                rope.setup(cache_len, weight.device)
        self.cache_len = cache_len
        self.operands_changed()

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, last_only: bool = False,
                row: int | slice | None = None) -> torch.Tensor:
        """Logits [B, T, vocab] for tokens [B, T] at cache positions input_pos: [T] shared by every
        row, or [B, T], each row at its own (batched decoding); [B, 1, vocab] for the last token only
        with last_only (a prompt, whose other positions need no logits). With `row`, tokens [1, T]
        go into that row of the cache only (a slice: tokens [n, T] into those n rows), the other rows
        left as they are."""
        cos_sin = self.rope(input_pos)  # [(B,) T, 2, rotary dims]
        x = self.embed(tokens)  # [B, T, dim]
        whole = self.ops.decode_layers(self, x, cos_sin, input_pos, row)  # in one call, where ops can
        if whole is not None:
            x = whole
        else:
            for layer, (layer_cos_sin, mask) in zip(self.layers, self.layer_inputs(input_pos, self.cache_len, cos_sin)):
                x = layer(x, layer_cos_sin, mask, input_pos, row)
        if last_only:
            x = x[:, -1:]  # [B, 1, dim]
        return self.head(x)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [..., vocab] from the last layer's output x [..., dim]."""
        x = self.norm(x)
        logits = self.ops.linear(x, self.tok_embeddings.weight) if self.output is None else self.output(x)
        cap = self.spec.final_logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def forward_parts(self, parts: list[Part]) -> list[torch.Tensor]:
        """Several calls of forward() in one: each part's tokens [B, T] at its positions into its
        cache rows, as forward(part.tokens, part.input_pos, part.last_only, part.row) would run them,
        but every part's tokens go through each linear together (each weight read once for all:
        a prompt's chunk rides along with the decode step of the other rows). Each part's logits:
        [B, T, vocab], or [B, 1, vocab] with last_only."""
        x = torch.cat([self.embed(part.tokens).reshape(1, -1, self.spec.dim) for part in parts], dim=1)  # [1, N, dim]
        inputs = [self.layer_inputs(part.input_pos, self.cache_len) for part in parts]  # per part, per layer
        for i, layer in enumerate(self.layers):
            layer_parts = [LayerPart(part.tokens, inputs[j][i][0], inputs[j][i][1], part.input_pos, part.row)
                           for j, part in enumerate(parts)]
            x = layer(x, None, None, None, parts=layer_parts)
        outs, start = [], 0
        for part in parts:
            rows, tokens = part.tokens.shape
            y = x[0, start:start + rows * tokens].reshape(rows, tokens, -1)
            outs.append(y[:, -1:] if part.last_only else y)
            start += rows * tokens
        sizes = [y.shape[0] * y.shape[1] for y in outs]
        logits = self.head(torch.cat([y.reshape(1, -1, self.spec.dim) for y in outs], dim=1))  # [1, M, vocab]
        return [piece.reshape(*y.shape[:2], -1) for piece, y in zip(logits[0].split(sizes), outs)]

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """The first layer's input [B, T, dim] for tokens [B, T]."""
        x = self.tok_embeddings(tokens)
        if self.spec.scale_embeddings:  # Gemma: by sqrt(dim) rounded to the dtype first, as its reference
            x = x * torch.tensor(self.spec.dim ** 0.5, dtype=x.dtype)
        return x

    def layer_inputs(self, input_pos: torch.Tensor, cache_len: int, cos_sin: torch.Tensor | None = None,
                     ropes: tuple[Rope, Rope | None] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's (cos_sin, attention mask [(B,) T, cache_len]) for tokens at input_pos: a
        layer's window picks its mask, its kind its RoPE (`ropes`: global and local; the model's own
        unless given). Layers alike share the tensors."""
        rope, local = ropes or (self.rope, self.local_rope)
        tables = {False: rope(input_pos) if cos_sin is None else cos_sin}
        if local is not None:
            tables[True] = local(input_pos)
        masks = {}
        out = []
        for layer in self.layers:
            window = layer.attention.window
            if window not in masks:
                masks[window] = fn.causal_mask(input_pos, cache_len, window)
            out.append((tables[layer.attention.local_rope], masks[window]))
        return out

    def plain_layers(self) -> bool:
        """Whether every layer attends alike (one window, one RoPE), as runner's fused decode step needs."""
        return self.local_rope is None and len({layer.attention.window for layer in self.layers}) == 1

    def _apply(self, function, *args, **kwargs):
        self.operands_changed()  # a move or cast replaces every tensor
        return super()._apply(function, *args, **kwargs)

    def use_ops(self, ops) -> None:
        """Run the math through `ops`: runner.model.functional, or a runner.kernels.KernelOps made
        for this model."""
        for module in self.modules():
            if hasattr(type(module), "ops"):
                module.ops = ops

    def operands_changed(self) -> None:
        """Tell the ops that layers, weights or caches were replaced, or a layer's kernel choice
        changed: ops that keep tensors gathered from the model (KernelOps' fused decode step)
        gather them again. Whatever replaces them after the ops are chosen calls this."""
        self.ops.operands_changed()


@dataclass(frozen=True)
class Part:
    """One part of a mixed forward (Transformer.forward_parts): tokens [B, T] at input_pos ([T]
    or [B, T]) into cache row(s) `row`; last_only: its logits for the last token only."""

    tokens: torch.Tensor
    input_pos: torch.Tensor
    row: int | slice | None
    last_only: bool = False


@dataclass(frozen=True)
class LayerPart:
    """A Part as one layer's attention sees it: with that layer's RoPE table and mask."""

    tokens: torch.Tensor
    cos_sin: torch.Tensor
    mask: torch.Tensor
    input_pos: torch.Tensor
    row: int | slice | None


def ropes(spec: ModelSpec) -> tuple[Rope, Rope | None]:
    """The model's RoPE, and the local layers' own where they have one (Gemma 3: another base, unscaled)."""
    scaling = spec.rope_scaling
    # Dynamic NTK scaling starts past the length the model was trained for, which the cache may exceed.
    trained = scaling.original_max_position_embeddings if scaling is not None and scaling.type == "dynamic" else spec.max_seq_len
    rope = Rope(spec.rotary_dim, spec.rope_theta, scaling, trained)
    local = None if spec.rope_local_theta is None else Rope(spec.rotary_dim, spec.rope_local_theta, None, spec.max_seq_len)
    return rope, local
