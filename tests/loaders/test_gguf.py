"""The GGUF loader on files written as llama.cpp's converter writes them, against HF's logits;
and on quantized blocks whose bytes and values are written here by hand, against those values."""
import dataclasses
import math
import tempfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.config.errors import ConfigError
from runner.config.schema import ModelSpec, RopeScaling
from runner.loaders import detect, load_model, read_spec
from runner.loaders import gguf as gguf_loader
from runner.loaders.hf_layout import from_hf
from runner.model import functional as fn, rope
from tests.loaders.writers import Q, save_gguf, same_arch
from tests.properties.strategies import build_twins, logits_bound, model_specs

CPU = torch.device("cpu")
QTYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]


@st.composite
def gguf_specs(draw) -> ModelSpec:
    """model_specs, with rows that often fill whole quantization blocks (32) and only the RoPE scaling
    GGUF can express (Meta's constants with any factor, as a rope_freqs tensor)."""
    spec = draw(model_specs())
    block_rows = math.lcm(32, spec.n_heads)  # HF needs n_heads to divide dim
    return dataclasses.replace(
        spec, head_dim=spec.head_size, dim=draw(st.sampled_from([block_rows, 2 * block_rows]) | st.integers(1, 16).map(lambda k: k * spec.n_heads)),
        intermediate_size=draw(st.sampled_from([32, 64]) | st.integers(8, 64)),
        rope_scaling=draw(st.none() | st.floats(2.0, 32.0).map(lambda f: RopeScaling(factor=f))))


@settings(max_examples=50, deadline=None)
@given(spec=gguf_specs(), seed=st.integers(0, 2**32 - 1), qtype=st.sampled_from(QTYPES),
       key_length=st.booleans(), data=st.data())
@torch.no_grad()
def test_gguf_matches_hf_on_the_decoded_weights(spec, seed, qtype, key_length, data):
    tokens = torch.tensor([data.draw(st.lists(st.integers(0, spec.vocab_size - 1), min_size=1, max_size=12))])
    hf, _ = build_twins(spec, seed)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.gguf"
        decoded = save_gguf(path, hf.state_dict(), spec, qtype, key_length=key_length)
        assert detect(path) == "gguf"
        declared = ModelSpec(**read_spec(path))
        # GGUF stores rope_theta as float32.
        assert declared.rope_theta == pytest.approx(spec.rope_theta, rel=1e-7)
        assert same_arch(declared, dataclasses.replace(spec, rope_scaling=declared.rope_scaling, rope_theta=declared.rope_theta))
        # rope_freqs holds the scaled frequencies, not the factor: when none is slowed, any factor fits.
        torch.testing.assert_close(rope.frequencies(declared.head_size, declared.rope_theta, declared.rope_scaling)[0],
                                   rope.frequencies(spec.head_size, spec.rope_theta, spec.rope_scaling)[0])
        model = load_model(path, declared, CPU, torch.float32)
    # The reference: HF with exactly the values the file stores (for F32, HF's own weights).
    hf.load_state_dict(decoded)
    if qtype == Q.F32:
        expected = from_hf(decoded, spec)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    model.setup_cache(1, tokens.shape[1])
    ours, reference = model(tokens, torch.arange(tokens.shape[1])), hf(tokens).logits
    diff = (ours - reference).abs().max().item()
    assert diff <= logits_bound(reference), f"max abs diff {diff:.3g}"


def tiny(tmp_path: Path, **changes) -> tuple[Path, ModelSpec]:
    spec = ModelSpec(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=48, intermediate_size=64, max_seq_len=16)
    spec = dataclasses.replace(spec, **changes)
    hf, _ = build_twins(spec, 0)
    path = tmp_path / "tiny.gguf"
    save_gguf(path, hf.state_dict(), spec)
    return path, spec


def test_a_gguf_is_recognised_by_its_magic_whatever_its_name(tmp_path):
    path, spec = tiny(tmp_path)
    renamed = path.rename(tmp_path / "model.bin")
    assert detect(renamed) == "gguf"
    assert same_arch(ModelSpec(**read_spec(renamed)), spec)


def test_a_tied_gguf_has_no_output_tensor(tmp_path):
    path, _ = tiny(tmp_path, tie_embeddings=True)
    assert read_spec(path)["tie_embeddings"] is True
    path, _ = tiny(tmp_path, tie_embeddings=False)
    assert read_spec(path)["tie_embeddings"] is False


def test_float32_metadata_reads_as_the_decimal_written(tmp_path):
    path, _ = tiny(tmp_path, norm_eps=1e-5, rope_theta=500000.0)
    assert (read_spec(path)["norm_eps"], read_spec(path)["rope_theta"]) == (1e-5, 500000.0)


