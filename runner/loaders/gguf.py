"""GGUF files (llama.cpp), memory-mapped; every tensor type the gguf package can dequantize.

llama.cpp's converter stores q/k rows in Meta's interleaved order, so they are permuted back
to rotate-half order here, exactly as for Meta checkpoints.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.quants import dequantize

from runner.config.errors import ConfigError, problem
from runner.config.schema import ModelSpec, RopeScaling
from runner.loaders.base import Progress
from runner.loaders.meta import from_interleaved
from runner.model.functional import rope_frequencies

KEY = "model.checkpoint"
MAGIC = b"GGUF"
ARCHITECTURES = ("llama",)
ROPE_FREQS = "rope_freqs.weight"  # Llama-3.1's scaling, stored as per-frequency wavelength factors
NUMBERS = {GGUFValueType.UINT8, GGUFValueType.INT8, GGUFValueType.UINT16, GGUFValueType.INT16, GGUFValueType.UINT32,
           GGUFValueType.INT32, GGUFValueType.UINT64, GGUFValueType.INT64, GGUFValueType.FLOAT32, GGUFValueType.FLOAT64}
_REQUIRED = object()


def matches(path: Path) -> bool:
    if not path.is_file():
        return False
    if path.suffix == ".gguf":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def read_spec(path: Path) -> dict:
    """The ModelSpec fields the GGUF metadata declares (tying: whether an output tensor exists)."""
    reader, arch = _open(path)
    tensors = {t.name: t for t in reader.tensors}

    def number(key, default=_REQUIRED):
        return _number(reader, path, f"{arch}.{key}", default)

    n_heads = number("attention.head_count")
    head_dim = number("attention.key_length", None)
    head_size = head_dim or number("embedding_length") // max(n_heads, 1)
    vocab = number("vocab_size", None)
    if vocab is None:
        tokens = reader.get_field("tokenizer.ggml.tokens")
        vocab = len(tokens.data) if tokens is not None else _shape(path, tensors, "token_embd.weight")[0]
    spec = dict(
        dim=number("embedding_length"), n_layers=number("block_count"), n_heads=n_heads,
        n_kv_heads=number("attention.head_count_kv", None), head_dim=head_dim, vocab_size=vocab,
        intermediate_size=number("feed_forward_length"), max_seq_len=number("context_length"),
        norm_eps=number("attention.layer_norm_rms_epsilon"), rope_theta=number("rope.freq_base", 10000.0),
        tie_embeddings="output.weight" not in tensors,
    )
    if number("expert_count", 0):  # Mixtral: llama with expert tensors
        spec["n_experts"], spec["n_experts_per_token"] = number("expert_count"), number("expert_used_count")
    window = number("attention.sliding_window", None)
    if window is not None and 0 < window < spec["max_seq_len"]:
        spec["sliding_window"] = window
    problems = []
    if number("attention.value_length", head_size) != head_size:
        problems.append(problem(str(path), KEY, "value heads differ in size from key heads; not supported"))
    if number("rope.dimension_count", head_size) != head_size:
        problems.append(problem(str(path), KEY, f"RoPE rotates {number('rope.dimension_count')} of {head_size} head "
                                "dimensions; only full rotation is supported"))
    scaling_key = f"{arch}.rope.scaling.type"
    scaling = _string(reader, path, scaling_key) if reader.get_field(scaling_key) is not None else "none"
    if scaling not in ("none", ""):
        problems.append(problem(str(path), KEY, f"RoPE scaling {scaling!r} is not supported; supported: "
                                "Llama-3.1's (a rope_freqs tensor)"))
    if problems:
        raise ConfigError(problems)
    if ROPE_FREQS in tensors:
        spec["rope_scaling"] = _llama3_scaling(path, _tensor(path, tensors[ROPE_FREQS]), head_size, spec["rope_theta"])
    return spec


def load(path: Path, spec: ModelSpec, progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """Dequantize every tensor to fp32 (F16/BF16 kept as they are) in the native layout;
    progress(layers done, layers) after each layer."""
    tensors = {t.name: t for t in _open(path)[0].tensors}
    used = {ROPE_FREQS}

    def get(name: str) -> torch.Tensor:
        if name not in tensors:
            raise ConfigError([problem(str(path), KEY, f"lacks tensor {name!r} the spec (model.arch) needs; "
                                       "check n_layers and tie_embeddings")])
        used.add(name)
        return _tensor(path, tensors[name])

    def heads(name: str, n_heads: int) -> torch.Tensor:
        w = get(name)
        if w.ndim != 2 or w.shape[0] != n_heads * spec.head_size:
            raise ConfigError([problem(str(path), KEY, f"tensor {name!r} has shape {tuple(w.shape)} but the spec "
                                       f"(model.arch) needs {n_heads * spec.head_size} rows ({n_heads} heads of {spec.head_size})")])
        return from_interleaved(w, n_heads)

    out = {"tok_embeddings.weight": get("token_embd.weight"), "norm.weight": get("output_norm.weight")}
    if not spec.tie_embeddings:
        out["output.weight"] = get("output.weight")
    for i in range(spec.n_layers):
        blk, ours = f"blk.{i}.", f"layers.{i}."
        qkv = [heads(f"{blk}attn_q.weight", spec.n_heads), heads(f"{blk}attn_k.weight", spec.kv_heads), get(f"{blk}attn_v.weight")]
        out[f"{ours}attention.wqkv.weight"] = _cat(path, qkv)
        out[f"{ours}attention.wo.weight"] = get(f"{blk}attn_output.weight")
        if spec.moe:  # stacked [experts, rows, columns]; gate and up side by side per expert
            out[f"{ours}feed_forward.gate.weight"] = get(f"{blk}ffn_gate_inp.weight")
            out[f"{ours}feed_forward.experts.w13.weight"] = _cat(
                path, [get(f"{blk}ffn_gate_exps.weight"), get(f"{blk}ffn_up_exps.weight")], dim=1)
            out[f"{ours}feed_forward.experts.w2.weight"] = get(f"{blk}ffn_down_exps.weight")
        else:
            out[f"{ours}feed_forward.w13.weight"] = _cat(path, [get(f"{blk}ffn_gate.weight"), get(f"{blk}ffn_up.weight")])
            out[f"{ours}feed_forward.w2.weight"] = get(f"{blk}ffn_down.weight")
        out[f"{ours}attention_norm.weight"] = get(f"{blk}attn_norm.weight")
        out[f"{ours}ffn_norm.weight"] = get(f"{blk}ffn_norm.weight")
        if progress is not None:
            progress(i + 1, spec.n_layers)
    unused = sorted(set(tensors) - used)
    if unused:
        raise ConfigError([problem(str(path), KEY, f"has {len(unused)} tensor(s) the spec (model.arch) does not use, "
                                   f"first {unused[0]!r}; check n_layers and tie_embeddings")])
    return out


def read_quant(path: Path) -> None:
    """None: llama.cpp's quantized tensors are dequantized on load, into float weights."""
    return None


