"""Quantized stand-ins for nn.Linear and nn.Embedding.

Their buffers are the neutral layout (int8.py, int4.py), so state_dict() is what a checkpoint
stores whatever the device. pack_for(device) adds the chosen kernel's layout beside them
(non-persistent buffers) and records the kernel's name; until then the fallback runs.
"""
from __future__ import annotations

import torch
from torch import nn

from runner import kernels
from runner.model import functional
import runner.quant.int4 as int4
import runner.quant.int8 as int8
import runner.quant.matmuls as matmuls


class QuantizedLinear(nn.Module):
    """The shared half of Int8Linear and Int4Linear: kernel choice, packing, forward."""

    KERNELS: dict[str, matmuls.Kernel] = {}

    def pack_for(self, device: torch.device | str, kernel: str | None = None) -> str:
        """Lay out the fastest kernel for `device` (or the one named); returns its name."""
        device = torch.device(device)
        self.kernel = matmuls.choose(self.KERNELS, self, device, kernel)
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
        return matmuls.run(self.KERNELS, self, x)

    def kernel_operands(self, dtype: torch.dtype) -> tuple[tuple[torch.Tensor, ...], int, bool] | None:
        """runner's decode_layers operands (see runner.model.llama.Linear.kernel_operands): only on
        runner's kernels, with activations in the scales' dtype, as forward's direct call."""
        if self.KERNELS[self.kernel].direct is None or self.scales.dtype != dtype:
            return None
        return self._operands()

    def _operands(self) -> tuple[tuple[torch.Tensor, ...], int, bool]:
        raise NotImplementedError

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
    """weight int8 [out, in], scales [out]: w = weight * scales[:, None].

    int8_x (quant.activations: int8, for an int4 mode's int8 output layer): decoding on runner's
    CPU kernels quantizes the activations to int8 per block of 32 inputs and multiplies integers
    (in_features a multiple of 32; otherwise they stay float); a prompt's GEMM takes them as they are.
    """

    KERNELS = matmuls.INT8_KERNELS

    def __init__(self, in_features: int, out_features: int, dtype=torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features, self.kernel, self.packed = in_features, out_features, "fallback", ()
        self.int8_x = False
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=dtype, device=device))

    def _operands(self):
        return (self.weight, self.scales), 0, self.int8_x

    def extra_repr(self) -> str:
        return super().extra_repr() + (", int8_x=True" if self.int8_x else "")

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
    """weight uint8 [out, in / 2] (two levels a byte), scales and zeros [out, in / groupsize].

    int8_x (quant.activations: int8): decoding on runner's CPU kernels quantizes the activations
    to int8 per group of `groupsize` inputs and multiplies integers; a prompt's GEMM, and every
    other kernel, takes them as they are (as do the experts of a mixture, Int4Experts).
    """

    KERNELS = matmuls.INT4_KERNELS

    def __init__(self, in_features: int, out_features: int, groupsize: int, dtype=torch.float32, device=None):
        super().__init__()
        if in_features % groupsize:
            raise ValueError(f"groupsize {groupsize} does not divide in_features {in_features}")
        self.in_features, self.out_features, self.groupsize = in_features, out_features, groupsize
        self.kernel, self.packed = "fallback", ()
        self.int8_x = False  # set by runner.quant.use_activations
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

    def _operands(self):
        return (self.weight, self.scales, self.zeros), self.groupsize, self.int8_x

    def extra_repr(self) -> str:
        return super().extra_repr() + f", groupsize={self.groupsize}" + (", int8_x=True" if self.int8_x else "")

    def _slices(self, dim, keep):
        if dim == "out":
            return {name: getattr(self, name).index_select(0, keep) for name in ("weight", "scales", "zeros")}
        return _int4_columns(self, keep, axis=1)


