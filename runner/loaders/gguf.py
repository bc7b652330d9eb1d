"""GGUF files (llama.cpp), memory-mapped; every tensor type the gguf package can dequantize.

Each architecture is read as llama.cpp's convert_hf_to_gguf.py writes it. Only llama's q/k rows
are permuted there, into Meta's interleaved order, so only llama's are permuted back to rotate-half
order here (as for Meta checkpoints); qwen2, qwen3, gemma2, gemma3 and phi3 keep HF's order. The
converter adds 1 to every Gemma norm weight (HF's norm is x * (1 + w)), which makes them the
multipliers runner's norms use: they load as they are.
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
from runner.model.rope import frequencies
import runner.quant.gguf as gguf_blocks

KEY = "model.checkpoint"
MAGIC = b"GGUF"
_GEMMA = dict(norm_offset=1.0, scale_embeddings=True, activation="gelu_tanh", sandwich_norms=True)
# The spec fields each architecture fixes: llama.cpp hardcodes them per architecture, no metadata
# holds them. Gemma 2 alternates windowed and global layers, Gemma 3 has five windowed to one global.
FAMILIES = {
    "llama": {},
    "qwen2": dict(qkv_bias=True),
    "qwen3": dict(qk_norm=True),
    "gemma2": dict(_GEMMA, global_every=2),
    "gemma3": dict(_GEMMA, qk_norm=True, global_every=6),
    "phi3": {},
}
ARCHITECTURES = tuple(FAMILIES)
INTERLEAVED = ("llama",)  # the architectures whose q/k rows the converter permutes
# llama.cpp scales Gemma's 27B scores by dim / n_heads, not the head size (gemma_pytorch's
# query_pre_attn_scalar); it knows the 27B by its layer count, as no metadata says so.
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
ROPE_FREQS = "rope_freqs.weight"  # Llama-3.1's scaling, stored as per-frequency wavelength factors
ROPE_LONG, ROPE_SHORT = "rope_factors_long.weight", "rope_factors_short.weight"  # Phi-3's LongRoPE divisors
SCALINGS = "linear, yarn, longrope (with its rope_factors tensors), Llama-3.1's (a rope_freqs tensor)"
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
    """Every ModelSpec field: what the GGUF metadata declares, what its architecture fixes (as
    llama.cpp reads it), ModelSpec's defaults for the rest; tying: whether an output tensor exists."""
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
        tie_embeddings="output.weight" not in tensors, family=arch, **FAMILIES[arch],
    )
    if number("expert_count", 0):  # Mixtral: llama with expert tensors
        spec["n_experts"], spec["n_experts_per_token"] = number("expert_count"), number("expert_used_count")
    spec.update(_attention(arch, number, spec, head_size))
    problems = []
    if number("attention.value_length", head_size) != head_size:
        problems.append(problem(str(path), KEY, "value heads differ in size from key heads; not supported"))
    rotated = number("rope.dimension_count", head_size)
    if rotated != head_size:
        # Partial rotation turns each head's leading dimensions, which the interleaved order scatters.
        partial = arch not in INTERLEAVED and 0 < rotated < head_size and rotated % 2 == 0
        if partial and int(head_size * (rotated / head_size)) == rotated:  # ModelSpec.rotary_dim gives it back
            spec["partial_rotary_factor"] = rotated / head_size
        else:
            fewer = "" if arch in INTERLEAVED else ", or an even number fewer"
            problems.append(problem(str(path), KEY, f"RoPE rotates {rotated} of {head_size} head dimensions; only "
                                    f"full rotation is supported{fewer}"))
    if problems:
        raise ConfigError(problems)
    spec["rope_scaling"] = _rope_scaling(reader, path, arch, number, tensors, spec, rotated)
    declared = ModelSpec(**spec)
    return {f.name: getattr(declared, f.name) for f in dataclasses.fields(ModelSpec)}


