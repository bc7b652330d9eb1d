"""Sharders: the stage between the weight transforms and the decoders.

Tensor parallelism, Megatron-style (as gpt-fast's tp.py): each rank keeps whole heads and an equal
share of the feed-forward, and the two matmuls that sum over those shares all-reduce.

  attention.wqkv  output rows, q, k and v each split by heads   (rank r: its q heads, its kv heads)
  attention.qkv_bias  as wqkv's output rows (Qwen2)
  attention.wo    input columns, by heads; then all-reduce
  fewer kv heads than ranks (one kv head, or 2 over 4 ranks): each kv head is copied to the
  world_size / n_kv_heads ranks whose query heads read it, so every rank still attends over
  the kv head of each of its query heads, and wo's columns still split by query heads alone
  feed_forward.w13  output rows, w1 and w3 each split           (rank r: its share of each)
  feed_forward.w2   input columns; then all-reduce
  mixture of experts: each expert's w13 and w2 split as above (every rank holds a share of every
  expert, as gpt-fast does); the router replicated; one all-reduce of the weighted expert sum
  norms (q/k norms over head_dim, Gemma's sandwich norms over dim too), embedding: replicated
  output layer: replicated; where the ranks share memory, output rows by vocabulary (a tied
  model's: its embedding's rows), then an all-gather of the logits
  KV cache: by kv heads (each rank holds 1/N of it, or the one kv head it shares)

Two steps: `plan(spec, world_size)` decides which rows or columns each rank keeps of each
layer's linears (refusing a spec whose heads do not split), and `shard(model, plan, rank)` keeps
one rank's share. A layer shards itself through one method, `shard_(dim, keep)` ("out" rows or
"in" columns, the indices kept), so a quantized layer's layout stays its own business: int8
scales follow their rows, int4 input splits must keep whole groups (runner.config.schema.tp_problems
checks that before any rank starts). The collectives are torch.distributed's functional ones,
which torch.compile traces into the compiled step. Where every rank is on this machine (a gloo
group), the collectives go through shared memory instead (runner.sharders.shm), cheap enough that
splitting the output layer pays too, and runner's fused decode step (KernelOps.decode_layers) sums
in its own call.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed import _functional_collectives as funcol

from runner.config.schema import ModelSpec, tp_problems
from runner.kernels.shm_reduce import ShmGroup
from runner.model.llama import Linear
from runner.parallel import Rank
from runner.sharders import shm


class AllReduce(nn.Module):
    """A row-parallel layer (its input split by columns) and the sum of its ranks' partial outputs:
    through shared memory where `shared` is given and takes the tensor, else the group's backend."""

    def __init__(self, inner: nn.Module, group, shared: ShmGroup | None = None):
        super().__init__()
        self.inner, self.group, self.shared = inner, group, shared

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        y = self.inner(*args)
        if self.shared is not None and self.shared.sums(y):
            return self.shared.all_reduce(y)
        return funcol.all_reduce(y, "sum", self.group)

    def kernel_operands(self, dtype: torch.dtype):
        """The inner layer's operands (see Linear.kernel_operands) where the sum goes through shared
        memory, which runner's fused decode step does in its own call (it finds `shared` among this
        module's children); else None: the all-reduce runs between this layer and the next."""
        return self.inner.kernel_operands(dtype) if self.shared is not None else None


class GatherLogits(nn.Module):
    """The output layer split by vocabulary rows, and every rank's logits side by side, in rank
    order: through shared memory where the logits are on the CPU, else the group's backend."""

    def __init__(self, inner: nn.Module, group, shared: ShmGroup):
        super().__init__()
        self.inner, self.group, self.shared = inner, group, shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)  # [..., vocab / world_size]
        if y.device.type == "cpu":
            return self.shared.all_gather(y)
        return funcol.all_gather_tensor(y.contiguous(), y.dim() - 1, self.group)


@dataclass(frozen=True)
class Split:
    """How one linear splits: by its output rows ("out") or input columns ("in"); rank r keeps
    the indices blocks[r]."""
    dim: str
    blocks: tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class ShardPlan:
    """How every layer splits over `world_size` ranks: the heads each rank keeps, each linear's
    split (by its name within the layer), the split of each bias kept apart from its linear (as
    that linear's output rows), and the modules whose partial outputs the ranks sum."""
    world_size: int
    heads: int
    kv_heads: int
    linears: dict[str, Split]
    reduced: tuple[str, ...]
    biases: dict[str, Split] = field(default_factory=dict)


def _block(start: int, count: int) -> torch.Tensor:
    return torch.arange(start, start + count)