def test_other_architectures_are_refused_by_name(tmp_path):
    spec = ModelSpec(dim=32, n_layers=1, n_heads=4, vocab_size=48, intermediate_size=64, max_seq_len=16)
    hf, _ = build_twins(spec, 0)
    path = tmp_path / "phi.gguf"
    save_gguf(path, hf.state_dict(), spec, arch="falcon")
    for step in (lambda: read_spec(path), lambda: load_model(path, spec, CPU, torch.float32)):
        with pytest.raises(ConfigError) as e:
            step()
        assert str(path) in str(e.value) and "'falcon'" in str(e.value) and "supported: llama" in str(e.value)


def test_rope_freqs_other_than_meta_constants_are_refused(tmp_path):
    spec = ModelSpec(dim=32, n_layers=1, n_heads=1, vocab_size=48, intermediate_size=64, max_seq_len=16,
                     rope_theta=1e6, rope_scaling=RopeScaling(factor=8.0, low_freq_factor=2.0, high_freq_factor=64.0,
                                                               original_max_position_embeddings=64))
    hf, _ = build_twins(spec, 0)
    path = tmp_path / "odd-rope.gguf"
    save_gguf(path, hf.state_dict(), spec)
    with pytest.raises(ConfigError, match="rope_freqs"):
        read_spec(path)


def test_a_type_the_package_cannot_dequantize_is_named(tmp_path, monkeypatch):
    spec = ModelSpec(dim=32, n_layers=1, n_heads=4, vocab_size=48, intermediate_size=64, max_seq_len=16)
    hf, _ = build_twins(spec, 0)
    path = tmp_path / "q8.gguf"
    save_gguf(path, hf.state_dict(), spec, Q.Q8_0)

    def refuse(data, qtype):  # what gguf.quants.dequantize raises for a type it does not know
        raise NotImplementedError(f"Dequantization for {qtype.name} is not yet implemented")

    monkeypatch.setattr(gguf_loader, "dequantize", refuse)
    with pytest.raises(ConfigError) as e:
        load_model(path, spec, CPU, torch.float32)
    assert "Q8_0" in str(e.value) and str(path) in str(e.value)


def test_the_reader_sees_ggml_shapes_reversed():
    """GGUF lists a [rows, cols] matrix as (cols, rows); the reader's data is already [rows, cols]."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "shape.gguf"
        writer = gguf.GGUFWriter(str(path), "llama")
        w = np.arange(6 * 4, dtype=np.float32).reshape(6, 4)
        writer.add_tensor("w", w)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        t = gguf.GGUFReader(path).tensors[0]
        assert t.shape.tolist() == [4, 6] and np.array_equal(t.data, w)


# --- quantized blocks written by hand -----------------------------------------------------------
# The tests above decode what they wrote with gguf.quants.dequantize, the very function the loader
# calls, so a slip in it would pass them. Here the bytes follow GGML's block layouts (ggml-common.h,
# dequantize_row_* in ggml-quants.c) from levels, scales and mins chosen here, and the expected values
# are computed here in float64. Scales and mins are fp16 values {1..7} * 2^-6..2^0 and levels at most
# 8 bits, so every value and every partial product is a multiple of 2^-6 below 2^15: at most 21
# significant bits, exact in float32 whatever the order of operations. The loader must return them exactly.

QK_K = 256  # values per K-quant super-block


def half(x: float) -> np.ndarray:
    """x as the 2 little-endian bytes of an fp16 (ggml_half), which must hold it exactly."""
    assert float(np.float16(x)) == x
    return np.array([x], dtype="<f2").view(np.uint8)


def scale(rng) -> float:
    """A scale or min of 3 significant bits, 2^-6 to 7."""
    return float(rng.integers(1, 8)) * 2.0 ** int(rng.integers(-6, 1))


def low_high(q: np.ndarray) -> np.ndarray:
    """32 levels of 0..15 -> 16 bytes: level j in byte j's low nibble, level j + 16 in its high one."""
    return (q[:16] | (q[16:] << 4)).astype(np.uint8)


def fifth_bits(q: np.ndarray) -> np.ndarray:
    """32 levels of 0..31 -> qh, a little-endian uint32 whose bit j is level j's bit 4."""
    return np.array([sum(int(b) << j for j, b in enumerate(q >> 4))], dtype="<u4").view(np.uint8)


# Blocks of 32 values: d (fp16), then m (fp16) for the _1 types, qh for Q5, then the levels;
# a value is d * (q - offset) or d * q + m.


