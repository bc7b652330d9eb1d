"""Tiny random configs of the families beyond LLaMA (Qwen2, Qwen3, Gemma 2, Gemma 3, Phi-3), each
with the features its HF class has, and RoPE scalings of every type HF defines."""
from __future__ import annotations

import dataclasses

from hypothesis import strategies as st

from runner.config.schema import ModelSpec, RopeScaling
from tests.properties.strategies import MAX_SEQ_LEN, llama3_scalings

FAMILIES = ("qwen2", "qwen3", "gemma2", "gemma3", "phi3")


@st.composite
def rope_scalings(draw, rotary_dim: int, theta: float, types=("linear", "dynamic", "yarn", "longrope", "llama3")):
    """A RoPE scaling of one of `types`, whose original length falls inside a drawn prompt."""
    kind = draw(st.sampled_from(types))
    original = draw(st.integers(4, 32))
    if kind == "llama3":
        return dataclasses.replace(draw(llama3_scalings(rotary_dim, theta)), original_max_position_embeddings=original)
    if kind == "longrope":
        factors = st.lists(st.floats(1.0, 8.0), min_size=rotary_dim // 2, max_size=rotary_dim // 2)
        return RopeScaling(type=kind, factor=MAX_SEQ_LEN / original, original_max_position_embeddings=original,
                           short_factor=draw(factors), long_factor=draw(factors))
    factor = draw(st.floats(1.5, 16.0))
    if kind == "yarn":
        return RopeScaling(type=kind, factor=factor, original_max_position_embeddings=original,
                           beta_fast=draw(st.sampled_from([16.0, 32.0])), beta_slow=draw(st.sampled_from([1.0, 2.0])),
                           truncate=draw(st.booleans()))
    return RopeScaling(type=kind, factor=factor, original_max_position_embeddings=original)


@st.composite
def family_specs(draw, families=FAMILIES) -> ModelSpec:
    """A tiny spec of a family drawn from `families`, its optional features drawn too: windows
    longer and shorter than the prompts, local and global layers, soft-capping, a query scale
    apart from head_dim, partial rotary, and RoPE scaling of every type."""
    family = draw(st.sampled_from(families))
    n_kv_heads = draw(st.integers(1, 4))
    n_heads = n_kv_heads * draw(st.integers(1, 4 // n_kv_heads))
    head_dim = draw(st.sampled_from([8, 16, 32]))
    # HF's configs insist that n_heads divide dim even where head_dim is set; Phi-3 has no head_dim.
    dim = n_heads * (head_dim if family == "phi3" else draw(st.just(head_dim) | st.integers(2, 16)))
    theta = 10 ** draw(st.floats(2.0, 6.0))
    gemma = family.startswith("gemma")
    partial = draw(st.sampled_from([1.0, 0.5, 0.75])) if family == "phi3" else 1.0
    rotary_dim = int(head_dim * partial)
    if rotary_dim % 2:
        partial, rotary_dim = 1.0, head_dim
    scalings = {"phi3": ("longrope",), "gemma2": ("linear", "dynamic", "yarn")}.get(family)
    scaling = draw(st.none() | (rope_scalings(rotary_dim, theta) if scalings is None else
                                rope_scalings(rotary_dim, theta, scalings)))
    # From 2: HF's cache keeps window - 1 past keys, and its cached decode with a window of 1 differs
    # from its own uncached forward (runner's equals the uncached one).
    if family == "gemma3" and scaling is not None and scaling.type == "yarn":
        # transformers reads yarn's truncate from the top of Gemma 3's per-layer-type RoPE
        # parameters, where it never is: its Gemma 3 always truncates.
        scaling = dataclasses.replace(scaling, truncate=True)
    window = draw(st.none() | st.integers(2, MAX_SEQ_LEN))
    spec = ModelSpec(
        dim=dim, n_layers=draw(st.integers(1, 4)), n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim,
        vocab_size=draw(st.integers(16, 300)), intermediate_size=draw(st.integers(8, 64)), max_seq_len=MAX_SEQ_LEN,
        norm_eps=draw(st.sampled_from([1e-5, 1e-6])), rope_theta=theta, rope_scaling=scaling,
        tie_embeddings=draw(st.booleans()), family=family, sliding_window=window,
        global_every=draw(st.none() | st.integers(2, 3)) if window is not None and family != "phi3" else None,
        qkv_bias=family == "qwen2", qk_norm=family in ("qwen3", "gemma3"), partial_rotary_factor=partial,
    )
    if gemma:
        spec = dataclasses.replace(
            spec, norm_offset=1.0, scale_embeddings=True, activation="gelu_tanh", sandwich_norms=True,
            query_pre_attn_scalar=draw(st.sampled_from([head_dim, 8, 100])),
            attn_logit_softcap=draw(st.none() | st.floats(2.0, 50.0)) if family == "gemma2" else None,
            final_logit_softcap=draw(st.none() | st.floats(2.0, 30.0)),
            rope_local_theta=10 ** draw(st.floats(2.0, 5.0)) if family == "gemma3" else None,
        )
    return spec
