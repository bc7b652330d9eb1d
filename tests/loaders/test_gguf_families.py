"""GGUF files of Qwen2, Qwen3, Gemma 2, Gemma 3 and Phi-3, written as llama.cpp's converter writes
them (tests.helpers.gguf_families): runner reads back the spec and the weights they were written
from, and transformers' own GGUF loader reads the same weights from them."""
from __future__ import annotations

import tempfile
from pathlib import Path

import gguf
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from runner.config.errors import ConfigError
from runner.config.schema import ModelSpec, RopeScaling
from runner.loaders import load_state_dict, read_spec
from runner.loaders.hf_layout import from_hf
from tests.helpers.gguf_families import Q, decoded, native_state, to_hf, write_gguf
from tests.loaders.writers import same_arch

FAMILIES = ("qwen2", "qwen3", "gemma2", "gemma3", "phi3")
GEMMA = dict(norm_offset=1.0, scale_embeddings=True, activation="gelu_tanh", sandwich_norms=True)
# What each family's HF class has and no GGUF metadata says (llama.cpp hardcodes it per architecture).
TRAITS = {"qwen2": dict(qkv_bias=True), "qwen3": dict(qk_norm=True), "gemma2": dict(GEMMA, global_every=2),
          "gemma3": dict(GEMMA, qk_norm=True, global_every=6, rope_local_theta=10000.0), "phi3": {}}
# Scaling values float32 holds exactly, as GGUF stores them.
LINEAR = st.builds(RopeScaling, type=st.just("linear"), factor=st.sampled_from([2.0, 4.0, 8.0]))
YARN = st.builds(RopeScaling, type=st.just("yarn"), factor=st.sampled_from([2.0, 4.0]),
                 original_max_position_embeddings=st.integers(4, 64), beta_fast=st.sampled_from([16.0, 32.0]),
                 beta_slow=st.sampled_from([1.0, 2.0]))


@st.composite
def gguf_family_specs(draw) -> ModelSpec:
    """A tiny spec of one of FAMILIES with only what its GGUF metadata can hold: no head_dim apart
    from dim / n_heads where the converter writes no key_length (Qwen2, Phi-3), Gemma 2 tied and
    at RoPE base 10000 (its converter writes neither an output tensor nor a base), the RoPE
    scalings each converter writes, and partial rotary and every-layer windows on Phi-3 only."""
    family = draw(st.sampled_from(FAMILIES))
    n_kv_heads = draw(st.integers(1, 2))
    n_heads = n_kv_heads * draw(st.integers(1, 2))
    head_dim = draw(st.sampled_from([8, 16, 32]))
    key_length = family in ("qwen3", "gemma2", "gemma3")
    max_seq_len = draw(st.integers(16, 256))
    fields = dict(
        dim=draw(st.sampled_from([32, 64])) if key_length else n_heads * head_dim, n_layers=draw(st.integers(1, 3)),
        n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim if key_length else None,
        vocab_size=draw(st.integers(16, 64)), intermediate_size=draw(st.sampled_from([32, 48, 64])),
        max_seq_len=max_seq_len, norm_eps=draw(st.sampled_from([1e-5, 1e-6])),
        rope_theta=10000.0 if family == "gemma2" else draw(st.sampled_from([10000.0, 500000.0, 1e6])),
        tie_embeddings=family == "gemma2" or draw(st.booleans()), family=family, **TRAITS[family])
    if family.startswith("gemma"):
        fields["query_pre_attn_scalar"] = head_dim
    if family == "gemma2":
        fields.update(sliding_window=draw(st.integers(1, 512)), attn_logit_softcap=draw(st.sampled_from([20.0, 50.0])),
                      final_logit_softcap=draw(st.sampled_from([15.0, 30.0])))
    elif family == "gemma3":
        fields.update(sliding_window=draw(st.none() | st.integers(1, 512)),
                      final_logit_softcap=draw(st.none() | st.just(30.0)), rope_scaling=draw(st.none() | LINEAR))
    elif family == "phi3":
        rotary = draw(st.sampled_from(range(2, head_dim + 1, 2)))
        original = draw(st.integers(4, max_seq_len))
        factors = st.lists(st.integers(4, 64).map(lambda k: k / 4), min_size=rotary // 2, max_size=rotary // 2)
        longrope = st.builds(RopeScaling, type=st.just("longrope"), factor=st.just(max_seq_len / original),
                             original_max_position_embeddings=st.just(original), short_factor=factors,
                             long_factor=factors, attention_factor=st.none() | st.just(1.5))
        fields.update(partial_rotary_factor=rotary / head_dim, rope_scaling=draw(st.none() | longrope),
                      sliding_window=draw(st.none() | st.integers(1, max_seq_len - 1)))
    else:
        fields["rope_scaling"] = draw(st.none() | LINEAR | YARN)
    return ModelSpec(**fields)


@given(spec=gguf_family_specs(), seed=st.integers(0, 2**16), qtype=st.sampled_from([Q.F32, Q.Q8_0]))
def test_a_family_gguf_reads_back_the_spec_and_weights_it_was_written_from(spec, seed, qtype):
    state = native_state(spec, seed)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.gguf"
        write_gguf(path, to_hf(state, spec), spec, qtype)
        assert same_arch(ModelSpec(**read_spec(path)), spec)
        loaded = load_state_dict(path, spec)  # its names and shapes checked against runner's model too
    expected = state if qtype == Q.F32 else decoded(state, qtype)
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[name], expected[name]) for name in expected)


