"""The GGUF loader on files written as llama.cpp's converter writes them, against HF's logits."""
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
from runner.model import functional as fn
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
        torch.testing.assert_close(fn.rope_frequencies(declared.head_size, declared.rope_theta, declared.rope_scaling),
                                   fn.rope_frequencies(spec.head_size, spec.rope_theta, spec.rope_scaling))
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
    save_gguf(path, hf.state_dict(), spec, arch="phi3")
    for step in (lambda: read_spec(path), lambda: load_model(path, spec, CPU, torch.float32)):
        with pytest.raises(ConfigError) as e:
            step()
        assert str(path) in str(e.value) and "'phi3'" in str(e.value) and "supported: llama" in str(e.value)


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