def _int4_columns(layer, keep: torch.Tensor, axis: int) -> dict[str, torch.Tensor]:
    """An int4 layer's buffers for input columns `keep` (whole groups only), columns on `axis`."""
    gs = layer.groupsize
    groups = keep.reshape(-1, gs) if len(keep) % gs == 0 else None
    if groups is None or (groups[:, 0] % gs).any() or (groups - groups[:, :1] != torch.arange(gs, device=keep.device)).any():
        raise ValueError(f"an input split of this int4 layer must keep whole groups of {gs} columns")
    first = groups[:, 0] // gs  # the groups kept
    return {"weight": layer.weight.index_select(axis, keep[0::2] // 2),
            "scales": layer.scales.index_select(axis, first), "zeros": layer.zeros.index_select(axis, first)}


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


class QuantizedExperts(nn.Module):
    """Stacked quantized experts (runner.model.llama.ExpertLinear's stand-in): buffers [E, out, ...],
    row m of the input through expert ids[m].

    On runner's kernels (pack_for(device, "runner")) a row reads its expert's integers once, with
    no dequantized copy. Otherwise only the experts the rows chose are dequantized, and the rows
    go through runner.model.functional.expert_linear (gathered for a token, grouped for a prompt).
    """

    OP: str = ""  # runner's kernel, torch.ops.runner.<OP>

    def pack_for(self, device: torch.device | str, kernel: str | None = None) -> str:
        """"runner" (by name only, as for the linears) or "fallback"; a ValueError says why not runner."""
        if kernel == "runner":
            why = self._refuses(torch.device(device))
            if why:
                raise ValueError(f"kernel 'runner' refuses this layer on {device}: {why}")
        elif kernel not in (None, "fallback"):
            raise ValueError(f"unknown kernel {kernel!r}; kernels: fallback, runner")
        self.kernel = kernel or "fallback"
        return self.kernel

    def _refuses(self, device: torch.device) -> str | None:
        if device.type != "cpu":
            return "runs on cpu only"
        if self.scales.dtype not in kernels.DTYPES:
            return f"takes float32 and bfloat16 only, not {self.scales.dtype}"
        return None if kernels.loaded() else "runner's CPU kernels are not loaded (runner.kernels.load)"

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        on_kernels = self.kernel == "runner" and x.dtype == self.scales.dtype
        if on_kernels and x.shape[0] <= kernels.MAX_ROWS:
            return getattr(torch.ops.runner, self.OP)(x, *self._operands(), ids)
        # A prompt, grouped by expert: on runner's kernels a group of a few rows reads its expert
        # once through the GEMV kernel; a bigger one dequantizes it for a GEMM.
        matmul = self._group_matmul if on_kernels else None
        return functional.expert_linear(x, _Dequantized(self, x.dtype), ids, matmul)

    def _group_matmul(self, x: torch.Tensor, e: int) -> torch.Tensor:
        if x.shape[0] <= kernels.MAX_ROWS:
            return self._expert_kernel(x, e)
        return torch.nn.functional.linear(x, self._kernel_dequantize(e))

    def dequantize(self, index) -> torch.Tensor:
        """The fp32 weights of the experts at `index` (an int, or a tensor of expert ids)."""
        raise NotImplementedError

    def dequantize_as(self, index, dtype: torch.dtype) -> torch.Tensor:
        """dequantize(index) in `dtype`; one expert on runner's kernels is dequantized by them
        (each value rounded once, as the linears' prompt path does)."""
        if self.kernel == "runner" and isinstance(index, int) and dtype == self.scales.dtype:
            return self._kernel_dequantize(index)
        return self.dequantize(index).to(dtype)

    def shard_(self, dim: str, keep: torch.Tensor) -> None:
        """Keep output rows ("out") or input columns ("in") `keep` in every expert (tensor parallelism)."""
        keep = keep.to(self.weight.device)
        for name, tensor in self._slices(dim, keep).items():
            setattr(self, name, tensor.contiguous())
        _, self.out_features, _ = self.weight.shape
        if dim == "in":
            self.in_features = len(keep)

    def extra_repr(self) -> str:
        return (f"n_experts={self.n_experts}, in_features={self.in_features}, out_features={self.out_features}, "
                f"kernel={self.kernel}")


class _Dequantized:
    """What functional.expert_linear indexes (w[ids], w[e], w.shape), dequantized on demand into `dtype`."""

    def __init__(self, layer: QuantizedExperts, dtype: torch.dtype):
        self.layer, self.dtype = layer, dtype
        self.shape = (layer.n_experts, layer.out_features, layer.in_features)

    def __getitem__(self, index) -> torch.Tensor:
        return self.layer.dequantize_as(index, self.dtype)


class Int8Experts(QuantizedExperts):
    """weight int8 [E, out, in], scales [E, out]: expert e is Int8Linear's layout."""

    OP = "int8_expert_linear"

    def __init__(self, n_experts: int, in_features: int, out_features: int, dtype=torch.float32, device=None):
        super().__init__()
        self.n_experts, self.in_features, self.out_features, self.kernel = n_experts, in_features, out_features, "fallback"
        self.register_buffer("weight", torch.zeros(n_experts, out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(n_experts, out_features, dtype=dtype, device=device))

    @classmethod
    def from_float(cls, layer: nn.Module) -> "Int8Experts":
        E, out, n = layer.weight.shape
        q, scales = int8.quantize(layer.weight.detach().reshape(E * out, n))  # per row: per expert as well
        new = cls(E, n, out, scales.dtype, q.device)
        new.weight, new.scales = q.view(E, out, n), scales.view(E, out)
        return new

    def dequantize(self, index) -> torch.Tensor:
        return int8.dequantize(self.weight[index], self.scales[index])

    def _operands(self):
        return self.weight, self.scales

    def _kernel_dequantize(self, e: int) -> torch.Tensor:
        return torch.ops.runner.dequantize_int8(self.weight[e], self.scales[e])

    def _expert_kernel(self, x: torch.Tensor, e: int) -> torch.Tensor:
        return torch.ops.runner.int8_linear(x, self.weight[e], self.scales[e])

    def _slices(self, dim, keep):
        if dim == "out":
            return {"weight": self.weight.index_select(1, keep), "scales": self.scales.index_select(1, keep)}
        return {"weight": self.weight.index_select(2, keep)}


class Int4Experts(QuantizedExperts):
    """weight uint8 [E, out, in / 2], scales and zeros [E, out, in / groupsize]: expert e is Int4Linear's layout."""

    OP = "int4_expert_linear"

    def __init__(self, n_experts: int, in_features: int, out_features: int, groupsize: int, dtype=torch.float32,
                 device=None):
        super().__init__()
        if in_features % groupsize:
            raise ValueError(f"groupsize {groupsize} does not divide in_features {in_features}")
        self.n_experts, self.in_features, self.out_features = n_experts, in_features, out_features
        self.groupsize, self.kernel = groupsize, "fallback"
        groups = in_features // groupsize
        self.register_buffer("weight", torch.zeros(n_experts, out_features, in_features // 2, dtype=torch.uint8,
                                                   device=device))
        self.register_buffer("scales", torch.ones(n_experts, out_features, groups, dtype=dtype, device=device))
        self.register_buffer("zeros", torch.zeros(n_experts, out_features, groups, dtype=dtype, device=device))

    @classmethod
    def from_float(cls, layer: nn.Module, groupsize: int) -> "Int4Experts":
        E, out, n = layer.weight.shape
        q, scales, zeros = int4.quantize(layer.weight.detach().reshape(E * out, n), groupsize)
        new = cls(E, n, out, groupsize, scales.dtype, q.device)
        new.weight = int4.pack(q).view(E, out, n // 2)
        new.scales, new.zeros = scales.view(E, out, -1), zeros.view(E, out, -1)
        return new

    def dequantize(self, index) -> torch.Tensor:
        return int4.dequantize(int4.unpack(self.weight[index]), self.scales[index], self.zeros[index])

    def _refuses(self, device):
        if self.groupsize < 32 or self.groupsize & (self.groupsize - 1):
            return "groupsize is not a power of two >= 32"
        return super()._refuses(device)

    def _operands(self):
        return self.weight, self.scales, self.zeros, self.groupsize

    def _kernel_dequantize(self, e: int) -> torch.Tensor:
        return torch.ops.runner.dequantize_int4(self.weight[e], self.scales[e], self.zeros[e], self.groupsize)

    def _expert_kernel(self, x: torch.Tensor, e: int) -> torch.Tensor:
        return torch.ops.runner.int4_linear(x, self.weight[e], self.scales[e], self.zeros[e], self.groupsize)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", groupsize={self.groupsize}"

    def _slices(self, dim, keep):
        if dim == "out":
            return {name: getattr(self, name).index_select(1, keep) for name in ("weight", "scales", "zeros")}
        return _int4_columns(self, keep, axis=2)