def _attention(arch: str, number, spec: dict, head_size: int) -> dict:
    """Sliding windows, soft-capping and the scores' scale, as llama.cpp reads each architecture."""
    if arch in GEMMA_27B_LAYERS:
        is_27b = spec["n_layers"] == GEMMA_27B_LAYERS[arch]
        out = dict(query_pre_attn_scalar=int(spec["dim"] // max(spec["n_heads"], 1) if is_27b else head_size))
        if arch == "gemma2":  # llama.cpp's defaults where the key is absent, which are also HF's
            out.update(sliding_window=number("attention.sliding_window", 4096) or None,
                       attn_logit_softcap=number("attn_logit_softcapping", 50.0) or None,
                       final_logit_softcap=number("final_logit_softcapping", 30.0) or None)
        else:  # windowed layers also turn by their own RoPE base, so a window is kept even past the context
            out.update(sliding_window=number("attention.sliding_window", None) or None,
                       final_logit_softcap=number("final_logit_softcapping", None) or None,
                       rope_local_theta=number("rope.freq_base_swa", 10000.0))
        return out
    window = number("attention.sliding_window", None)
    # Every layer windowed (Mistral; Phi-3-mini's 2047, which HF's Phi3 applies). Qwen2's window,
    # never written by the converter, would cover only some layers: it is not read, as llama.cpp does.
    if arch in ("llama", "phi3") and window is not None and 0 < window < spec["max_seq_len"]:
        return dict(sliding_window=window)
    return {}


def _rope_scaling(reader: GGUFReader, path: Path, arch: str, number, tensors: dict, spec: dict,
                  rotated: int) -> RopeScaling | None:
    """The scaling the metadata names (or Phi-3's and Llama-3.1's tensors imply), as HF defines it."""
    key = f"{arch}.rope.scaling.type"
    kind = _string(reader, path, key) if reader.get_field(key) is not None else "none"
    if kind == "longrope" or ROPE_LONG in tensors or ROPE_SHORT in tensors:
        return _longrope(path, number, tensors, spec, rotated)
    if kind in ("none", "") and ROPE_FREQS in tensors:
        return _llama3_scaling(path, _tensor(path, tensors[ROPE_FREQS]), rotated, spec["rope_theta"])
    if kind in ("none", ""):
        return None
    if ROPE_FREQS in tensors:
        raise ConfigError([problem(str(path), KEY, f"has both RoPE scaling {kind!r} and a {ROPE_FREQS!r} tensor; "
                                   "not supported")])
    if kind == "linear":
        return RopeScaling(type="linear", factor=number("rope.scaling.factor"))
    if kind == "yarn":
        for unread in ("rope.scaling.yarn_ext_factor", "rope.scaling.yarn_log_multiplier"):
            if number(unread, None) is not None:
                raise ConfigError([problem(str(path), KEY, f"YaRN with GGUF metadata '{arch}.{unread}' is not "
                                           "supported")])
        return RopeScaling(type="yarn", factor=number("rope.scaling.factor"),
                           original_max_position_embeddings=number("rope.scaling.original_context_length"),
                           beta_fast=number("rope.scaling.yarn_beta_fast", 32.0),
                           beta_slow=number("rope.scaling.yarn_beta_slow", 1.0),
                           attention_factor=number("rope.scaling.yarn_attn_factor", None))
    raise ConfigError([problem(str(path), KEY, f"RoPE scaling {kind!r} is not supported; supported: {SCALINGS}")])


def _longrope(path: Path, number, tensors: dict, spec: dict, rotated: int) -> RopeScaling:
    """Phi-3's LongRoPE: a divisor per frequency for short and for long contexts, stored as tensors."""
    factors = []
    for name in (ROPE_SHORT, ROPE_LONG):
        if name not in tensors:
            raise ConfigError([problem(str(path), KEY, f"lacks tensor {name!r}, which LongRoPE scaling needs")])
        values = _tensor(path, tensors[name])
        if tuple(values.shape) != (rotated // 2,):
            raise ConfigError([problem(str(path), KEY, f"tensor {name!r} has shape {tuple(values.shape)}, not one "
                                       f"factor per rotated pair ({rotated // 2})")])
        factors.append([_decimal(v) for v in values.tolist()])
    original = number("rope.scaling.original_context_length")
    factor = spec["max_seq_len"] / original  # HF's, for Phi-3 configs that name no factor
    stored = number("rope.scaling.attn_factor", None)
    # The converter writes HF's default attention factor, rounded to float32: keep None for it.
    default = math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1.0
    attention = None if stored is None or math.isclose(stored, default, rel_tol=1e-6) else stored
    return RopeScaling(type="longrope", factor=factor, original_max_position_embeddings=original,
                       short_factor=factors[0], long_factor=factors[1], attention_factor=attention)


def load(path: Path, spec: ModelSpec, progress: Progress | None = None, blocks: bool = False) -> dict:
    """Dequantize every tensor to fp32 (F16/BF16 kept as they are) in the native layout;
    progress(layers done, layers) after each layer.

    blocks (quant.mode gguf): a quantized matrix stays the file's blocks instead, as a list of
    Blocks, one per GGUF tensor it is made of (q, k and v for wqkv), in row order.
    """
    reader, arch = _open(path)
    tensors = {t.name: t for t in reader.tensors}
    used = {ROPE_FREQS, ROPE_LONG, ROPE_SHORT}

    def get(name: str) -> torch.Tensor | Blocks:
        if name not in tensors:
            raise ConfigError([problem(str(path), KEY, f"lacks tensor {name!r} the spec (model.arch) needs; "
                                       "check n_layers and tie_embeddings")])
        used.add(name)
        t = tensors[name]
        if blocks and t.tensor_type not in gguf_blocks.FLOAT:
            return _blocks(path, t)
        return _tensor(path, t)

    def heads(name: str, n_heads: int, ndim: int = 2) -> torch.Tensor:
        """q or k rows (ndim 2: weights, 1: biases) in rotate-half order."""
        w = get(name)
        rows = w.data if isinstance(w, Blocks) else w  # a quantized matrix's rows are whole rows of blocks
        if rows.ndim != ndim or rows.shape[0] != n_heads * spec.head_size:
            raise ConfigError([problem(str(path), KEY, f"tensor {name!r} has shape {tuple(w.shape)} but the spec "
                                       f"(model.arch) needs {n_heads * spec.head_size} rows ({n_heads} heads of {spec.head_size})")])
        if arch not in INTERLEAVED:
            return w
        return Blocks(w.kind, from_interleaved(rows, n_heads), w.shape) if isinstance(w, Blocks) else from_interleaved(w, n_heads)

    out = {"tok_embeddings.weight": get("token_embd.weight"), "norm.weight": get("output_norm.weight")}
    if not spec.tie_embeddings:
        out["output.weight"] = get("output.weight")
    for i in range(spec.n_layers):
        blk, ours = f"blk.{i}.", f"layers.{i}."
        if f"{blk}attn_qkv.weight" in tensors:  # Phi-3: q, k, v fused, as HF's qkv_proj
            out[f"{ours}attention.wqkv.weight"] = get(f"{blk}attn_qkv.weight")
        else:
            qkv = [heads(f"{blk}attn_q.weight", spec.n_heads), heads(f"{blk}attn_k.weight", spec.kv_heads),
                   get(f"{blk}attn_v.weight")]
            out[f"{ours}attention.wqkv.weight"] = _cat(path, qkv)
        if spec.qkv_bias:
            biases = [heads(f"{blk}attn_q.bias", spec.n_heads, 1), heads(f"{blk}attn_k.bias", spec.kv_heads, 1),
                      get(f"{blk}attn_v.bias")]
            out[f"{ours}attention.qkv_bias"] = _cat(path, biases)
        if spec.qk_norm:
            out[f"{ours}attention.q_norm.weight"] = get(f"{blk}attn_q_norm.weight")
            out[f"{ours}attention.k_norm.weight"] = get(f"{blk}attn_k_norm.weight")
        out[f"{ours}attention.wo.weight"] = get(f"{blk}attn_output.weight")
        if spec.moe and blocks:
            raise ConfigError([problem(str(path), KEY, "quant.mode gguf does not run mixtures of experts yet; "
                                       "use quant.mode none (dequantized) or int8/int4")])
        if spec.moe:  # stacked [experts, rows, columns]; gate and up side by side per expert
            out[f"{ours}feed_forward.gate.weight"] = get(f"{blk}ffn_gate_inp.weight")
            out[f"{ours}feed_forward.experts.w13.weight"] = _cat(
                path, [get(f"{blk}ffn_gate_exps.weight"), get(f"{blk}ffn_up_exps.weight")], dim=1)
            out[f"{ours}feed_forward.experts.w2.weight"] = get(f"{blk}ffn_down_exps.weight")
        else:
            # Phi-3 stores gate and up fused in ffn_up, gate first, as HF's gate_up_proj.
            out[f"{ours}feed_forward.w13.weight"] = (
                get(f"{blk}ffn_up.weight") if arch == "phi3"
                else _cat(path, [get(f"{blk}ffn_gate.weight"), get(f"{blk}ffn_up.weight")]))
            out[f"{ours}feed_forward.w2.weight"] = get(f"{blk}ffn_down.weight")
        out[f"{ours}attention_norm.weight"] = get(f"{blk}attn_norm.weight")
        out[f"{ours}ffn_norm.weight"] = get(f"{blk}ffn_norm.weight")
        if spec.sandwich_norms:
            out[f"{ours}post_attention_norm.weight"] = get(f"{blk}post_attention_norm.weight")
            out[f"{ours}post_ffn_norm.weight"] = get(f"{blk}post_ffw_norm.weight")
        if progress is not None:
            progress(i + 1, spec.n_layers)
    if blocks:  # every quantized matrix as its list of parts
        out = {name: [w] if isinstance(w, Blocks) else w for name, w in out.items()}
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


@dataclasses.dataclass(frozen=True)
class Blocks:
    """A quantized GGUF matrix as the file stores it: rows of blocks of GGUF type `kind`."""
    kind: int
    data: torch.Tensor  # uint8 [rows, row_bytes]
    shape: tuple[int, int]  # [rows, columns] of the values it holds


def _blocks(path: Path, t) -> Blocks:
    """One quantized tensor's blocks (quant.mode gguf), its type checked."""
    if t.tensor_type not in gguf_blocks.SUPPORTED:
        raise ConfigError([problem(str(path), KEY, f"tensor {t.name!r} has type {t.tensor_type.name}, which quant.mode "
                                   f"gguf does not run; supported: {gguf_blocks.SUPPORTED_NAMES}. Use a file of "
                                   "another type, or quant.mode none (dequantized to floats)")])
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    data = np.array(t.data)
    if len(shape) != 2 or data.ndim != 2 or data.shape != (shape[0], gguf_blocks.row_bytes(t.tensor_type, shape[1])):
        raise ConfigError([problem(str(path), KEY, f"tensor {t.name!r} of {shape} values holds {data.shape} bytes; "
                                   "corrupt or not a matrix")])
    return Blocks(int(t.tensor_type), torch.from_numpy(data), shape)


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


def _cat(path: Path, parts: list, dim: int = 0) -> torch.Tensor | list[Blocks]:
    quantized = [isinstance(p, Blocks) for p in parts]
    if all(quantized):  # kept apart: each part may be of its own type
        return parts
    if any(quantized):
        raise ConfigError([problem(str(path), KEY, "quant.mode gguf: a fused matrix mixes float and quantized "
                                   "tensors; not supported (use quant.mode none)")])
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
        return _decimal(value)
    return value


def _decimal(value: float) -> float:
    """A float32 as the decimal it was written from: 1e-05, not 9.99999974e-06."""
    return float(str(np.float32(value)))


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
        expected = frequencies(head_dim, theta)[0] / frequencies(head_dim, theta, candidate)[0]
        if torch.allclose(expected.double(), factors, rtol=1e-4):
            return candidate
    raise ConfigError([problem(str(path), KEY, f"its {ROPE_FREQS!r} tensor is not Llama-3.1 RoPE scaling with Meta's "
                               f"band constants ({meta}) for any factor; not supported")])
