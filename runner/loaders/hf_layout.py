"""HF transformers' Llama/Mistral/MixtralForCausalLM state dict <-> the native layout (runner.model.llama).

Mixtral's experts come in two layouts: transformers v5's fused one (mlp.experts.gate_up_proj
[E, 2I, D], mlp.experts.down_proj [E, D, I], router mlp.gate) and the one its checkpoints on the
hub use, per expert (block_sparse_moe.experts.J.w1/w3 [I, D], w2 [D, I], router block_sparse_moe.gate).
"""
from __future__ import annotations

import torch

from runner.config.schema import ModelSpec


def from_hf(state: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Rename and fuse HF tensors; HF's q/k rows are already in our rotate-half order."""
    out = {
        "tok_embeddings.weight": state["model.embed_tokens.weight"],
        "norm.weight": state["model.norm.weight"],
    }
    if not spec.tie_embeddings:
        out["output.weight"] = state["lm_head.weight"]
    for i in range(spec.n_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        attn = [state[f"{hf}self_attn.{p}_proj.weight"] for p in "qkv"]
        out[f"{ours}attention.wqkv.weight"] = torch.cat(attn)
        out[f"{ours}attention.wo.weight"] = state[f"{hf}self_attn.o_proj.weight"]
        if spec.moe:
            out.update(_experts_from_hf(state, spec, hf, ours))
        else:
            ffn = [state[f"{hf}mlp.{p}_proj.weight"] for p in ("gate", "up")]
            out[f"{ours}feed_forward.w13.weight"] = torch.cat(ffn)
            out[f"{ours}feed_forward.w2.weight"] = state[f"{hf}mlp.down_proj.weight"]
        out[f"{ours}attention_norm.weight"] = state[f"{hf}input_layernorm.weight"]
        out[f"{ours}ffn_norm.weight"] = state[f"{hf}post_attention_layernorm.weight"]
    return out


PER_EXPERT = "block_sparse_moe."  # the prefix of the per-expert layout's keys


def per_expert(names) -> bool:
    """Whether a Mixtral state dict's keys use the per-expert layout (not v5's fused one)."""
    return any(PER_EXPERT in name for name in names)


def _experts_from_hf(state, spec: ModelSpec, hf: str, ours: str) -> dict[str, torch.Tensor]:
    if f"{hf}{PER_EXPERT}gate.weight" in state:
        moe, experts = f"{hf}{PER_EXPERT}", range(spec.n_experts)
        w13 = torch.stack([torch.cat([state[f"{moe}experts.{j}.w1.weight"], state[f"{moe}experts.{j}.w3.weight"]])
                           for j in experts])
        w2 = torch.stack([state[f"{moe}experts.{j}.w2.weight"] for j in experts])
        gate = state[f"{moe}gate.weight"]
    else:
        gate = state[f"{hf}mlp.gate.weight"]
        w13, w2 = state[f"{hf}mlp.experts.gate_up_proj"], state[f"{hf}mlp.experts.down_proj"]
    return {f"{ours}feed_forward.gate.weight": gate, f"{ours}feed_forward.experts.w13.weight": w13,
            f"{ours}feed_forward.experts.w2.weight": w2}


def to_hf(state: dict[str, torch.Tensor], spec: ModelSpec, experts: str = "fused") -> dict[str, torch.Tensor]:
    """The inverse of from_hf; Mixtral's `experts` "fused" (transformers v5) or "per-expert"."""
    q_size, kv_size = spec.n_heads * spec.head_size, spec.kv_heads * spec.head_size
    out = {
        "model.embed_tokens.weight": state["tok_embeddings.weight"],
        "model.norm.weight": state["norm.weight"],
        "lm_head.weight": state["tok_embeddings.weight" if spec.tie_embeddings else "output.weight"],
    }
    for i in range(spec.n_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        q, k, v = state[f"{ours}attention.wqkv.weight"].split([q_size, kv_size, kv_size])
        out.update({f"{hf}self_attn.q_proj.weight": q, f"{hf}self_attn.k_proj.weight": k, f"{hf}self_attn.v_proj.weight": v})
        out[f"{hf}self_attn.o_proj.weight"] = state[f"{ours}attention.wo.weight"]
        if spec.moe:
            out.update(_experts_to_hf(state, spec, hf, ours, experts))
        else:
            gate, up = state[f"{ours}feed_forward.w13.weight"].chunk(2)
            out.update({f"{hf}mlp.gate_proj.weight": gate, f"{hf}mlp.up_proj.weight": up})
            out[f"{hf}mlp.down_proj.weight"] = state[f"{ours}feed_forward.w2.weight"]
        out[f"{hf}input_layernorm.weight"] = state[f"{ours}attention_norm.weight"]
        out[f"{hf}post_attention_layernorm.weight"] = state[f"{ours}ffn_norm.weight"]
    return out


def _experts_to_hf(state, spec: ModelSpec, hf: str, ours: str, layout: str) -> dict[str, torch.Tensor]:
    gate = state[f"{ours}feed_forward.gate.weight"]
    w13, w2 = state[f"{ours}feed_forward.experts.w13.weight"], state[f"{ours}feed_forward.experts.w2.weight"]
    if layout == "fused":
        return {f"{hf}mlp.gate.weight": gate, f"{hf}mlp.experts.gate_up_proj": w13, f"{hf}mlp.experts.down_proj": w2}
    out = {f"{hf}{PER_EXPERT}gate.weight": gate}
    for j in range(spec.n_experts):
        w1, w3 = w13[j].chunk(2)
        out.update({f"{hf}{PER_EXPERT}experts.{j}.w1.weight": w1, f"{hf}{PER_EXPERT}experts.{j}.w3.weight": w3,
                    f"{hf}{PER_EXPERT}experts.{j}.w2.weight": w2[j]})
    return out


def hf_config(spec: ModelSpec) -> dict:
    """The Llama/Mistral/MixtralConfig keyword arguments describing the same architecture (see hf_class)."""
    cfg = dict(
        vocab_size=spec.vocab_size, hidden_size=spec.dim, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.n_layers, num_attention_heads=spec.n_heads, num_key_value_heads=spec.kv_heads,
        head_dim=spec.head_size, max_position_embeddings=spec.max_seq_len, rms_norm_eps=spec.norm_eps,
        rope_theta=spec.rope_theta, tie_word_embeddings=spec.tie_embeddings, attention_bias=False, mlp_bias=False,
    )
    if spec.moe:
        cfg.update(num_local_experts=spec.n_experts, num_experts_per_tok=spec.n_experts_per_token)
        del cfg["mlp_bias"]
    if spec.moe or spec.sliding_window is not None:
        cfg["sliding_window"] = spec.sliding_window
    if spec.rope_scaling is not None:
        s = spec.rope_scaling
        cfg["rope_scaling"] = dict(rope_type="llama3", factor=s.factor, low_freq_factor=s.low_freq_factor,
                                   high_freq_factor=s.high_freq_factor,
                                   original_max_position_embeddings=s.original_max_position_embeddings)
    return cfg


def hf_class(spec: ModelSpec) -> str:
    """The transformers model class for the architecture: Mixtral with experts, Mistral with a
    sliding window, Llama otherwise."""
    return "MixtralForCausalLM" if spec.moe else "MistralForCausalLM" if spec.sliding_window else "LlamaForCausalLM"
