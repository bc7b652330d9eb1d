"""Sharders: the stage between the weight transforms and the decoders.

Tensor parallelism, Megatron-style (as gpt-fast's tp.py): each rank keeps whole heads and an equal
share of the feed-forward, and the two matmuls that sum over those shares all-reduce.

  attention.wqkv  output rows, q, k and v each split by heads   (rank r: its q heads, its kv heads)
  attention.wo    input columns, by heads; then all-reduce
  feed_forward.w13  output rows, w1 and w3 each split           (rank r: its share of each)
  feed_forward.w2   input columns; then all-reduce
  mixture of experts: each expert's w13 and w2 split as above (every rank holds a share of every
  expert, as gpt-fast does); the router replicated; one all-reduce of the weighted expert sum
  norms, embedding, output layer: replicated
  KV cache: by kv heads (each rank holds 1/N of it)

A layer shards itself through one method, `shard_(dim, keep)` ("out" rows or "in" columns, the
indices kept), so a quantized layer's layout stays its own business: int8 scales follow their
rows, int4 input splits must keep whole groups (runner.config.schema.tp_problems checks that
before any rank starts). The collectives are torch.distributed's functional ones, which
torch.compile traces into the compiled step.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed import _functional_collectives as funcol

from runner.config.schema import tp_problems


class AllReduce(nn.Module):
    """A row-parallel layer (its input split by columns) and the sum of its ranks' partial outputs."""

    def __init__(self, inner: nn.Module, group):
        super().__init__()
        self.inner, self.group = inner, group

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return funcol.all_reduce(self.inner(*args), "sum", self.group)

    def kernel_operands(self, dtype: torch.dtype) -> None:
        """None: the all-reduce must run between this layer and the next (see Linear.kernel_operands)."""
        return None


def _block(start: int, count: int) -> torch.Tensor:
    return torch.arange(start, start + count)


def shard(model: nn.Module, rank: int, world_size: int, group) -> nn.Module:
    """Keep rank `rank`'s share of `model` (a runner.model.llama.Transformer), in place."""
    spec = model.spec
    if world_size == 1:
        return model
    problems = tp_problems(spec, world_size)
    if problems:
        raise ValueError(problems[0][2])
    hd, heads, kv, inner = spec.head_size, spec.n_heads, spec.kv_heads, spec.intermediate_size
    q_per, kv_per, inner_per = heads // world_size, kv // world_size, inner // world_size
    qkv = torch.cat([_block(rank * q_per * hd, q_per * hd),  # q, then k, then v: each by heads
                     _block((heads + rank * kv_per) * hd, kv_per * hd),
                     _block((heads + kv + rank * kv_per) * hd, kv_per * hd)])
    by_heads = _block(rank * q_per * hd, q_per * hd)
    w13 = torch.cat([_block(rank * inner_per, inner_per), _block(inner + rank * inner_per, inner_per)])
    by_inner = _block(rank * inner_per, inner_per)
    for i, layer in enumerate(model.layers):
        attention, ffn = layer.attention, layer.feed_forward
        experts = getattr(ffn, "experts", None)  # a mixture of experts: their stacked linears split alike
        dense, prefix = (ffn, "feed_forward") if experts is None else (experts, "feed_forward.experts")
        for name, linear, dim, keep in (("attention.wqkv", attention.wqkv, "out", qkv),
                                        ("attention.wo", attention.wo, "in", by_heads),
                                        (f"{prefix}.w13", dense.w13, "out", w13),
                                        (f"{prefix}.w2", dense.w2, "in", by_inner)):
            try:
                linear.shard_(dim, keep)
            except ValueError as e:
                raise ValueError(f"layers.{i}.{name} cannot be split over {world_size} ranks: {e}") from None
        attention.n_heads, attention.n_kv_heads = q_per, kv_per
        attention.wo = AllReduce(attention.wo, group)
        if experts is None:
            ffn.w2 = AllReduce(ffn.w2, group)
        else:
            ffn.experts = AllReduce(experts, group)  # after the weighting: one sum per token, not k
    model.tensor_parallel = (rank, world_size)
    return model
