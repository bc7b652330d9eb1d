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

Two steps: `plan(spec, world_size)` decides which rows or columns each rank keeps of each
layer's linears (refusing a spec whose heads do not split), and `shard(model, plan, rank)` keeps
one rank's share. A layer shards itself through one method, `shard_(dim, keep)` ("out" rows or
"in" columns, the indices kept), so a quantized layer's layout stays its own business: int8
scales follow their rows, int4 input splits must keep whole groups (runner.config.schema.tp_problems
checks that before any rank starts). The collectives are torch.distributed's functional ones,
which torch.compile traces into the compiled step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed import _functional_collectives as funcol

from runner.config.schema import ModelSpec, tp_problems
from runner.parallel import Rank


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


@dataclass(frozen=True)
class Split:
    """How one linear splits: by its output rows ("out") or input columns ("in"); rank r keeps
    the indices blocks[r]."""
    dim: str
    blocks: tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class ShardPlan:
    """How every layer splits over `world_size` ranks: the heads each rank keeps, each linear's
    split (by its name within the layer), and the modules whose partial outputs the ranks sum."""
    world_size: int
    heads: int
    kv_heads: int
    linears: dict[str, Split]
    reduced: tuple[str, ...]


def _block(start: int, count: int) -> torch.Tensor:
    return torch.arange(start, start + count)


def plan(spec: ModelSpec, world_size: int) -> ShardPlan:
    """The plan for `spec` over `world_size` ranks; ValueError when its heads or feed-forward do not split."""
    problems = tp_problems(spec, world_size)
    if problems:
        raise ValueError(problems[0][2])
    hd, heads, kv, inner = spec.head_size, spec.n_heads, spec.kv_heads, spec.intermediate_size
    q_per, kv_per, inner_per = heads // world_size, kv // world_size, inner // world_size
    ranks = range(world_size)
    qkv = tuple(torch.cat([_block(r * q_per * hd, q_per * hd),  # q, then k, then v: each by heads
                           _block((heads + r * kv_per) * hd, kv_per * hd),
                           _block((heads + kv + r * kv_per) * hd, kv_per * hd)]) for r in ranks)
    by_heads = tuple(_block(r * q_per * hd, q_per * hd) for r in ranks)
    w13 = tuple(torch.cat([_block(r * inner_per, inner_per), _block(inner + r * inner_per, inner_per)]) for r in ranks)
    by_inner = tuple(_block(r * inner_per, inner_per) for r in ranks)
    # A mixture of experts splits every expert's stacked linears alike, and sums once after the
    # weighting: one all-reduce per token, not one per chosen expert.
    ffn = "feed_forward.experts" if spec.moe else "feed_forward"
    return ShardPlan(world_size, q_per, kv_per,
                     linears={"attention.wqkv": Split("out", qkv), "attention.wo": Split("in", by_heads),
                              f"{ffn}.w13": Split("out", w13), f"{ffn}.w2": Split("in", by_inner)},
                     reduced=("attention.wo", "feed_forward.experts" if spec.moe else "feed_forward.w2"))


def shard(model: nn.Module, plan: ShardPlan, rank: Rank) -> nn.Module:
    """Keep `rank`'s share of `model` (a runner.model.llama.Transformer) as `plan` splits it, in place."""
    if rank.world_size != plan.world_size:
        raise ValueError(f"the shard plan is for {plan.world_size} ranks, but rank {rank.rank} is one of {rank.world_size}")
    if plan.world_size == 1:
        return model
    group = torch.distributed.group.WORLD  # the ranks runner launches or joins: one group
    for i, layer in enumerate(model.layers):
        for name, split in plan.linears.items():
            try:
                layer.get_submodule(name).shard_(split.dim, split.blocks[rank.rank])
            except ValueError as e:
                raise ValueError(f"layers.{i}.{name} cannot be split over {plan.world_size} ranks: {e}") from None
        layer.attention.n_heads, layer.attention.n_kv_heads = plan.heads, plan.kv_heads
        for name in plan.reduced:
            parent, _, child = name.rpartition(".")
            layer.get_submodule(parent).register_module(child, AllReduce(layer.get_submodule(name), group))
    model.operands_changed()  # runner's ops gather their operands again: the layers and head counts changed
    return model
