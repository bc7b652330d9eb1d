"""HF transformers' state dicts <-> the native layout (runner.model.llama), for every family runner
runs: Llama, Mistral, Mixtral, Qwen2, Qwen3, Gemma 2, Gemma 3 (text) and Phi-3.

Per family: Qwen2 adds q/k/v biases, Qwen3 and Gemma 3 q_norm/k_norm; Gemma's four norms a layer
are input, post-attention, pre- and post-feedforward, each stored less 1 (spec.norm_offset); Phi-3
stores qkv_proj and gate_up_proj already fused, as runner does.

Mixtral's experts come in two layouts: transformers v5's fused one (mlp.experts.gate_up_proj
[E, 2I, D], mlp.experts.down_proj [E, D, I], router mlp.gate) and the one its checkpoints on the
hub use, per expert (block_sparse_moe.experts.J.w1/w3 [I, D], w2 [D, I], router block_sparse_moe.gate).
"""
from __future__ import annotations

import torch

from runner.config.schema import ModelSpec


def norm_names(spec: ModelSpec) -> dict[str, str]:
    """A layer's native norm names -> HF's (under model.layers.N.)."""
    if spec.sandwich_norms:
        names = {"attention_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
                 "ffn_norm": "pre_feedforward_layernorm", "post_ffn_norm": "post_feedforward_layernorm"}
    else:
        names = {"attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    if spec.qk_norm:
        names.update({"attention.q_norm": "self_attn.q_norm", "attention.k_norm": "self_attn.k_norm"})
    return names


def from_hf(state: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Rename and fuse HF tensors; HF's q/k rows are already in our rotate-half order."""
    norm = _offset(spec.norm_offset)
    out = {
        "tok_embeddings.weight": state["model.embed_tokens.weight"],
        "norm.weight": norm(state["model.norm.weight"]),
    }
    if not spec.tie_embeddings:
        out["output.weight"] = state["lm_head.weight"]
    for i in range(spec.n_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        if spec.family == "phi3":
            out[f"{ours}attention.wqkv.weight"] = state[f"{hf}self_attn.qkv_proj.weight"]
        else:
            out[f"{ours}attention.wqkv.weight"] = torch.cat([state[f"{hf}self_attn.{p}_proj.weight"] for p in "qkv"])
        if spec.qkv_bias:
            out[f"{ours}attention.qkv_bias"] = torch.cat([state[f"{hf}self_attn.{p}_proj.bias"] for p in "qkv"])
        out[f"{ours}attention.wo.weight"] = state[f"{hf}self_attn.o_proj.weight"]
        if spec.moe:
            out.update(_experts_from_hf(state, spec, hf, ours))
        else:
            if spec.family == "phi3":
                out[f"{ours}feed_forward.w13.weight"] = state[f"{hf}mlp.gate_up_proj.weight"]
            else:
                ffn = [state[f"{hf}mlp.{p}_proj.weight"] for p in ("gate", "up")]
                out[f"{ours}feed_forward.w13.weight"] = torch.cat(ffn)
            out[f"{ours}feed_forward.w2.weight"] = state[f"{hf}mlp.down_proj.weight"]
        for native, name in norm_names(spec).items():
            out[f"{ours}{native}.weight"] = norm(state[f"{hf}{name}.weight"])
    return out


def _offset(offset: float):
    """A norm weight as runner holds it (the multiplier itself) from HF's, or back with -offset."""
    if offset == 0:
        return lambda w: w
    return lambda w: w.float() + offset  # in fp32, as Gemma's reference adds it


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
    norm = _offset(-spec.norm_offset)
    out = {
        "model.embed_tokens.weight": state["tok_embeddings.weight"],
        "model.norm.weight": norm(state["norm.weight"]),
        "lm_head.weight": state["tok_embeddings.weight" if spec.tie_embeddings else "output.weight"],
    }
    for i in range(spec.n_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        wqkv = state[f"{ours}attention.wqkv.weight"]
        if spec.family == "phi3":
            out[f"{hf}self_attn.qkv_proj.weight"] = wqkv
        else:
            out.update(zip((f"{hf}self_attn.{p}_proj.weight" for p in "qkv"), wqkv.split([q_size, kv_size, kv_size])))
        if spec.qkv_bias:
            bias = state[f"{ours}attention.qkv_bias"].split([q_size, kv_size, kv_size])
            out.update(zip((f"{hf}self_attn.{p}_proj.bias" for p in "qkv"), bias))
        out[f"{hf}self_attn.o_proj.weight"] = state[f"{ours}attention.wo.weight"]
        if spec.moe:
            out.update(_experts_to_hf(state, spec, hf, ours, experts))
        else:
            w13 = state[f"{ours}feed_forward.w13.weight"]
            if spec.family == "phi3":
                out[f"{hf}mlp.gate_up_proj.weight"] = w13
            else:
                out.update(zip((f"{hf}mlp.gate_proj.weight", f"{hf}mlp.up_proj.weight"), w13.chunk(2)))
            out[f"{hf}mlp.down_proj.weight"] = state[f"{ours}feed_forward.w2.weight"]
        for native, name in norm_names(spec).items():
            out[f"{hf}{name}.weight"] = norm(state[f"{ours}{native}.weight"])
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


CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
           "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM"}


def hf_config(spec: ModelSpec) -> dict:
    """The keyword arguments of hf_class(spec)'s config describing the same architecture."""
    cfg = dict(
        vocab_size=spec.vocab_size, hidden_size=spec.dim, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.n_layers, num_attention_heads=spec.n_heads, num_key_value_heads=spec.kv_heads,
        head_dim=spec.head_size, max_position_embeddings=spec.max_seq_len, rms_norm_eps=spec.norm_eps,
        tie_word_embeddings=spec.tie_embeddings,
    )
    rope = {"rope_type": "default", "rope_theta": spec.rope_theta, **_rope_parameters(spec)}
    if spec.rope_scaling is not None and spec.rope_scaling.type == "dynamic":  # HF's length NTK scaling extends
        cfg["max_position_embeddings"] = spec.rope_scaling.original_max_position_embeddings
    if spec.family == "llama":
        cfg.update(rope_theta=spec.rope_theta, attention_bias=False, mlp_bias=False)
        if spec.rope_scaling is not None:
            cfg["rope_scaling"] = _rope_parameters(spec)
        if spec.moe:
            cfg.update(num_local_experts=spec.n_experts, num_experts_per_tok=spec.n_experts_per_token)
            del cfg["mlp_bias"]
        if spec.moe or spec.sliding_window is not None:
            cfg["sliding_window"] = spec.sliding_window
        return cfg
    layer_types = ["full_attention" if spec.window(i) is None else "sliding_attention" for i in range(spec.n_layers)]
    if spec.family in ("qwen2", "qwen3"):
        cfg.update(rope_parameters=rope, layer_types=layer_types, sliding_window=spec.sliding_window,
                   use_sliding_window=spec.sliding_window is not None)
    elif spec.family in ("gemma2", "gemma3"):
        # Gemma's classes build a windowed mask whatever the layer types: a window as long as the context masks nothing.
        cfg.update(layer_types=layer_types, sliding_window=spec.sliding_window or spec.max_seq_len,
                   hidden_activation="gelu_pytorch_tanh",
                   query_pre_attn_scalar=spec.query_pre_attn_scalar or spec.head_size,
                   final_logit_softcapping=spec.final_logit_softcap, attn_logit_softcapping=spec.attn_logit_softcap)
        if spec.family == "gemma2":
            cfg["rope_parameters"] = rope
        else:
            local = dict(rope_type="default", rope_theta=spec.rope_local_theta or spec.rope_theta)
            cfg["rope_parameters"] = {"full_attention": rope, "sliding_attention": local}
    elif spec.family == "phi3":
        del cfg["head_dim"]
        scaling = spec.rope_scaling
        cfg.update(rope_parameters=dict(rope, partial_rotary_factor=spec.partial_rotary_factor),
                   sliding_window=spec.sliding_window)
        if scaling is not None:
            cfg["original_max_position_embeddings"] = scaling.original_max_position_embeddings
    return cfg


def _rope_parameters(spec: ModelSpec) -> dict:
    """HF's rope_parameters for spec.rope_scaling (none: {}); rope_type replaces "default"."""
    s = spec.rope_scaling
    if s is None:
        return {}
    out = dict(rope_type=s.type, factor=s.factor)
    if s.type == "llama3":
        out.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                   original_max_position_embeddings=s.original_max_position_embeddings)
    elif s.type == "yarn":
        out.update(beta_fast=s.beta_fast, beta_slow=s.beta_slow, truncate=s.truncate,
                   original_max_position_embeddings=s.original_max_position_embeddings)
        out.update({k: getattr(s, k) for k in ("mscale", "mscale_all_dim", "attention_factor") if getattr(s, k) is not None})
    elif s.type == "longrope":
        out.update(short_factor=list(s.short_factor), long_factor=list(s.long_factor),
                   original_max_position_embeddings=s.original_max_position_embeddings)
        if s.attention_factor is not None:
            out["attention_factor"] = s.attention_factor
    return out


def hf_class(spec: ModelSpec) -> str:
    """The transformers model class for the architecture: for LLaMA's family Mixtral with experts,
    Mistral with a sliding window, Llama otherwise."""
    if spec.family != "llama":
        return CLASSES[spec.family]
    return "MixtralForCausalLM" if spec.moe else "MistralForCausalLM" if spec.sliding_window else "LlamaForCausalLM"