def plan(spec: ModelSpec, world_size: int) -> ShardPlan:
    """The plan for `spec` over `world_size` ranks; ValueError when its heads or feed-forward do not split."""
    problems = tp_problems(spec, world_size)
    if problems:
        raise ValueError(problems[0][2])
    hd, heads, kv, inner = spec.head_size, spec.n_heads, spec.kv_heads, spec.intermediate_size
    # With fewer kv heads than ranks, world_size / kv consecutive ranks share one kv head: the one
    # their query heads read (query head h reads kv head h // (heads / kv)).
    q_per, kv_per, inner_per = heads // world_size, max(kv // world_size, 1), inner // world_size
    ranks = range(world_size)
    first_kv = [r * kv // world_size for r in ranks]  # r * kv_per, or the kv head rank r shares
    qkv = tuple(torch.cat([_block(r * q_per * hd, q_per * hd),  # q, then k, then v: each by heads
                           _block((heads + first_kv[r]) * hd, kv_per * hd),
                           _block((heads + kv + first_kv[r]) * hd, kv_per * hd)]) for r in ranks)
    by_heads = tuple(_block(r * q_per * hd, q_per * hd) for r in ranks)
    w13 = tuple(torch.cat([_block(r * inner_per, inner_per), _block(inner + r * inner_per, inner_per)]) for r in ranks)
    by_inner = tuple(_block(r * inner_per, inner_per) for r in ranks)
    # A mixture of experts splits every expert's stacked linears alike, and sums once after the
    # weighting: one all-reduce per token, not one per chosen expert.
    ffn = "feed_forward.experts" if spec.moe else "feed_forward"
    return ShardPlan(world_size, q_per, kv_per,
                     linears={"attention.wqkv": Split("out", qkv), "attention.wo": Split("in", by_heads),
                              f"{ffn}.w13": Split("out", w13), f"{ffn}.w2": Split("in", by_inner)},
                     reduced=("attention.wo", "feed_forward.experts" if spec.moe else "feed_forward.w2"),
                     biases={"attention.qkv_bias": Split("out", qkv)} if spec.qkv_bias else {})


def shard(model: nn.Module, plan: ShardPlan, rank: Rank) -> nn.Module:
    """Keep `rank`'s share of `model` (a runner.model.llama.Transformer) as `plan` splits it, in place."""
    if rank.world_size != plan.world_size:
        raise ValueError(f"the shard plan is for {plan.world_size} ranks, but rank {rank.rank} is one of {rank.world_size}")
    if plan.world_size == 1:
        return model
    group = torch.distributed.group.WORLD  # the ranks runner launches or joins: one group
    shared = shm.open_segment(rank)  # every layer's all-reduces share one segment, in call order
    for i, layer in enumerate(model.layers):
        for name, split in plan.linears.items():
            try:
                layer.get_submodule(name).shard_(split.dim, split.blocks[rank.rank])
            except ValueError as e:
                raise ValueError(f"layers.{i}.{name} cannot be split over {plan.world_size} ranks: {e}") from None
        for name, split in plan.biases.items():
            parent, _, child = name.rpartition(".")
            bias = layer.get_parameter(name).detach()
            kept = bias.index_select(0, split.blocks[rank.rank].to(bias.device))
            layer.get_submodule(parent).register_parameter(child, nn.Parameter(kept, requires_grad=False))
        layer.attention.n_heads, layer.attention.n_kv_heads = plan.heads, plan.kv_heads
        for name in plan.reduced:
            parent, _, child = name.rpartition(".")
            layer.get_submodule(parent).register_module(child, AllReduce(layer.get_submodule(name), group, shared))
    if shared is not None:
        _split_output(model, rank, group, shared)
    model.operands_changed()  # runner's ops gather their operands again: the layers and head counts changed
    return model


def _split_output(model: nn.Module, rank: Rank, group, shared: ShmGroup) -> None:
    """Keep `rank`'s share of the output layer's rows (of the vocabulary), its logits gathered:
    each rank reads 1/N of the layer, not all of it. A vocabulary that does not split evenly, and
    torch's own Linear (quant's untie beside a quantized embedding), stay whole."""
    vocab, n = model.spec.vocab_size, rank.world_size
    if vocab % n or type(model.output) is nn.Linear:
        return
    share = vocab // n
    if model.output is None:  # tied: a layer over this rank's rows of the embedding, not a copy
        head = Linear(model.spec.dim, share, bias=False, device="meta")
        rows = model.tok_embeddings.weight.detach().narrow(0, rank.rank * share, share)
        head.weight = nn.Parameter(rows, requires_grad=False)
    else:
        head = model.output
        head.shard_("out", _block(rank.rank * share, share))
    model.output = GatherLogits(head, group, shared)
