"""Tiny random LLaMA configs and prompts, and HF's model with our twin loaded from it."""
from __future__ import annotations

import dataclasses
import math

import torch
import transformers
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from runner.config.schema import ModelSpec, RopeScaling
from runner.loaders.hf_layout import from_hf, hf_class, hf_config
from runner.model.llama import Transformer

MAX_SEQ_LEN = 64


@st.composite
def llama3_scalings(draw, head_dim: int, theta: float) -> RopeScaling:
    """Llama-3.1 scaling whose three bands (kept, interpolated, slowed down) each hold a frequency.

    The scaled frequencies apply at every position, so the bands matter even for short prompts;
    the band edges are placed between the model's own wavelengths, never on one.
    """
    wavelens = [2 * math.pi * theta ** (2 * i / head_dim) for i in range(head_dim // 2)]  # increasing
    first_mid = draw(st.integers(1, len(wavelens) - 2))
    first_slow = draw(st.integers(first_mid + 1, len(wavelens) - 1))

    def edge_below(i: int) -> float:  # geometrically between wavelens[i - 1] and wavelens[i]
        f = draw(st.floats(0.1, 0.9))
        return wavelens[i - 1] ** (1 - f) * wavelens[i] ** f

    high_wavelen, low_wavelen = edge_below(first_mid), edge_below(first_slow)
    original = draw(st.integers(8, MAX_SEQ_LEN - 1))  # HF warns unless below max_position_embeddings
    return RopeScaling(
        factor=draw(st.floats(2.0, 32.0)), low_freq_factor=original / low_wavelen,
        high_freq_factor=original / high_wavelen, original_max_position_embeddings=original,
    )


@st.composite
def model_specs(draw) -> ModelSpec:
    """MHA, GQA and MQA; head_dim tied to dim or not; RoPE with and without scaling; tied or not."""
    n_kv_heads = draw(st.integers(1, 8))
    n_heads = n_kv_heads * draw(st.integers(1, 8 // n_kv_heads))  # group 1: MHA; 1 kv head: MQA
    head_dim = draw(st.sampled_from([8, 16, 32]))
    # HF's LlamaConfig insists that n_heads divide dim even when head_dim is set.
    dim = n_heads * draw(st.just(head_dim) | st.integers(1, 16))
    theta = 10 ** draw(st.floats(2.0, 6.0))
    return ModelSpec(
        dim=dim,
        n_layers=draw(st.integers(1, 3)),
        n_heads=n_heads,
        n_kv_heads=None if n_kv_heads == n_heads and draw(st.booleans()) else n_kv_heads,
        head_dim=None if dim == n_heads * head_dim and draw(st.booleans()) else head_dim,
        vocab_size=draw(st.integers(16, 300)),
        intermediate_size=draw(st.integers(8, 96)),
        max_seq_len=MAX_SEQ_LEN,
        norm_eps=draw(st.sampled_from([1e-5, 1e-6])),
        rope_theta=theta,
        rope_scaling=draw(st.none() | llama3_scalings(head_dim, theta)),
        tie_embeddings=draw(st.booleans()),
    )


@st.composite
def moe_specs(draw, windows: st.SearchStrategy = st.none() | st.integers(1, MAX_SEQ_LEN)) -> ModelSpec:
    """model_specs() as Mixtral: 2-8 experts, top 1 or 2, and a sliding window drawn from `windows`."""
    return dataclasses.replace(draw(model_specs()), n_experts=draw(st.integers(2, 8)),
                               n_experts_per_token=draw(st.integers(1, 2)), sliding_window=draw(windows))


@st.composite
def model_cases(draw, min_len: int = 1, max_len: int = 40, max_batch: int = 2,
                specs: st.SearchStrategy[ModelSpec] | None = None):
    """(spec, init seed, tokens [B, T]); the spec from `specs`, model_specs() by default."""
    spec = draw(model_specs() if specs is None else specs)
    length = draw(st.integers(min_len, max_len))
    batch = draw(st.integers(1, max_batch))
    row = st.lists(st.integers(0, spec.vocab_size - 1), min_size=length, max_size=length)
    tokens = torch.tensor(draw(st.lists(row, min_size=batch, max_size=batch)))
    return spec, draw(st.integers(0, 2**32 - 1)), tokens


def build_twins(spec: ModelSpec, seed: int) -> tuple[LlamaForCausalLM, Transformer]:
    """HF's fp32 LlamaForCausalLM with large random weights, and our Transformer loaded from it.

    HF's own init (std 0.02) gives near-zero logits that would hide most differences; a fixed
    large std instead makes attention so sharp that fp32 rounding alone moves logits by 1e-3.
    Unit-variance activations (std 1 / sqrt(fan_in)) sit between the two.
    No BOS/EOS/PAD ids, so HF's generate never stops early nor masks a token.
    """
    config = LlamaConfig(**hf_config(spec), bos_token_id=None, eos_token_id=None, pad_token_id=None,
                         attn_implementation="eager")
    hf = randomise_(LlamaForCausalLM(config).eval(), seed)
    ours = Transformer(spec)
    ours.load_state_dict(from_hf(hf.state_dict(), spec))
    return hf, ours.eval()


def randomise_(hf: PreTrainedModel, seed: int) -> PreTrainedModel:
    """build_twins' weights, in place: norms U(0.5, 1.5), embeddings N(0, 1), every matrix
    N(0, 1 / fan_in), fan_in its last dimension (a Mixtral expert stack [E, out, in] too)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim == 1:  # RMSNorm weights
                p.uniform_(0.5, 1.5, generator=gen)
            elif p is hf.model.embed_tokens.weight:
                p.normal_(0.0, 1.0, generator=gen)
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5, generator=gen)
    return hf


def hf_reference(spec: ModelSpec, seed: int) -> PreTrainedModel:
    """HF's fp32 model of hf_class(spec) (Llama, Mistral or Mixtral) with build_twins' weights:
    eager attention, HF's own per-expert loop, no BOS/EOS/PAD ids."""
    cls = getattr(transformers, hf_class(spec))
    config = cls.config_class(**hf_config(spec), bos_token_id=None, eos_token_id=None, pad_token_id=None,
                              attn_implementation="eager", experts_implementation="eager")
    return randomise_(cls(config).eval(), seed)


def twins(spec: ModelSpec, seed: int) -> tuple[PreTrainedModel, Transformer]:
    """hf_reference(spec, seed) and our Transformer loaded from it (any family, build_twins' weights)."""
    hf = hf_reference(spec, seed)
    ours = Transformer(spec)
    ours.load_state_dict(from_hf(hf.state_dict(), spec))
    return hf, ours.eval()


def logits_bound(reference: torch.Tensor) -> float:
    """The largest fp32 difference two correct implementations may show on these logits."""
    return 1e-4 * max(1.0, reference.abs().max().item())