_BASE = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=48, intermediate_size=96, max_seq_len=64,
             norm_eps=1e-6)
_GEMMA = dict(_BASE, head_dim=32, tie_embeddings=True, sliding_window=8, query_pre_attn_scalar=32, **GEMMA)
# One spec a family, with the features each converter writes; transformers' loader needs Qwen3's
# head_dim to be 128 (Qwen3Config's default: it reads no key_length).
HF_CASES = {
    "qwen2": ModelSpec(**_BASE, family="qwen2", qkv_bias=True, rope_theta=1e6,
                       rope_scaling=RopeScaling(type="yarn", factor=4.0, original_max_position_embeddings=32)),
    "qwen3": ModelSpec(**dict(_BASE, n_heads=2, n_kv_heads=1), head_dim=128, family="qwen3", qk_norm=True),
    "gemma2": ModelSpec(**_GEMMA, family="gemma2", global_every=2, attn_logit_softcap=50.0, final_logit_softcap=30.0),
    "gemma3": ModelSpec(**_GEMMA, family="gemma3", qk_norm=True, global_every=6, rope_local_theta=10000.0,
                        rope_theta=1e6, rope_scaling=RopeScaling(type="linear", factor=8.0)),
    "phi3": ModelSpec(**_BASE, family="phi3", partial_rotary_factor=0.75, sliding_window=32,
                      rope_scaling=RopeScaling(type="longrope", factor=4.0, original_max_position_embeddings=16,
                                               short_factor=[1.0] * 6, long_factor=[2.0, 4.0] * 3)),
}


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0], ids=lambda q: q.name)
@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_reads_the_weights_runner_reads(family, qtype, tmp_path):
    from transformers import AutoModelForCausalLM

    spec = HF_CASES[family]
    path = tmp_path / "model.gguf"
    write_gguf(path, to_hf(native_state(spec, 0), spec), spec, qtype)
    ours = load_state_dict(path, ModelSpec(**read_spec(path)))
    # Phi3Config's default pad token (32000) lies outside this tiny vocabulary.
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32, pad_token_id=None)
    assert type(hf).__name__.lower().startswith(family)
    theirs = from_hf(hf.state_dict(), spec)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)


def metadata_only(path: Path, arch: str, **values) -> Path:
    """A GGUF with no tensors: `values` as {arch}.KEY (dots spelled as __), strings, float32 or uint32."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in values.items():
        add = writer.add_string if isinstance(value, str) else writer.add_float32 if isinstance(value, float) \
            else writer.add_uint32
        add(f"{arch}.{key.replace('__', '.')}", value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# Gemma 2 27B's sizes (Gemma 3 27B differs, but only the layer count decides).
GEMMA_27B = dict(embedding_length=4608, attention__head_count=32, attention__head_count_kv=16,
                 attention__key_length=128, attention__value_length=128, feed_forward_length=36864, vocab_size=256,
                 context_length=8192, attention__layer_norm_rms_epsilon=1e-6)


@pytest.mark.parametrize("family, layers_27b", [("gemma2", 46), ("gemma3", 62)])
def test_gemma_27b_scales_scores_by_dim_over_heads_as_llama_cpp_does(family, layers_27b, tmp_path):
    for layers, scalar in ((layers_27b, 4608 / 32), (layers_27b - 4, 128.0)):
        path = metadata_only(tmp_path / f"{layers}.gguf", family, block_count=layers, **GEMMA_27B)
        assert read_spec(path)["query_pre_attn_scalar"] == scalar


def test_an_unknown_architecture_is_refused_naming_the_supported_ones(tmp_path):
    path = metadata_only(tmp_path / "falcon.gguf", "falcon", block_count=1)
    with pytest.raises(ConfigError, match="GGUF architecture 'falcon' is not supported; supported: llama, qwen2, "
                                          "qwen3, gemma2, gemma3, phi3"):
        read_spec(path)


def test_a_qwen2_file_without_its_biases_names_the_missing_tensor(tmp_path):
    spec = HF_CASES["qwen2"]
    hf_state = {k: v for k, v in to_hf(native_state(spec, 0), spec).items() if not k.endswith(".bias")}
    write_gguf(tmp_path / "qwen2.gguf", hf_state, spec)
    with pytest.raises(ConfigError, match="lacks tensor 'blk.0.attn_q.bias'"):
        load_state_dict(tmp_path / "qwen2.gguf", spec)


def test_a_rope_scaling_gguf_does_not_define_is_refused_by_name(tmp_path):
    path = metadata_only(tmp_path / "qwen2.gguf", "qwen2", block_count=1, rope__scaling__type="dynamic", **GEMMA_27B)
    with pytest.raises(ConfigError, match="RoPE scaling 'dynamic' is not supported; supported: linear, yarn"):
        read_spec(path)


@pytest.mark.real
def test_the_real_gemma_3_270m_declares_what_transformers_derives_from_it(gemma3_gguf):
    """The values transformers' GGUF loader gives Gemma3TextConfig for this file (its layer_types:
    five windowed to one global; its local RoPE base: 10000; query_pre_attn_scalar: 256)."""
    expected = ModelSpec(dim=640, n_layers=18, n_heads=4, n_kv_heads=1, head_dim=256, vocab_size=262144,
                         intermediate_size=2048, max_seq_len=32768, norm_eps=1e-6, rope_theta=1e6,
                         tie_embeddings=True, sliding_window=512, query_pre_attn_scalar=256, family="gemma3",
                         **TRAITS["gemma3"])
    assert ModelSpec(**read_spec(gemma3_gguf)) == expected
