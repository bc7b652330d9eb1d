"""A Transformer whose quantized matrices keep a GGUF file's blocks (quant.mode: gguf).

read() takes the GGUF file itself, or a native checkpoint written from one (`runner quantize`),
which holds the same blocks and says so in its metadata. Float tensors (norms, biases, any
F32/F16/BF16 matrix) load as they would for quant.mode none.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from runner import checkpoint, loaders
from runner.config.errors import ConfigError, problem
from runner.config.schema import ModelSpec
from runner.loaders import gguf as gguf_loader
from runner.model.llama import Transformer, ropes
import runner.quant.gguf as gguf
from runner.quant.gguf_layers import GGUFEmbedding, GGUFLinear
from runner.quant.plan import replace

Parts = list[tuple[int, torch.Tensor]]  # (GGUF type, blocks uint8 [rows, row_bytes]) in row order


def read(path: Path, spec: ModelSpec) -> Transformer:
    """The model of `spec` on the blocks of `path` (a GGUF file, or a native checkpoint of this mode)."""
    if gguf_loader.matches(path):
        state = gguf_loader.load(path, spec, blocks=True)
        floats = {name: w for name, w in state.items() if not isinstance(w, list)}
        quantized = {name.removesuffix(".weight"): [(b.kind, b.data) for b in w]
                     for name, w in state.items() if isinstance(w, list)}
    else:
        floats, quantized = _split_native(path, checkpoint.read(path)["state_dict"])
    return build(path, spec, floats, quantized)


def build(path: Path, spec: ModelSpec, floats: dict[str, torch.Tensor], quantized: dict[str, Parts]) -> Transformer:
    """A Transformer of `spec` with a GGUF layer at each module name of `quantized` and the float
    tensors `floats` everywhere else; a tied output layer reads the embedding's own blocks."""
    with torch.device("meta"):
        model = Transformer(spec)
    for name, parts in quantized.items():
        module = _module(path, model, name)
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            raise ConfigError([problem(str(path), "model.checkpoint", f"{name!r} is not a linear layer; quant.mode "
                                       "gguf keeps blocks for linear layers and the embedding only")])
        rows = sum(blocks.shape[0] for _, blocks in parts)
        columns = {gguf.row_values(kind, blocks.shape[1]) for kind, blocks in parts}
        if rows != module.weight.shape[0] or columns != {module.weight.shape[1]}:
            raise ConfigError([problem(str(path), "model.checkpoint", f"{name!r} holds blocks of {rows} rows of "
                                       f"{'/'.join(map(str, sorted(columns)))} values, but the spec (model.arch) needs "
                                       f"{tuple(module.weight.shape)}")])
        if isinstance(module, nn.Embedding):
            (kind, blocks), = parts
            replace(model, name, GGUFEmbedding(kind, blocks))
        else:
            replace(model, name, GGUFLinear(module.in_features, parts))
    tied = spec.tie_embeddings and isinstance(model.tok_embeddings, GGUFEmbedding)
    if tied:
        model.output = GGUFLinear(spec.dim, [(model.tok_embeddings.kind, model.tok_embeddings.blocks0)])
    expected = model.state_dict()
    blocks = {k: v for k, v in expected.items() if not v.is_meta}  # the GGUF layers' own buffers
    loaders.check_shapes(path, {k: v for k, v in expected.items() if v.is_meta}, floats)
    model.load_state_dict({**floats, **blocks}, assign=True)
    if tied:  # assigning made each name a tensor of its own (one storage): one tensor again
        model.output.blocks0 = model.tok_embeddings.blocks0
    model.rope, model.local_rope = ropes(spec)  # the skeleton's are on the meta device
    return model


def _split_native(path: Path, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Parts]]:
    """A native checkpoint's float tensors, and its GGUF layers' parts by module name (each
    layer's `types` buffer lists its parts' types)."""
    prefixes = [name.removesuffix("types") for name in state if name.endswith(".types")]
    quantized, taken = {}, set()
    for prefix in prefixes:
        kinds = state[prefix + "types"].tolist()
        names = [f"{prefix}blocks{i}" for i in range(len(kinds))]
        if any(name not in state for name in names):
            raise ConfigError([problem(str(path), "model.checkpoint", f"{prefix}types lists {len(kinds)} parts, but "
                                       "some of their blocks are missing; corrupt checkpoint")])
        quantized[prefix.removesuffix(".")] = [(kind, state[name]) for kind, name in zip(kinds, names)]
        taken.update(names + [prefix + "types"])
    if "output" in quantized and "tok_embeddings" in quantized and \
            quantized["output"][0][1].data_ptr() == quantized["tok_embeddings"][0][1].data_ptr():
        del quantized["output"]  # tied: build() gives the output layer the embedding's blocks again
    return {k: v for k, v in state.items() if k not in taken}, quantized


def _module(path: Path, model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ConfigError([problem(str(path), "model.checkpoint", f"holds blocks for {name!r}, "
                                   "which the spec's model does not have")]) from None
