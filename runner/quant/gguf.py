"""GGUF's quantized blocks as the file stores them, and their values (quant.mode: gguf).

A GGUF tensor [N, K] of a block type is N rows of K / block_size blocks, each type_size bytes;
runner keeps exactly those bytes, as uint8 [N, row_bytes], one row of blocks per output row. The
layout needs no conversion, holds exactly the file's values, and is as big as the file's tensor.

    block type  values  bytes  value of level q (d, dmin: fp16; sc, m: 6-bit, Q6_K's sc: int8)
    Q4_0        32      18     d * (q - 8)                          q 0..15
    Q4_1        32      20     d * q + m                            m fp16
    Q5_0        32      22     d * (q - 16)                         q 0..31, fifth bits in a plane
    Q5_1        32      24     d * q + m
    Q8_0        32      34     d * q                                q int8
    Q4_K        256     144    (d * sc) * q - dmin * m              per 32 values: sc, m
    Q5_K        256     176    likewise, q 0..31
    Q6_K        256     210    (d * sc) * (q - 32)                  per 16 values: sc; q 0..63

dequantize() reproduces the `gguf` package's numpy dequantize bit for bit (the same fp32
operations in the same order), in torch, so it runs on any device.
"""
from __future__ import annotations

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

SUPPORTED = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K)
FLOAT = (T.F32, T.F16, T.BF16)  # kept as float weights in the model's dtype
SUPPORTED_NAMES = ", ".join(t.name for t in SUPPORTED + FLOAT)


def block_size(kind: int) -> int:
    """Values per block of GGUF type `kind`."""
    return GGML_QUANT_SIZES[T(kind)][0]


def row_bytes(kind: int, k: int) -> int:
    """Bytes of a row of `k` values of GGUF type `kind` (k a multiple of its block size)."""
    size, nbytes = GGML_QUANT_SIZES[T(kind)]
    return k // size * nbytes


def row_values(kind: int, nbytes: int) -> int:
    """Values in a row of `nbytes` bytes of GGUF type `kind`."""
    size, type_size = GGML_QUANT_SIZES[T(kind)]
    return nbytes // type_size * size


def dequantize(blocks: torch.Tensor, kind: int) -> torch.Tensor:
    """The fp32 values [..., K] of rows of blocks uint8 [..., row_bytes] of GGUF type `kind`."""
    kind = T(kind)
    size, type_size = GGML_QUANT_SIZES[kind]
    flat = blocks.reshape(-1, type_size)  # [n_blocks, type_size]
    values = _DEQUANTIZE[kind](flat)  # [n_blocks, size]
    return values.reshape(*blocks.shape[:-1], blocks.shape[-1] // type_size * size)


def _half(b: torch.Tensor) -> torch.Tensor:
    """fp16 fields (2 bytes each, little-endian) -> fp32 [n, fields]."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor, run: int) -> torch.Tensor:
    """uint8 [n, bytes] -> levels [n, 2 * bytes]: per `run` bytes, their low nibbles then their high."""
    qs = qs.reshape(qs.shape[0], -1, 1, run)
    return torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(qs.shape[0], -1)


def _bits(planes: torch.Tensor, count: int) -> torch.Tensor:
    """Bit i of a little-endian bit field uint8 [n, count / 8] -> uint8 [n, count]."""
    shifts = torch.arange(8, dtype=torch.uint8, device=planes.device)
    return ((planes[..., None] >> shifts) & 1).reshape(planes.shape[0], count)


def _q4_0(b):
    d = _half(b[:, :2])
    q = _nibbles(b[:, 2:], 16).to(torch.int8) - 8
    return d * q.float()


def _q4_1(b):
    d, m = _half(b[:, :2]), _half(b[:, 2:4])
    return d * _nibbles(b[:, 4:], 16).float() + m


def _q5_0(b):
    d = _half(b[:, :2])
    q = (_nibbles(b[:, 6:], 16) | (_bits(b[:, 2:6], 32) << 4)).to(torch.int8) - 16
    return d * q.float()


def _q5_1(b):
    d, m = _half(b[:, :2]), _half(b[:, 2:4])
    return d * (_nibbles(b[:, 8:], 16) | (_bits(b[:, 4:8], 32) << 4)).float() + m


def _q8_0(b):
    return b[:, 2:].contiguous().view(torch.int8).float() * _half(b[:, :2])


def k_scales(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes of 6-bit scales and mins -> sc, m uint8 [n, 8] (sub-blocks of 32)."""
    d, m, md = packed.reshape(-1, 3, 4).unbind(1)
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mins = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mins


def _k_affine(b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """(d * sc) * q - dmin * m per sub-block of 32, for Q4_K and Q5_K levels q [n, 256]."""
    d, dmin = _half(b[:, :2]), _half(b[:, 2:4])
    sc, mins = k_scales(b[:, 4:16])
    scale = (d * sc.float())[..., None]  # [n, 8, 1]
    offset = (dmin * mins.float())[..., None]
    return (scale * q.reshape(-1, 8, 32).float() - offset).reshape(-1, 256)


def _q4_k(b):
    return _k_affine(b, _nibbles(b[:, 16:], 32))


def _q5_k(b):
    high = _bits(b[:, 16:48], 256).reshape(-1, 32, 8).transpose(1, 2).reshape(-1, 256)  # bit j of byte i: value 32 j + i
    return _k_affine(b, _nibbles(b[:, 48:], 32) | (high << 4))


def _q6_k(b):
    ql, qh = b[:, :128], b[:, 128:192]
    sc = b[:, 192:208].contiguous().view(torch.int8).float()
    scale = (_half(b[:, 208:]) * sc)[..., None]  # [n, 16, 1]
    low = _nibbles(ql, 64).reshape(-1, 8, 32)  # per 64 bytes: their 64 low nibbles, then the 64 high
    high = torch.stack([(qh.reshape(-1, 2, 32) >> s) & 3 for s in (0, 2, 4, 6)], dim=2).reshape(-1, 8, 32)
    q = (low | (high << 4)).to(torch.int8) - 32
    return (scale * q.reshape(-1, 16, 16).float()).reshape(-1, 256)


_DEQUANTIZE = {T.Q4_0: _q4_0, T.Q4_1: _q4_1, T.Q5_0: _q5_0, T.Q5_1: _q5_1, T.Q8_0: _q8_0,
               T.Q4_K: _q4_k, T.Q5_K: _q5_k, T.Q6_K: _q6_k}
