"""Linear and embedding layers on GGUF blocks as the file stores them (quant.mode: gguf).

A layer's output rows come in parts, each of one block type: the fused q/k/v projection of a
file that stores q and k as Q5_0 and v as Q8_0 is two parts (neighbouring tensors of one type are
joined into one part). Each part is a
persistent buffer `blocks{i}` (uint8 [rows, row_bytes], runner.quant.gguf), and `types` lists
their GGUF types, so state_dict() is what a checkpoint stores and a skeleton can be shaped from it.

On runner's CPU kernels a few rows (decoding, verifying, batches) go through gguf_linear, which
reads the blocks as they are, or through the fused decode step (decode_layers) with the model's
other layers; a prompt dequantizes a tile of rows at a time into torch's GEMM.
Elsewhere (torch's ops, CUDA) each call dequantizes the layer's parts and runs a float matmul.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from runner import kernels
from runner.kernels import MAX_ROWS, gemm
import runner.quant.gguf as gguf

KERNELS = ("fallback", "runner")
MAX_PARTS = 4  # the most parts runner's fused decode step takes in one linear (gemv.h's kMaxGgufParts)


class GGUFLinear(nn.Module):
    """y = x @ W.T for W the rows of its parts' blocks, one after the other."""

    def __init__(self, in_features: int, parts: list[tuple[int, torch.Tensor]]):
        super().__init__()
        self.in_features = in_features
        self.kernel, self.int8_x = "fallback", False
        self._set_parts(_merged(parts))

    def _set_parts(self, parts: list[tuple[int, torch.Tensor]]) -> None:
        for i in range(len(getattr(self, "kinds", ()))):
            delattr(self, f"blocks{i}")
        self.kinds = [int(kind) for kind, _ in parts]
        for i, (kind, blocks) in enumerate(parts):
            if gguf.row_values(kind, blocks.shape[1]) != self.in_features:
                raise ValueError(f"part {i} holds rows of {gguf.row_values(kind, blocks.shape[1])} values, "
                                 f"not {self.in_features}")
            self.register_buffer(f"blocks{i}", blocks)
        self.register_buffer("types", torch.tensor(self.kinds, dtype=torch.int64, device=parts[0][1].device))
        self.out_features = sum(blocks.shape[0] for _, blocks in parts)

    @property
    def parts(self) -> list[tuple[int, torch.Tensor]]:
        return [(kind, getattr(self, f"blocks{i}")) for i, kind in enumerate(self.kinds)]

    def pack_for(self, device: torch.device | str, kernel: str | None = None) -> str:
        """"runner" (by name only: runner's CPU kernels, loaded) or "fallback" (any device)."""
        if kernel == "runner":
            why = _runner_refuses(torch.device(device))
            if why:
                raise ValueError(f"kernel 'runner' refuses this layer on {device}: {why}")
        elif kernel not in (None, "fallback"):
            raise ValueError(f"unknown kernel {kernel!r}; kernels: {', '.join(KERNELS)}")
        self.kernel = kernel or "fallback"
        return self.kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self.kernel == "runner" and x.device.type == "cpu" and x.dtype in kernels.DTYPES:
            flat = flat.contiguous()
            if flat.shape[0] <= MAX_ROWS and len(self.kinds) == 1:  # a decode step's usual call
                y = torch.ops.runner.gguf_linear(flat, self.blocks0, self.kinds[0], self.int8_x)
                return y.reshape(*x.shape[:-1], self.out_features)
            if flat.shape[0] <= MAX_ROWS:
                outs = [torch.ops.runner.gguf_linear(flat, blocks, kind, self.int8_x) for kind, blocks in self.parts]
            else:  # a prompt: a GEMM's work, on rows dequantized a tile at a time
                dtype = kernels.prompt_dtype(x.dtype)
                outs = [gemm.tiled(flat, blocks.shape[0], lambda rows, wide, kind=kind, blocks=blocks:
                                   torch.ops.runner.dequantize_gguf(blocks[rows], kind, wide), dtype)
                        for kind, blocks in self.parts]
        else:  # the values exactly, in fp32 (or wider), and the matmul there too
            wide = torch.promote_types(x.dtype, torch.float32)
            outs = [F.linear(flat.to(wide), gguf.dequantize(blocks, kind).to(wide)).to(x.dtype)
                    for kind, blocks in self.parts]
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        return y.reshape(*x.shape[:-1], self.out_features)

    def dequantize(self) -> torch.Tensor:
        """The layer's weights [out, in] in fp32."""
        return torch.cat([gguf.dequantize(blocks, kind) for kind, blocks in self.parts])

    def kernel_operands(self, dtype: torch.dtype):
        """runner's decode_layers operands (see runner.model.llama.Linear.kernel_operands): the
        parts' blocks and their types, on runner's kernels only; any float dtype reads them."""
        if self.kernel != "runner" or dtype not in kernels.DTYPES or len(self.kinds) > MAX_PARTS:
            return None
        return (*(blocks for _, blocks in self.parts), self.types), 0, self.int8_x

    def shard_(self, dim: str, keep: torch.Tensor) -> None:
        """Keep output rows ("out") or input columns ("in", whole blocks only) `keep`, as copies
        (tensor parallelism's protocol)."""
        keep = keep.to(self.blocks0.device)
        parts = []
        if dim == "out":
            start = 0
            for kind, blocks in self.parts:
                mine = keep[(keep >= start) & (keep < start + blocks.shape[0])] - start
                if len(mine):
                    parts.append((kind, blocks.index_select(0, mine).contiguous()))
                start += blocks.shape[0]
        else:
            for kind, blocks in self.parts:
                parts.append((kind, blocks.index_select(1, _block_bytes(kind, keep, self.in_features)).contiguous()))
            self.in_features = len(keep)
        self._set_parts(parts)

    def extra_repr(self) -> str:
        types = ", ".join(gguf.T(kind).name for kind in self.kinds)
        return f"in_features={self.in_features}, out_features={self.out_features}, types=[{types}], kernel={self.kernel}"