def q8_0(rng):
    d, q = scale(rng), rng.integers(-128, 128, 32)
    return [half(d), q.astype(np.int8).view(np.uint8)], d * q


def q4_0(rng):
    d, q = scale(rng), rng.integers(0, 16, 32)
    return [half(d), low_high(q)], d * (q - 8)


def q4_1(rng):
    d, m, q = scale(rng), -scale(rng), rng.integers(0, 16, 32)
    return [half(d), half(m), low_high(q)], d * q + m


def q5_0(rng):
    d, q = scale(rng), rng.integers(0, 32, 32)
    return [half(d), fifth_bits(q), low_high(q & 15)], d * (q - 16)


def q5_1(rng):
    d, m, q = scale(rng), -scale(rng), rng.integers(0, 32, 32)
    return [half(d), half(m), fifth_bits(q), low_high(q & 15)], d * q + m


def q2_k(rng):
    """scales[16] (a 4-bit scale low, a 4-bit min high, per 16 values), qs[64], d, dmin. Value i:
    2 bits at shift 2j of qs[32h + l], for i = 128h + 32j + l."""
    d, dmin, q = scale(rng), scale(rng), rng.integers(0, 4, QK_K)
    sc, m = rng.integers(0, 16, 16), rng.integers(0, 16, 16)
    qs = np.zeros(64, dtype=np.uint8)
    for i, level in enumerate(q):
        h, j, l = i // 128, i % 128 // 32, i % 32
        qs[32 * h + l] |= level << (2 * j)
    sub = np.arange(QK_K) // 16
    return [(sc | (m << 4)).astype(np.uint8), qs, half(d), half(dmin)], d * sc[sub] * q - dmin * m[sub]


