"""The HF loader: directories as transformers writes them, loaded and run against HF's own logits."""
import json
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.config.errors import ConfigError
from runner.config.schema import ModelSpec, RopeScaling
from runner.loaders import detect, load_model, read_spec
from tests.loaders.writers import save_hf_bin, same_arch
from tests.properties.strategies import build_twins, logits_bound, model_cases

CPU = torch.device("cpu")
LAYOUTS = ["safetensors", "safetensors-sharded", "bin", "bin-sharded"]


def our_logits(path: Path, spec: ModelSpec, tokens: torch.Tensor) -> torch.Tensor:
    model = load_model(path, spec, CPU, torch.float32)
    model.setup_cache(tokens.shape[0], tokens.shape[1])
    return model(tokens, torch.arange(tokens.shape[1]))


def save_hf(directory: Path, hf, layout: str) -> None:
    """save_pretrained for safetensors; .bin by hand, as transformers 4 wrote it (v5 writes safetensors only)."""
    if layout.startswith("safetensors"):
        hf.save_pretrained(directory, max_shard_size="2KB" if layout.endswith("sharded") else "1GB")
    else:
        hf.config.save_pretrained(directory)
        # A tied model's state dict holds lm_head.weight too: the loader must accept the duplicate.
        save_hf_bin(directory, hf.state_dict(), 3 if layout.endswith("sharded") else 1)


@settings(max_examples=50, deadline=None)
@given(case=model_cases(max_len=12), layout=st.sampled_from(LAYOUTS))
@torch.no_grad()
def test_hf_directory_matches_hf_logits(case, layout):
    spec, seed, tokens = case
    hf, _ = build_twins(spec, seed)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        save_hf(d, hf, layout)
        if layout.endswith("sharded"):
            assert len(list(d.glob("*.safetensors")) + list(d.glob("*.bin"))) > 1
        assert detect(d) == "hf"
        declared = ModelSpec(**read_spec(d))
        assert same_arch(declared, spec)
        ours = our_logits(d, declared, tokens)
    reference = hf(tokens).logits
    diff = (ours - reference).abs().max().item()
    assert diff <= logits_bound(reference), f"max abs diff {diff:.3g}"


def write_config(directory: Path, **changes) -> Path:
    """A transformers 4-style config.json (rope_theta and rope_scaling at the top level)."""
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 100,
           "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
           "hidden_act": "silu", "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    cfg.update(changes)
    cfg = {k: v for k, v in cfg.items() if v is not ...}
    (directory / "config.json").write_text(json.dumps(cfg))
    return directory


def test_read_spec_of_a_transformers_4_config(tmp_path):
    assert ModelSpec(**read_spec(write_config(tmp_path))) == ModelSpec(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, intermediate_size=96, max_seq_len=4096,
        norm_eps=1e-5, rope_theta=500000.0, rope_scaling=RopeScaling(), tie_embeddings=False)


def test_read_spec_takes_llama_config_defaults_for_absent_keys(tmp_path):
    write_config(tmp_path, num_key_value_heads=..., max_position_embeddings=..., rms_norm_eps=..., rope_theta=...,
                 rope_scaling=..., tie_word_embeddings=...)
    spec = ModelSpec(**read_spec(tmp_path))
    assert (spec.kv_heads, spec.max_seq_len, spec.norm_eps, spec.rope_theta, spec.rope_scaling, spec.tie_embeddings) == (
        4, 2048, 1e-6, 10000.0, None, False)


def test_mistral_keeps_its_context_and_declares_its_sliding_window(tmp_path):
    """A window shorter than the context is modelled; one as long (or none) is plain causal attention."""
    for window, expected in ((1024, 1024), (None, None), (4096, None), (8192, None)):
        write_config(tmp_path, architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=window,
                     rope_scaling=None)
        spec = read_spec(tmp_path)
        assert (spec["max_seq_len"], spec["sliding_window"]) == (4096, expected)


def test_mixtral_declares_its_experts(tmp_path):
    write_config(tmp_path, architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=8,
                 num_experts_per_tok=2, sliding_window=None, rope_scaling=None)
    spec = ModelSpec(**read_spec(tmp_path))
    assert (spec.n_experts, spec.n_experts_per_token, spec.sliding_window) == (8, 2, None)


@pytest.mark.parametrize("changes, words", [
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, ["'gpt2'", "GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM"]),
    ({"architectures": ["LlamaForSequenceClassification"]}, ["LlamaForSequenceClassification", "LlamaForCausalLM"]),
    ({"rope_scaling": {"rope_type": "mrope", "factor": 4.0}}, ["'mrope'", "llama3", "yarn", "longrope"]),
    ({"rope_scaling": {"type": "ntk-by-parts", "factor": 2.0}}, ["'ntk-by-parts'"]),
    ({"attention_bias": True}, ["attention_bias"]),
    ({"hidden_act": "gelu"}, ["hidden_act", "'silu'"]),
    ({"hidden_size": ...}, ["'hidden_size'"]),
])
def test_unsupported_configs_are_refused_by_name(tmp_path, changes, words):
    write_config(tmp_path, **changes)
    with pytest.raises(ConfigError) as e:
        read_spec(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value)
    for word in words:
        assert word in str(e.value)


def test_safetensors_are_preferred_to_bin_as_transformers_does(tmp_path):
    spec = ModelSpec(dim=16, n_layers=1, n_heads=2, vocab_size=32, intermediate_size=24, max_seq_len=8)
    hf, _ = build_twins(spec, 0)
    hf.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not even a zip file")  # never opened
    model = load_model(tmp_path, ModelSpec(**read_spec(tmp_path)), CPU, torch.float32)
    assert torch.equal(model.tok_embeddings.weight, hf.model.embed_tokens.weight)