def _merged(parts: list[tuple[int, torch.Tensor]]) -> list[tuple[int, torch.Tensor]]:
    """Parts with neighbours of the same type joined into one (rows are independent, so this is
    exact): q, k and v of one type make one kernel call, not three."""
    out = []
    for kind, blocks in parts:
        if out and out[-1][0] == int(kind):
            out[-1] = (int(kind), torch.cat([out[-1][1], blocks]))
        else:
            out.append((int(kind), blocks))
    return out


def _block_bytes(kind: int, keep: torch.Tensor, width: int) -> torch.Tensor:
    """The byte columns of a row of GGUF type `kind` that hold input columns `keep` (whole blocks)."""
    size = gguf.block_size(kind)
    nbytes = gguf.row_bytes(kind, size)
    blocks = keep.reshape(-1, size) if len(keep) % size == 0 else None
    whole = blocks is not None and not (blocks[:, 0] % size).any() and \
        bool((blocks - blocks[:, :1] == torch.arange(size, device=keep.device)).all())
    if not whole:
        raise ValueError(f"an input split of this {gguf.T(kind).name} layer must keep whole blocks of {size} "
                         f"columns, not {len(keep)} of its {width}")
    first = blocks[:, 0] // size * nbytes  # each kept block's first byte
    return (first[:, None] + torch.arange(nbytes, device=keep.device)).flatten()


class GGUFEmbedding(nn.Module):
    """Token embeddings on one GGUF tensor's blocks: each looked-up row is dequantized alone, so
    a large vocabulary is never made float whole; rows come out in `dtype` (the model's)."""

    def __init__(self, kind: int, blocks: torch.Tensor, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.kind = int(kind)
        self.num_embeddings, self.embedding_dim = blocks.shape[0], gguf.row_values(kind, blocks.shape[1])
        self.register_buffer("blocks0", blocks)
        self.register_buffer("types", torch.tensor([self.kind], dtype=torch.int64, device=blocks.device))
        self.register_buffer("dtype_probe", torch.zeros((), dtype=dtype, device=blocks.device), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return gguf.dequantize(self.blocks0[tokens], self.kind).to(self.dtype_probe.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, type={gguf.T(self.kind).name}"


def _runner_refuses(device: torch.device) -> str | None:
    if device.type != "cpu":
        return "runs on cpu only"
    return None if kernels.loaded() else "runner's CPU kernels are not loaded (runner.kernels.load)"
