"""Mixture-of-experts checkpoints through every loader: HF Mixtral directories in both expert
layouts (per expert, as the hub's checkpoints are; fused, as transformers v5 holds them), GGUF
files with stacked expert tensors written by the gguf package, and Mistral's consolidated MoE
layout refused. The reference is HF's MixtralForCausalLM on the same stored values."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from runner.config.errors import ConfigError
from runner.config.schema import ModelSpec
from runner.loaders import detect, load_model, read_spec
from runner.loaders.hf_layout import from_hf, hf_class, hf_config, to_hf
from tests.loaders.writers import Q, save_gguf, same_arch
from tests.properties.strategies import logits_bound

CPU = torch.device("cpu")


@st.composite
def moe_specs(draw) -> ModelSpec:
    """Mixtral-like: 2-8 experts, top 1-2, GQA or MHA, tied or not, a sliding window or none;
    widths of whole 32-column blocks so that GGUF's Q8_0 takes every matrix."""
    kv = draw(st.sampled_from([1, 2, 4]))
    heads = kv * draw(st.sampled_from([1, 2]))
    experts = draw(st.integers(2, 8))
    return ModelSpec(dim=32 * draw(st.integers(1, 3)), n_layers=draw(st.integers(1, 2)), n_heads=heads, n_kv_heads=kv,
                     vocab_size=draw(st.integers(16, 200)), intermediate_size=32 * draw(st.integers(1, 2)),
                     max_seq_len=64, n_experts=experts, n_experts_per_token=draw(st.integers(1, min(2, experts))),
                     sliding_window=draw(st.none() | st.integers(2, 16)), tie_embeddings=draw(st.booleans()))


def mixtral(spec: ModelSpec, seed: int):
    """HF's MixtralForCausalLM with unit-variance random weights (3-D expert weights: fan-in is the last dim)."""
    config_class = getattr(transformers, hf_class(spec).replace("ForCausalLM", "Config"))
    config = config_class(**hf_config(spec), bos_token_id=None, eos_token_id=None, pad_token_id=None,
                          attn_implementation="eager")
    hf = getattr(transformers, hf_class(spec))(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5, generator=gen)
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5, generator=gen)
    return hf


def save_hf(directory: Path, spec: ModelSpec, hf, experts: str) -> None:
    """A Mixtral HF directory: config.json as transformers writes it, the weights in one safetensors file."""
    directory.mkdir(parents=True, exist_ok=True)
    hf.config.to_json_file(directory / "config.json")
    state = to_hf(from_hf(hf.state_dict(), spec), spec, experts)
    if spec.tie_embeddings:
        state.pop("lm_head.weight")
    save_file({k: v.contiguous() for k, v in state.items()}, directory / "model.safetensors")


def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    model.setup_cache(1, tokens.shape[1])
    return model(tokens, torch.arange(tokens.shape[1]))


@settings(max_examples=25, deadline=None)
@given(spec=moe_specs(), seed=st.integers(0, 2**31), experts=st.sampled_from(["per-expert", "fused"]), data=st.data())
@torch.no_grad()
def test_hf_mixtral_directories_load_in_both_expert_layouts(spec, seed, experts, data, tmp_path_factory):
    hf = mixtral(spec, seed)
    path = tmp_path_factory.mktemp("hf")
    save_hf(path, spec, hf, experts)
    assert detect(path) == "hf"
    declared = ModelSpec(**read_spec(path))
    assert same_arch(declared, spec)
    model = load_model(path, declared, CPU, torch.float32)
    expected = from_hf(hf.state_dict(), spec)
    assert model.state_dict().keys() == expected.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    n = data.draw(st.integers(1, 24))
    tokens = torch.tensor([data.draw(st.lists(st.integers(0, spec.vocab_size - 1), min_size=n, max_size=n))])
    reference = hf(tokens).logits
    assert (logits(model, tokens) - reference).abs().max().item() <= logits_bound(reference)


@settings(max_examples=20, deadline=None)
@given(spec=moe_specs(), seed=st.integers(0, 2**31), qtype=st.sampled_from([Q.F32, Q.F16, Q.Q8_0]), data=st.data())
@torch.no_grad()
def test_gguf_with_expert_tensors_matches_hf_on_the_stored_values(spec, seed, qtype, data, tmp_path_factory):
    hf = mixtral(spec, seed)
    path = tmp_path_factory.mktemp("gguf") / "moe.gguf"
    decoded = save_gguf(path, hf.state_dict(), spec, qtype)
    declared = ModelSpec(**read_spec(path))
    assert (declared.n_experts, declared.n_experts_per_token, declared.sliding_window) == (
        spec.n_experts, spec.n_experts_per_token, spec.sliding_window)
    model = load_model(path, dataclasses.replace(declared, rope_theta=spec.rope_theta), CPU, torch.float32)
    hf.load_state_dict(decoded)
    if qtype == Q.F32:
        expected = from_hf(decoded, spec)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    n = data.draw(st.integers(1, 24))
    tokens = torch.tensor([data.draw(st.lists(st.integers(0, spec.vocab_size - 1), min_size=n, max_size=n))])
    reference = hf(tokens).logits
    assert (logits(model, tokens) - reference).abs().max().item() <= logits_bound(reference)


def test_a_checkpoint_without_the_spec_experts_is_refused_naming_the_tensor(tmp_path):
    spec = ModelSpec(dim=32, n_layers=1, n_heads=2, vocab_size=20, intermediate_size=32, max_seq_len=16,
                     n_experts=4, n_experts_per_token=2)
    save_hf(tmp_path, spec, mixtral(spec, 0), "per-expert")
    dense = dataclasses.replace(spec, n_experts=None)
    with pytest.raises(ConfigError) as info:
        load_model(tmp_path, dense, CPU, torch.float32)
    assert "block_sparse_moe" in str(info.value) and "model.arch" in str(info.value)


def test_mistral_consolidated_moe_is_refused_with_the_formats_that_work(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps({"dim": 32, "n_layers": 1, "n_heads": 2, "vocab_size": 20,
                                                      "moe": {"num_experts": 8, "num_experts_per_tok": 2}}))
    torch.save({"tok_embeddings.weight": torch.zeros(20, 32)}, tmp_path / "consolidated.00.pth")
    with pytest.raises(ConfigError) as info:
        read_spec(tmp_path)
    message = str(info.value)
    assert "params.json" in message and "not supported" in message and "GGUF" in message and "HF" in message