def q3_k(rng):
    """hmask[32], qs[64], scales[12] (16 six-bit scales less 32), d. Value i = 128h + 32j + l: 2 low bits
    as in Q2_K, less 4 unless bit 4h + j of hmask[l] is set."""
    d, q = scale(rng), rng.integers(-4, 4, QK_K)
    raw = rng.integers(0, 64, 16)  # scale = raw - 32
    hmask, qs = np.zeros(32, dtype=np.uint8), np.zeros(64, dtype=np.uint8)
    for i, level in enumerate(q):
        h, j, l = i // 128, i % 128 // 32, i % 32
        qs[32 * h + l] |= (level & 3) << (2 * j)
        hmask[l] |= int(level >= 0) << (4 * h + j)
    scales = np.zeros(12, dtype=np.uint8)
    for k, r in enumerate(raw):  # scale k: low 4 bits in byte k % 8, high 2 bits in byte 8 + k % 4
        scales[k % 8] |= (r & 15) << (4 * (k // 8))
        scales[8 + k % 4] |= (r >> 4) << (2 * (k // 4))
    return [hmask, qs, scales, half(d)], d * (raw[np.arange(QK_K) // 16] - 32) * q


def k_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's 12 bytes for 8 six-bit scales and mins: 0-3 (6 bits each) in bytes 0-3 and 4-7, 4-7
    split into 4 low bits (byte 8-11, scale low nibble, min high) and 2 high bits (bytes 0-7's top)."""
    out = np.zeros(12, dtype=np.uint8)
    for s in range(4):
        out[s], out[s + 4] = sc[s], m[s]
    for s in range(4, 8):
        out[s + 4] = (sc[s] & 15) | ((m[s] & 15) << 4)
        out[s - 4] |= (sc[s] >> 4) << 6
        out[s] |= (m[s] >> 4) << 6
    return out


def q4_k(rng, bits=4):
    """d, dmin, scales[12], (Q5_K: qh[32],) qs[128]. Value i = 64c + 32n + l: the low (n=0) or high (n=1)
    nibble of qs[32c + l]; Q5_K's bit 4 is bit i // 32 of qh[l]. Scale and min per 32 values."""
    d, dmin, q = scale(rng), scale(rng), rng.integers(0, 2 ** bits, QK_K)
    sc, m = rng.integers(0, 64, 8), rng.integers(0, 64, 8)
    qs, qh = np.zeros(128, dtype=np.uint8), np.zeros(32, dtype=np.uint8)
    for i, level in enumerate(q):
        c, n, l = i // 64, i % 64 // 32, i % 32
        qs[32 * c + l] |= (level & 15) << (4 * n)
        qh[l] |= (level >> 4) << (i // 32)
    sub = np.arange(QK_K) // 32
    parts = [half(d), half(dmin), k_scales(sc, m)] + ([qh] if bits == 5 else []) + [qs]
    return parts, d * sc[sub] * q - dmin * m[sub]


def q6_k(rng):
    """ql[128], qh[64], scales[16] (int8, per 16 values), d. Value i = 128h + 32k + l, level + 32 in 6 bits:
    the low 4 in nibble k // 2 of ql[64h + 32(k % 2) + l], the high 2 at shift 2k of qh[32h + l]."""
    d, q = scale(rng), rng.integers(-32, 32, QK_K)
    sc = rng.integers(-128, 128, 16)
    ql, qh = np.zeros(128, dtype=np.uint8), np.zeros(64, dtype=np.uint8)
    for i, level in enumerate(q + 32):
        h, k, l = i // 128, i % 128 // 32, i % 32
        ql[64 * h + 32 * (k % 2) + l] |= (level & 15) << (4 * (k // 2))
        qh[32 * h + l] |= (level >> 4) << (2 * k)
    return [ql, qh, sc.astype(np.int8).view(np.uint8), half(d)], d * sc[np.arange(QK_K) // 16] * q


def bf16(rng):
    """Not quantized, but raw bytes the loader reinterprets itself: a float32's top half ("blocks" of 1)."""
    v = np.array([rng.integers(-128, 128) * 2.0 ** int(rng.integers(-10, 10))], dtype=np.float32)
    return [(v.view(np.uint32) >> 16).astype("<u2").view(np.uint8)], v


BLOCKS = {Q.Q8_0: q8_0, Q.Q4_0: q4_0, Q.Q4_1: q4_1, Q.Q5_0: q5_0, Q.Q5_1: q5_1, Q.Q2_K: q2_k, Q.Q3_K: q3_k,
          Q.Q4_K: q4_k, Q.Q5_K: lambda rng: q4_k(rng, bits=5), Q.Q6_K: q6_k, Q.BF16: bf16}


def hand_tensor(qtype: Q, rows: int, cols: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(bytes uint8 [rows, row bytes], values float64 [rows, cols]) of blocks drawn and packed by BLOCKS."""
    rng = np.random.default_rng(seed)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    data, values = [], []
    for _ in range(rows * cols // block):
        parts, v = BLOCKS[qtype](rng)
        data.append(np.concatenate(parts))
        values.append(np.asarray(v, dtype=np.float64))
    data = np.stack(data)
    assert data.shape[1] == size  # the block layout is complete
    return data.reshape(rows, -1), np.concatenate(values).reshape(rows, cols)


def save_one_quantized(path: Path, spec: ModelSpec, data: np.ndarray, qtype: Q) -> None:
    """A llama GGUF whose ffn_down holds `data` as `qtype` (its rows span whole K-quant blocks); zeros elsewhere."""
    writer = gguf.GGUFWriter(str(path), "llama")
    hd = spec.head_size
    shapes = {"token_embd.weight": (spec.vocab_size, spec.dim), "output_norm.weight": (spec.dim,),
              "blk.0.attn_norm.weight": (spec.dim,), "blk.0.ffn_norm.weight": (spec.dim,),
              "blk.0.attn_q.weight": (spec.n_heads * hd, spec.dim), "blk.0.attn_k.weight": (spec.kv_heads * hd, spec.dim),
              "blk.0.attn_v.weight": (spec.kv_heads * hd, spec.dim), "blk.0.attn_output.weight": (spec.dim, spec.n_heads * hd),
              "blk.0.ffn_gate.weight": (spec.intermediate_size, spec.dim), "blk.0.ffn_up.weight": (spec.intermediate_size, spec.dim)}
    for name, shape in shapes.items():
        writer.add_tensor(name, np.zeros(shape, dtype=np.float32))
    writer.add_tensor("blk.0.ffn_down.weight", data, raw_dtype=qtype)  # shape read from the byte shape
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("qtype", list(BLOCKS), ids=lambda q: q.name)
def test_hand_written_quantized_blocks_load_to_their_exact_values(tmp_path, qtype):
    spec = ModelSpec(dim=4, n_layers=1, n_heads=1, vocab_size=8, intermediate_size=2 * QK_K, max_seq_len=16,
                     tie_embeddings=True)
    data, expected = hand_tensor(qtype, spec.dim, spec.intermediate_size, seed=list(BLOCKS).index(qtype))
    assert np.array_equal(expected.astype(np.float32), expected)  # exact in float32, as promised
    path = tmp_path / f"{qtype.name}.gguf"
    save_one_quantized(path, spec, data, qtype)
    model = load_model(path, spec, CPU, torch.float32)
    loaded = model.layers[0].feed_forward.w2.weight.double()  # [dim, intermediate]
    assert torch.equal(loaded, torch.from_numpy(expected)), f"max error {(loaded - torch.from_numpy(expected)).abs().max():.3g}"
