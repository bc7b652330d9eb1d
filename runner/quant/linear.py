"""Quantized stand-ins for nn.Linear and nn.Embedding.

Their buffers are the neutral layout (int8.py, int4.py), so state_dict() is what a checkpoint
stores whatever the device. pack_for(device) adds the chosen kernel's layout beside them
(non-persistent buffers) and records the kernel's name; until then the fallback runs.
"""
from __future__ import annotations

import torch
from torch import nn

import runner.quant.int4 as int4
import runner.quant.int8 as int8
import runner.quant.kernels as kernels


class QuantizedLinear(nn.Module):
    """The shared half of Int8Linear and Int4Linear: kernel choice, packing, forward."""

    KERNELS: dict[str, kernels.Kernel] = {}

    def pack_for(self, device: torch.device | str, kernel: str | None = None) -> str:
        """Lay out the fastest kernel for `device` (or the one named); returns its name."""
        device = torch.device(device)
        self.kernel = kernels.choose(self.KERNELS, self, device, kernel)
        for name in self.packed:  # the previous kernel's layout
            delattr(self, name)
        packed = self.KERNELS[self.kernel].pack(self)
        for name, tensor in packed.items():
            self.register_buffer(name, tensor, persistent=False)
        self.packed = tuple(packed)
        return self.kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        direct = self.KERNELS[self.kernel].direct
        if direct is not None and x.dtype == self.scales.dtype and x.numel() <= kernels.MAX_ROWS * self.in_features:
            return direct(x, self)  # decoding on runner's kernels: no reshaping or casting around the call
        return kernels.run(self.KERNELS, self, x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"

    def shard_(self, dim: str, keep: torch.Tensor) -> None:
        """Keep only the output rows (dim "out") or input columns ("in") at indices `keep`, as
        copies of the neutral buffers (tensor parallelism's protocol); a packed layer is packed again."""
        repack = self.kernel != "fallback"
        for name in self.packed:
            delattr(self, name)
        self.kernel, self.packed = "fallback", ()
        keep = keep.to(self.weight.device)
        for name, tensor in self._slices(dim, keep).items():
            setattr(self, name, tensor.contiguous())
        if dim == "out":
            self.out_features = len(keep)
        else:
            self.in_features = len(keep)
        if repack:
            self.pack_for(self.weight.device)

    def _slices(self, dim: str, keep: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class Int8Linear(QuantizedLinear):
    """weight int8 [out, in], scales [out]: w = weight * scales[:, None]."""

    KERNELS = kernels.INT8_KERNELS

    def __init__(self, in_features: int, out_features: int, dtype=torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features, self.kernel, self.packed = in_features, out_features, "fallback", ()
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=dtype, device=device))

    def _slices(self, dim, keep):
        if dim == "out":  # per-output-channel scales follow their rows
            return {"weight": self.weight.index_select(0, keep), "scales": self.scales.index_select(0, keep)}
        return {"weight": self.weight.index_select(1, keep)}

    @classmethod
    def from_float(cls, linear: nn.Linear) -> "Int8Linear":
        q, scales = int8.quantize(linear.weight.detach())
        layer = cls(linear.in_features, linear.out_features, scales.dtype, q.device)
        layer.weight, layer.scales = q, scales
        return layer


class Int4Linear(QuantizedLinear):
    """weight uint8 [out, in / 2] (two levels a byte), scales and zeros [out, in / groupsize]."""

    KERNELS = kernels.INT4_KERNELS

    def __init__(self, in_features: int, out_features: int, groupsize: int, dtype=torch.float32, device=None):
        super().__init__()
        if in_features % groupsize:
            raise ValueError(f"groupsize {groupsize} does not divide in_features {in_features}")
        self.in_features, self.out_features, self.groupsize = in_features, out_features, groupsize
        self.kernel, self.packed = "fallback", ()
        groups = in_features // groupsize
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=dtype, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=dtype, device=device))

    @classmethod
    def from_levels(cls, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> "Int4Linear":
        """From unpacked levels q [out, in] and their scales, zeros [out, groups]."""
        out, n = q.shape
        layer = cls(n, out, n // scales.shape[1], scales.dtype, q.device)
        layer.weight, layer.scales, layer.zeros = int4.pack(q), scales, zeros
        return layer

    @classmethod
    def from_float(cls, linear: nn.Linear, groupsize: int) -> "Int4Linear":
        return cls.from_levels(*int4.quantize(linear.weight.detach(), groupsize))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", groupsize={self.groupsize}"

    def _slices(self, dim, keep):
        if dim == "out":
            return {name: getattr(self, name).index_select(0, keep) for name in ("weight", "scales", "zeros")}
        gs = self.groupsize
        groups = keep.reshape(-1, gs) if len(keep) % gs == 0 else None
        if groups is None or (groups[:, 0] % gs).any() or (groups - groups[:, :1] != torch.arange(gs, device=keep.device)).any():
            raise ValueError(f"an input split of this int4 layer must keep whole groups of {gs} columns")
        first = groups[:, 0] // gs  # the groups kept
        return {"weight": self.weight.index_select(1, keep[0::2] // 2),
                "scales": self.scales.index_select(1, first), "zeros": self.zeros.index_select(1, first)}


class Int8Embedding(nn.Module):
    """weight int8 [vocab, dim], scales [vocab]; looks rows up in the scales' dtype."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype=torch.float32, device=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("weight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(num_embeddings, dtype=dtype, device=device))

    @classmethod
    def from_float(cls, embedding: nn.Embedding) -> "Int8Embedding":
        q, scales = int8.quantize(embedding.weight.detach())
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, scales.dtype, q.device)
        layer.weight, layer.scales = q, scales
        return layer

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = self.weight[tokens].float() * self.scales[tokens].float()[..., None]  # [..., dim]
        return rows.to(self.scales.dtype)
