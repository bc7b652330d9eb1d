"""The quantized linears' matmuls, by kernel: a layout made once at load, and a matmul.

Each registry is ordered: pack_for(device) picks the first kernel that runs on the device and
takes the layer (its shape, and its scales' dtype, which is the model's); "fallback"
(dequantize, then a float matmul) takes all. At call time x and the scales are promoted to
their common dtype (lossless); should a kernel not take that dtype, the fallback runs instead.

torch's CPU kernels are listed for bf16 only: their fp32 and fp16 paths are several times
slower than the fallback's float matmul, so those dtypes take the fallback.

torch's kernels, as found in torch 2.13 (see tests/quant/test_kernels.py):
  int8 cpu   _weight_int8pack_mm(x [M, K], w int8 [N, K], scales [N]) -> [M, N]; x and scales
             share a dtype (fp32, bf16 or fp16). It reads our neutral layout as is.
  int4 cpu   _convert_weight_to_int4pack_for_cpu(levels int32 [N, K], _) -> uint8 [N, K/2]
             (per 64 output rows, a [K, 32] byte array: row j in the low nibble, j + 32 in the
             high), then _weight_int4pack_mm_for_cpu(x [M, K], that, groupsize,
             scales_and_zeros [K/groupsize, N, 2]); x and scales_and_zeros share a dtype
             (fp32, bf16, fp16); N must be a multiple of 16.
  int4 cuda  _convert_weight_to_int4pack(uint8 [N, K/2] with the EVEN column in the HIGH
             nibble, inner_k_tiles) -> int32 [N/8, K/(16 inner_k_tiles), 32, inner_k_tiles/2],
             then _weight_int4pack_mm(x bf16 [M, K], that, groupsize, scales_and_zeros bf16);
             N a multiple of 8, K of 16 * inner_k_tiles, compute capability >= 8.0.
All three dequantize as (q - 8) * scale + zero, the neutral format's convention.

runner's own CPU kernels (runner.kernels: int8_linear, int4_linear) read the neutral
layout as is, in fp32 and bf16, and stream it at close to the machine's bandwidth; they are listed
last, so only the runner-ops transform (recipe key `kernels`) picks them, by name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from runner import kernels
from runner.kernels import MAX_ROWS, gemm  # runner's GEMV kernels take up to this many rows
import runner.quant.int4 as int4


@dataclass(frozen=True)
class Kernel:
    device: str | None  # the device type it runs on; None: any
    dtypes: tuple[torch.dtype, ...] | None  # compute dtypes it takes; None: any float
    refuses: Callable[[torch.nn.Module, torch.device], str | None]  # why this layer can't use it
    pack: Callable[[torch.nn.Module], dict[str, torch.Tensor]]  # kernel-layout tensors to hold
    matmul: Callable[[torch.Tensor, torch.nn.Module], torch.Tensor]  # x [M, K] (compute dtype) -> [M, N]
    # x [..., K] in the scales' dtype, at most MAX_ROWS rows -> [..., N], called without run()'s casts
    direct: Callable[[torch.Tensor, torch.nn.Module], torch.Tensor] | None = None


def _never(layer, device):
    return None


def _nothing(layer):
    return {}


# --- int8 -----------------------------------------------------------------------------------


def _int8_cpu(x, layer):
    return torch._weight_int8pack_mm(x, layer.weight, layer.scales.to(x.dtype))


def _int8_fallback(x, layer):
    # int8 values are exact in every float dtype; the scale is applied once per output.
    return F.linear(x, layer.weight.to(x.dtype)) * layer.scales.to(x.dtype)


def _runner_refuses(layer, device):
    return None if kernels.loaded() else "runner's CPU kernels are not loaded (runner.kernels.load)"


def _int8_runner(x, layer):
    if x.shape[0] > MAX_ROWS:  # a prompt: a GEMM's work, not a GEMV's
        return gemm.tiled(x, layer.out_features, lambda rows, dtype: torch.ops.runner.dequantize_int8(
            layer.weight[rows], layer.scales[rows].to(dtype)), kernels.prompt_dtype(x.dtype))
    return torch.ops.runner.int8_linear(x, layer.weight, layer.scales.to(x.dtype), layer.int8_x)


def _int8_runner_direct(x, layer):
    return torch.ops.runner.int8_linear(x, layer.weight, layer.scales, layer.int8_x)


INT8_KERNELS = {
    "cpu": Kernel("cpu", (torch.bfloat16,), _never, _nothing, _int8_cpu),
    "fallback": Kernel(None, None, _never, _nothing, _int8_fallback),
    # Chosen by name only, by the runner-ops transform (recipe key `kernels`).
    "runner": Kernel("cpu", (torch.float32, torch.bfloat16), _runner_refuses, _nothing, _int8_runner,
                     _int8_runner_direct),
}


# --- int4 -----------------------------------------------------------------------------------


def _int4_cpu_refuses(layer, device):
    return None if layer.out_features % 16 == 0 else "out_features is not a multiple of 16"


def _int4_cpu_pack(layer):
    levels = int4.unpack(layer.weight).to(torch.int32)  # [N, K]
    return {"packed_weight": torch.ops.aten._convert_weight_to_int4pack_for_cpu(levels, 1),
            "packed_scales_and_zeros": int4.scales_and_zeros(layer.scales, layer.zeros)}


def _int4_cpu(x, layer):
    sz = layer.packed_scales_and_zeros.to(x.dtype)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, layer.packed_weight, layer.groupsize, sz)


def _inner_k_tiles(k: int) -> int | None:
    return next((t for t in (8, 4, 2) if k % (16 * t) == 0), None)


def _int4_cuda_refuses(layer, device):
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "needs compute capability >= 8.0"
    if layer.out_features % 8:
        return "out_features is not a multiple of 8"
    if _inner_k_tiles(layer.in_features) is None:
        return "in_features is not a multiple of 32"
    return None


def _int4_cuda_pack(layer):
    swapped = (layer.weight << 4) | (layer.weight >> 4)  # this kernel wants the even column high
    tiles = _inner_k_tiles(layer.in_features)
    return {"packed_weight": torch.ops.aten._convert_weight_to_int4pack(swapped.contiguous(), tiles),
            "packed_scales_and_zeros": int4.scales_and_zeros(layer.scales, layer.zeros).to(torch.bfloat16)}


def _int4_cuda(x, layer):
    return torch.ops.aten._weight_int4pack_mm(x, layer.packed_weight, layer.groupsize, layer.packed_scales_and_zeros)


def _int4_fallback(x, layer):
    # The weights are dequantized exactly in fp32 (or wider), and the matmul is done there too.
    wide = torch.promote_types(x.dtype, torch.float32)
    w = int4.dequantize(int4.unpack(layer.weight), layer.scales, layer.zeros)  # fp32 [N, K]
    return F.linear(x.to(wide), w.to(wide)).to(x.dtype)


def _int4_runner_refuses(layer, device):
    if layer.groupsize < 32 or layer.groupsize & (layer.groupsize - 1):
        return "groupsize is not a power of two >= 32"
    return _runner_refuses(layer, device)


def _int4_runner(x, layer):
    if x.shape[0] > MAX_ROWS:  # a prompt: a GEMM's work, not a GEMV's
        return gemm.tiled(x, layer.out_features, lambda rows, dtype: torch.ops.runner.dequantize_int4(
            layer.weight[rows], layer.scales[rows].to(dtype), layer.zeros[rows].to(dtype), layer.groupsize),
            kernels.prompt_dtype(x.dtype))
    return torch.ops.runner.int4_linear(x, layer.weight, layer.scales.to(x.dtype), layer.zeros.to(x.dtype),
                                        layer.groupsize, layer.int8_x)


def _int4_runner_direct(x, layer):
    return torch.ops.runner.int4_linear(x, layer.weight, layer.scales, layer.zeros, layer.groupsize, layer.int8_x)


INT4_KERNELS = {
    "cpu": Kernel("cpu", (torch.bfloat16,), _int4_cpu_refuses, _int4_cpu_pack, _int4_cpu),
    "cuda": Kernel("cuda", (torch.bfloat16,), _int4_cuda_refuses, _int4_cuda_pack, _int4_cuda),
    "fallback": Kernel(None, None, _never, _nothing, _int4_fallback),
    "runner": Kernel("cpu", (torch.float32, torch.bfloat16), _int4_runner_refuses, _nothing, _int4_runner,
                     _int4_runner_direct),
}


# --- choosing and running -------------------------------------------------------------------


def choose(registry: dict[str, Kernel], layer, device: torch.device, name: str | None = None) -> str:
    """The first kernel of the registry that runs on `device` and accepts the layer (or `name`, checked)."""
    for candidate, kernel in registry.items():
        if name not in (None, candidate):
            continue
        if kernel.device not in (None, device.type):
            why = f"runs on {kernel.device} only"
        elif kernel.dtypes is not None and layer.scales.dtype not in kernel.dtypes:
            why = f"takes {', '.join(str(d).removeprefix('torch.') for d in kernel.dtypes)} only, not {layer.scales.dtype}"
        else:
            why = kernel.refuses(layer, device)
        if why is None:
            return candidate
        if name is not None:
            raise ValueError(f"kernel {name!r} refuses this layer on {device}: {why}")
    raise ValueError(f"unknown kernel {name!r}; kernels: {', '.join(registry)}")


def run(registry: dict[str, Kernel], layer, x: torch.Tensor) -> torch.Tensor:
    """layer(x) for x [..., in] of any float dtype -> [..., out] in x's dtype."""
    kernel = registry[layer.kernel]
    if kernel.device is not None and x.device.type != kernel.device:
        raise RuntimeError(f"this layer is packed for {kernel.device} but got input on {x.device}; "
                           f"call runner.quant.pack_for(model, device) after moving the model")
    compute = torch.promote_types(x.dtype, layer.scales.dtype)
    if kernel.dtypes is not None and compute not in kernel.dtypes:
        kernel = registry["fallback"]
    x2 = x.reshape(-1, x.shape[-1]).to(compute).contiguous()  # [M, in]
    y = kernel.matmul(x2, layer)  # [M, out]
    return y.to(x.dtype).reshape(*x.shape[:-1], layer.out_features)
