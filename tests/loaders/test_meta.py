"""The Meta loader: params.json + consolidated.NN.pth, merged across shards and permuted to rotate-half."""
import json
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.checkpoint import random_state_dict
from runner.config.schema import ModelSpec, RopeScaling
from runner.loaders import detect, load_model, read_spec
from runner.loaders.hf_layout import from_hf
from runner.loaders.meta import ffn_hidden_size, from_interleaved
from runner.model import functional as fn, rope
from tests.loaders.writers import save_meta, same_arch, to_interleaved
from tests.properties.strategies import build_twins, logits_bound

CPU = torch.device("cpu")
PROPERTY = settings(max_examples=50, deadline=None)


@st.composite
def meta_specs(draw, n_shards: int) -> ModelSpec:
    """Architectures Meta's layout can hold (head_dim = dim / n_heads), split evenly over n_shards."""
    n_kv_heads = n_shards * draw(st.integers(1, 3))
    n_heads = n_kv_heads * draw(st.integers(1, 3))
    return ModelSpec(
        dim=n_heads * draw(st.sampled_from([4, 8, 16])), n_layers=draw(st.integers(1, 3)), n_heads=n_heads,
        n_kv_heads=n_kv_heads, vocab_size=n_shards * draw(st.integers(8, 100)),
        intermediate_size=n_shards * draw(st.integers(4, 48)), max_seq_len=2048,
        norm_eps=draw(st.sampled_from([1e-5, 1e-6])), rope_theta=10 ** draw(st.floats(2.0, 6.0)),
        rope_scaling=draw(st.sampled_from([None, RopeScaling()])), tie_embeddings=draw(st.booleans()),
    )


sharded_specs = st.sampled_from([1, 2, 4]).flatmap(lambda n: st.tuples(st.just(n), meta_specs(n)))


@PROPERTY
@given(case=sharded_specs, embed_axis=st.sampled_from([0, 1]), seed=st.integers(0, 2**32 - 1))
def test_native_to_meta_and_back_is_exact(case, embed_axis, seed):
    n_shards, spec = case
    state = random_state_dict(spec, seed)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        save_meta(d, state, spec, n_shards, embed_axis)
        assert detect(d) == "meta"
        declared = ModelSpec(**read_spec(d))
        assert same_arch(declared, spec)
        loaded = load_model(d, declared, CPU, torch.float32).state_dict()
    assert loaded.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name


@PROPERTY
@given(case=sharded_specs, seed=st.integers(0, 2**32 - 1), data=st.data())
@torch.no_grad()
def test_meta_directory_matches_hf_logits(case, seed, data):
    n_shards, spec = case
    tokens = torch.tensor([data.draw(st.lists(st.integers(0, spec.vocab_size - 1), min_size=1, max_size=12))])
    spec = ModelSpec(**{**spec.__dict__, "max_seq_len": 64})
    hf, _ = build_twins(spec, seed)
    with tempfile.TemporaryDirectory() as d:
        save_meta(Path(d), from_hf(hf.state_dict(), spec), spec, n_shards)
        model = load_model(Path(d), spec, CPU, torch.float32)
    model.setup_cache(1, tokens.shape[1])
    ours, reference = model(tokens, torch.arange(tokens.shape[1])), hf(tokens).logits
    assert (ours - reference).abs().max().item() <= logits_bound(reference)


def meta_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Meta's apply_rotary_emb: x [T, H, D] with dimensions (2i, 2i+1) as one complex number."""
    T, _, D = x.shape
    freqs = 1.0 / (theta ** (torch.arange(0, D, 2).float() / D))
    cis = torch.polar(torch.ones(T, D // 2), torch.outer(torch.arange(T).float(), freqs))  # [T, D/2]
    return torch.view_as_real(torch.view_as_complex(x.reshape(T, -1, D // 2, 2)) * cis[:, None]).flatten(2)


@PROPERTY
@given(n_heads=st.integers(1, 4), half=st.integers(1, 8), cols=st.integers(1, 8), length=st.integers(1, 10),
       theta=st.floats(10.0, 1e6), seed=st.integers(0, 2**32 - 1))
def test_from_interleaved_turns_meta_rope_into_ours(n_heads, half, cols, length, theta, seed):
    """Projecting with the permuted weight and rotating half gives Meta's rotation, in rotate-half order."""
    gen = torch.Generator().manual_seed(seed)
    head_dim = 2 * half
    w = torch.randn(n_heads * head_dim, cols, generator=gen)  # Meta's wq
    x = torch.randn(length, cols, generator=gen)
    theirs = meta_rope((x @ w.T).view(length, n_heads, head_dim), theta)  # [T, H, D], interleaved
    cos_sin = rope.table(rope.frequencies(head_dim, theta)[0], length)
    ours = fn.apply_rope((x @ from_interleaved(w, n_heads).T).view(1, length, n_heads, head_dim).transpose(1, 2), cos_sin)
    ours = ours[0].transpose(0, 1).reshape(length, -1)  # [T, H * D], rotate-half
    # Meta's output with its features reordered exactly as the weight rows were.
    expected = from_interleaved(theirs.reshape(length, -1).T, n_heads).T
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


@PROPERTY
@given(n_heads=st.integers(1, 6), half=st.integers(1, 8), cols=st.integers(1, 5), seed=st.integers(0, 2**32 - 1))
def test_from_interleaved_inverts_llama_cpp_permute(n_heads, half, cols, seed):
    w = torch.randn(n_heads * 2 * half, cols, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(from_interleaved(to_interleaved(w, n_heads), n_heads), w)


@pytest.mark.parametrize("dim, multiple_of, multiplier, expected", [
    (4096, 256, None, 11008),  # Llama-2-7B
    (5120, 256, None, 13824),  # Llama-2-13B
    (8192, 4096, 1.3, 28672),  # Llama-2-70B
    (4096, 1024, 1.3, 14336),  # Llama-3-8B
    (2048, 256, 1.5, 8192),  # Llama-3.2-1B
    (16384, 4096, 1.2, 53248),  # Llama-3.1-405B
])
def test_ffn_hidden_size_matches_the_published_models(dim, multiple_of, multiplier, expected):
    assert ffn_hidden_size(dim, multiple_of, multiplier) == expected


def test_read_spec_of_llama_2_params(tmp_path):
    """Llama 2's params.json: vocab_size -1 (the tensor says), no rope_theta, no n_kv_heads."""
    spec = ModelSpec(dim=32, n_layers=1, n_heads=4, vocab_size=40, intermediate_size=96)
    save_meta(tmp_path, random_state_dict(spec, 0), spec)
    (tmp_path / "params.json").write_text(json.dumps(
        {"dim": 32, "multiple_of": 32, "n_heads": 4, "n_layers": 1, "norm_eps": 1e-05, "vocab_size": -1}))
    assert ModelSpec(**read_spec(tmp_path)) == spec


def test_use_scaled_rope_means_meta_constants(tmp_path):
    spec = ModelSpec(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=40, intermediate_size=96,
                     rope_theta=500000.0, rope_scaling=RopeScaling(), tie_embeddings=True)
    save_meta(tmp_path, random_state_dict(spec, 0), spec)
    assert read_spec(tmp_path)["rope_scaling"] == RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                             original_max_position_embeddings=8192)
    assert read_spec(tmp_path)["tie_embeddings"] is True
