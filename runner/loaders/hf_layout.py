"""HF transformers' LlamaForCausalLM state dict <-> the native layout (runner.model.llama)."""
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
        ffn = [state[f"{hf}mlp.{p}_proj.weight"] for p in ("gate", "up")]
        out[f"{ours}feed_forward.w13.weight"] = torch.cat(ffn)
        out[f"{ours}feed_forward.w2.weight"] = state[f"{hf}mlp.down_proj.weight"]
        out[f"{ours}attention_norm.weight"] = state[f"{hf}input_layernorm.weight"]
        out[f"{ours}ffn_norm.weight"] = state[f"{hf}post_attention_layernorm.weight"]
    return out


def to_hf(state: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """The inverse of from_hf."""
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
        gate, up = state[f"{ours}feed_forward.w13.weight"].chunk(2)
        out.update({f"{hf}mlp.gate_proj.weight": gate, f"{hf}mlp.up_proj.weight": up})
        out[f"{hf}mlp.down_proj.weight"] = state[f"{ours}feed_forward.w2.weight"]
        out[f"{hf}input_layernorm.weight"] = state[f"{ours}attention_norm.weight"]
        out[f"{hf}post_attention_layernorm.weight"] = state[f"{ours}ffn_norm.weight"]
    return out


def hf_config(spec: ModelSpec) -> dict:
    """The LlamaConfig keyword arguments describing the same architecture."""
    cfg = dict(
        vocab_size=spec.vocab_size, hidden_size=spec.dim, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.n_layers, num_attention_heads=spec.n_heads, num_key_value_heads=spec.kv_heads,
        head_dim=spec.head_size, max_position_embeddings=spec.max_seq_len, rms_norm_eps=spec.norm_eps,
        rope_theta=spec.rope_theta, tie_word_embeddings=spec.tie_embeddings, attention_bias=False, mlp_bias=False,
    )
    if spec.rope_scaling is not None:
        s = spec.rope_scaling
        cfg["rope_scaling"] = dict(rope_type="llama3", factor=s.factor, low_freq_factor=s.low_freq_factor,
                                   high_freq_factor=s.high_freq_factor,
                                   original_max_position_embeddings=s.original_max_position_embeddings)
    return cfg
