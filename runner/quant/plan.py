"""Which layers of a Transformer a QuantSection quantizes, and how; and building them.

A plan maps a module name ("layers.0.attention.wqkv", "output", "tok_embeddings") to a
Scheme. The same plan builds quantized modules from float ones (quantize) or empty ones
for a quantized checkpoint to be loaded into (skeleton).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from runner.config.errors import ConfigError, problem
from runner.config.schema import INT4_GROUPSIZES, QuantEmbedding, QuantMode, QuantOutput, QuantSection
from runner.model.llama import ExpertLinear
from runner.quant.linear import Int4Experts, Int4Linear, Int8Embedding, Int8Experts, Int8Linear

BLOCK_LINEARS = ("attention.wqkv", "attention.wo", "feed_forward.w13", "feed_forward.w2")  # in forward order
# A mixture-of-experts block's: its experts, each quantized alike; the router stays float.
MOE_BLOCK_LINEARS = ("attention.wqkv", "attention.wo", "feed_forward.experts.w13", "feed_forward.experts.w2")


def block_linears(block: nn.Module) -> tuple[str, ...]:
    """The quantizable linears of a transformer block, in forward order."""
    return MOE_BLOCK_LINEARS if hasattr(block.feed_forward, "experts") else BLOCK_LINEARS


@dataclass(frozen=True)
class Scheme:
    kind: str  # "int8" or "int4"
    groupsize: int | None = None  # int4 only

    def quantize(self, module: nn.Module) -> nn.Module:
        if isinstance(module, nn.Embedding):
            return Int8Embedding.from_float(module)
        if isinstance(module, ExpertLinear):
            return Int8Experts.from_float(module) if self.kind == "int8" else Int4Experts.from_float(module, self.groupsize)
        return Int8Linear.from_float(module) if self.kind == "int8" else Int4Linear.from_float(module, self.groupsize)

    def empty(self, module: nn.Module) -> nn.Module:
        """The quantized module's shape, on the meta device: load_state_dict(assign=True) fills it."""
        dtype = module.weight.dtype
        if isinstance(module, nn.Embedding):
            return Int8Embedding(module.num_embeddings, module.embedding_dim, dtype, "meta")
        if isinstance(module, ExpertLinear):
            shape = (module.n_experts, module.in_features, module.out_features)
            return Int8Experts(*shape, dtype, "meta") if self.kind == "int8" else \
                Int4Experts(*shape, self.groupsize, dtype, "meta")
        if self.kind == "int8":
            return Int8Linear(module.in_features, module.out_features, dtype, "meta")
        return Int4Linear(module.in_features, module.out_features, self.groupsize, dtype, "meta")


def weight_scheme(section: QuantSection) -> Scheme | None:
    """The scheme of the transformer blocks' linears."""
    if section.mode is QuantMode.int8:
        return Scheme("int8")
    if section.mode.is_int4:
        return Scheme("int4", section.groupsize)
    return None


def make_plan(model: nn.Module, section: QuantSection) -> dict[str, Scheme]:
    """Module name -> scheme, in forward order. "output" is listed even when tied (see untie)."""
    scheme = weight_scheme(section)
    if scheme is None:
        return {}
    plan = {}
    if section.embedding is QuantEmbedding.int8:
        plan["tok_embeddings"] = Scheme("int8")
    for i, block in enumerate(model.layers):
        plan.update({f"layers.{i}.{name}": scheme for name in block_linears(block)})
    if section.output is QuantOutput.int8:
        plan["output"] = Scheme("int8")
    elif section.output is QuantOutput.same:
        plan["output"] = scheme
    return plan


def untie(model: nn.Module, plan: dict[str, Scheme]) -> None:
    """Give a tied model its own output layer when the plan stores output and embedding apart.

    The new layer holds the embedding's own Parameter (no copy); quantizing either side then
    leaves the other in float.
    """
    if model.output is not None or ("output" not in plan and "tok_embeddings" not in plan):
        return
    weight = model.tok_embeddings.weight
    output = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    output.weight = weight
    model.output = output


def check_groupsize(model: nn.Module, plan: dict[str, Scheme], groupsize: int, source: str, key: str = "quant") -> None:
    """A ConfigError naming KEY.groupsize for every input width it does not divide."""
    widths = {}
    for name, scheme in plan.items():
        if scheme.kind == "int4":  # a tied output (None until untie) reads the embedding: dim inputs
            width = model.spec.dim if name == "output" and model.output is None else module(model, name).in_features
            widths.setdefault(width, []).append(name)
    bad = {width: names for width, names in widths.items() if width % groupsize}
    if not bad:
        return
    valid = [g for g in INT4_GROUPSIZES if all(width % g == 0 for width in widths)]
    allowed = f"sizes that fit this model: {', '.join(map(str, valid))}" if valid else \
        f"none of {', '.join(map(str, INT4_GROUPSIZES))} fits this model; use {key}.mode=int8"
    raise ConfigError([problem(source, f"{key}.groupsize",
                               f"does not divide the {width} inputs of {names[0]}"
                               f"{f' (and {len(names) - 1} more layers)' if len(names) > 1 else ''}; {allowed}",
                               groupsize) for width, names in sorted(bad.items())])


def module(model: nn.Module, name: str) -> nn.Module:
    """The submodule at a dotted name."""
    return model.get_submodule(name)


def replace(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` at the dotted name in place of what is there."""
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)