def _open(path: Path) -> tuple[GGUFReader, str]:
    """The file's reader and architecture, which must be one we run."""
    try:
        reader = GGUFReader(path)
    except Exception as e:  # the reader signals a malformed file with whatever numpy raised
        raise ConfigError([problem(str(path), KEY, f"unreadable GGUF file, truncated or corrupt ({type(e).__name__}: {e})")]) from None
    arch = _string(reader, path, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ConfigError([problem(str(path), KEY, f"GGUF architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}")])
    return reader, arch


def _tensor(path: Path, t) -> torch.Tensor:
    """One tensor in torch's [rows, cols] order (GGUF lists dimensions the other way round)."""
    try:
        if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            out = torch.from_numpy(np.array(t.data))
        elif t.tensor_type == GGMLQuantizationType.BF16:
            out = torch.from_numpy(np.array(t.data)).view(torch.bfloat16)  # stored as raw bytes
        else:
            out = torch.from_numpy(dequantize(t.data, t.tensor_type))
    except NotImplementedError:
        raise ConfigError([problem(str(path), KEY, f"tensor {t.name!r} has type {t.tensor_type.name}, which the gguf "
                                   "package cannot dequantize")]) from None
    except (ValueError, RuntimeError) as e:
        raise ConfigError([problem(str(path), KEY, f"tensor {t.name!r} is corrupt ({e})")]) from None
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    if tuple(out.shape) != shape:
        raise ConfigError([problem(str(path), KEY, f"tensor {t.name!r} holds {tuple(out.shape)} values, not {shape}")])
    return out


def _cat(path: Path, parts: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    if len({p.shape[:dim] + p.shape[dim + 1:] for p in parts}) > 1:
        shapes = ", ".join(str(tuple(p.shape)) for p in parts)
        raise ConfigError([problem(str(path), KEY, f"tensors to stack have mismatched shapes {shapes}")])
    return torch.cat(parts, dim=dim)


def _shape(path: Path, tensors: dict, name: str) -> tuple[int, ...]:
    if name not in tensors:
        raise ConfigError([problem(str(path), KEY, f"lacks tensor {name!r}")])
    return tuple(int(d) for d in reversed(tensors[name].shape.tolist()))


def _string(reader: GGUFReader, path: Path, key: str) -> str:
    field = reader.get_field(key)
    if field is None or field.types != [GGUFValueType.STRING]:
        raise ConfigError([problem(str(path), KEY, f"GGUF metadata {key!r} is missing or not a string")])
    try:
        return field.contents()
    except UnicodeDecodeError:
        raise ConfigError([problem(str(path), KEY, f"GGUF metadata {key!r} is not valid UTF-8")]) from None


def _number(reader: GGUFReader, path: Path, key: str, default=_REQUIRED):
    field = reader.get_field(key)
    if field is None:
        if default is _REQUIRED:
            raise ConfigError([problem(str(path), KEY, f"GGUF metadata lacks {key!r}")])
        return default
    if len(field.types) != 1 or field.types[0] not in NUMBERS:
        raise ConfigError([problem(str(path), KEY, f"GGUF metadata {key!r} must be a single number "
                                   f"(got {'/'.join(t.name for t in field.types)})")])
    value = field.contents()
    if field.types[0] == GGUFValueType.FLOAT32:
        return float(str(np.float32(value)))  # the decimal the converter wrote: 1e-05, not 9.99999974e-06
    return value


def _llama3_scaling(path: Path, factors: torch.Tensor, head_dim: int, theta: float) -> RopeScaling:
    """The Llama-3.1 scaling (Meta's band constants) that reproduces llama.cpp's per-frequency factors."""
    meta, factors = RopeScaling(), factors.double()
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    original = meta.original_max_position_embeddings
    smooth = (original / wavelen - meta.low_freq_factor) / (meta.high_freq_factor - meta.low_freq_factor)
    slow = wavelen > original / meta.low_freq_factor
    mid = ~slow & (wavelen >= original / meta.high_freq_factor) & (smooth < 1)
    estimates = []
    if factors.shape == inv_freq.shape:
        # Slowed wavelengths hold the factor itself; blended ones 1 / ((1 - s) / factor + s), solved for it.
        estimates = torch.cat([factors[slow], ((1 - smooth) / (1 / factors - smooth))[mid]])
    # With no wavelength slowed or blended, every factor gives the same frequencies: keep Meta's.
    candidate = dataclasses.replace(meta, factor=estimates.median().item()) if len(estimates) else meta
    if factors.shape == inv_freq.shape:
        expected = rope_frequencies(head_dim, theta) / rope_frequencies(head_dim, theta, candidate)
        if torch.allclose(expected.double(), factors, rtol=1e-4):
            return candidate
    raise ConfigError([problem(str(path), KEY, f"its {ROPE_FREQS!r} tensor is not Llama-3.1 RoPE scaling with Meta's "
                               f"band constants ({meta}) for any factor; not supported")])
