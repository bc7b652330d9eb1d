"""GGUF files of the families beyond LLaMA, written as llama.cpp's convert_hf_to_gguf.py writes them.

The writer starts from an HF state dict and follows the converter, not runner's loader: tensor
names come from the gguf package's own name map (the table the converter uses), Gemma norm weights
get 1 added, no q/k rows are permuted (the converter permutes llama's only), Phi-3 keeps HF's fused
qkv_proj and gate_up_proj, and the metadata keys are the ones each family's converter class writes.
"""
from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
import torch

from runner.config.schema import ModelSpec

Q = gguf.GGMLQuantizationType
GEMMAS = ("gemma2", "gemma3")
# Native norm -> HF's: with sandwich norms (Gemma) post_attention_layernorm follows attention and the
# feed-forward's own norm is pre_feedforward_layernorm; otherwise post_attention_layernorm is that one.
NORMS = {"attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
SANDWICH_NORMS = {"attention_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
                  "ffn_norm": "pre_feedforward_layernorm", "post_ffn_norm": "post_feedforward_layernorm"}


def native_state(spec: ModelSpec, seed: int) -> dict[str, torch.Tensor]:
    """Random weights in runner's native layout for `spec`: N(0, 0.02) matrices and biases, norm
    multipliers in [0.75, 1.25]: unlike ones, a norm loaded into the wrong place shows, and within
    [0.5, 2] fp32 gives Gemma's w - 1 + 1 back exactly."""
    g = torch.Generator().manual_seed(seed)
    q, kv, hd, d, i = spec.n_heads, spec.kv_heads, spec.head_size, spec.dim, spec.intermediate_size

    def matrix(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    def norm(size):
        return 0.75 + 0.5 * torch.rand(size, generator=g)

    out = {"tok_embeddings.weight": matrix(spec.vocab_size, d), "norm.weight": norm(d)}
    if not spec.tie_embeddings:
        out["output.weight"] = matrix(spec.vocab_size, d)
    for n in range(spec.n_layers):
        p = f"layers.{n}."
        out.update({f"{p}attention_norm.weight": norm(d), f"{p}attention.wqkv.weight": matrix((q + 2 * kv) * hd, d),
                    f"{p}attention.wo.weight": matrix(d, q * hd), f"{p}ffn_norm.weight": norm(d),
                    f"{p}feed_forward.w13.weight": matrix(2 * i, d), f"{p}feed_forward.w2.weight": matrix(d, i)})
        if spec.qkv_bias:
            out[f"{p}attention.qkv_bias"] = matrix((q + 2 * kv) * hd)
        if spec.qk_norm:
            out.update({f"{p}attention.q_norm.weight": norm(hd), f"{p}attention.k_norm.weight": norm(hd)})
        if spec.sandwich_norms:
            out.update({f"{p}post_attention_norm.weight": norm(d), f"{p}post_ffn_norm.weight": norm(d)})
    return out


def to_hf(state: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """The native state dict under HF transformers' names for spec.family (Gemma norms as HF's w in
    x * (1 + w)); tied models get lm_head.weight too, as HF's state_dict() lists it."""
    offset = 1.0 if spec.family in GEMMAS else 0.0
    q_size, kv_size = spec.n_heads * spec.head_size, spec.kv_heads * spec.head_size
    out = {"model.embed_tokens.weight": state["tok_embeddings.weight"], "model.norm.weight": state["norm.weight"] - offset,
           "lm_head.weight": state["tok_embeddings.weight" if spec.tie_embeddings else "output.weight"]}
    for n in range(spec.n_layers):
        p, h = f"layers.{n}.", f"model.layers.{n}."
        wqkv, w13 = state[f"{p}attention.wqkv.weight"], state[f"{p}feed_forward.w13.weight"]
        if spec.family == "phi3":
            out.update({f"{h}self_attn.qkv_proj.weight": wqkv, f"{h}mlp.gate_up_proj.weight": w13})
        else:
            out.update(zip((f"{h}self_attn.{x}_proj.weight" for x in "qkv"), wqkv.split([q_size, kv_size, kv_size])))
            out.update(zip((f"{h}mlp.{x}_proj.weight" for x in ("gate", "up")), w13.chunk(2)))
        if spec.qkv_bias:
            out.update(zip((f"{h}self_attn.{x}_proj.bias" for x in "qkv"),
                           state[f"{p}attention.qkv_bias"].split([q_size, kv_size, kv_size])))
        if spec.qk_norm:
            for x in "qk":
                out[f"{h}self_attn.{x}_norm.weight"] = state[f"{p}attention.{x}_norm.weight"] - offset
        out[f"{h}self_attn.o_proj.weight"] = state[f"{p}attention.wo.weight"]
        out[f"{h}mlp.down_proj.weight"] = state[f"{p}feed_forward.w2.weight"]
        for ours, theirs in (SANDWICH_NORMS if spec.sandwich_norms else NORMS).items():
            out[f"{h}{theirs}.weight"] = state[f"{p}{ours}.weight"] - offset
    return out


def stored(w: np.ndarray, qtype: Q) -> tuple[np.ndarray, Q]:
    """w as llama.cpp would store it as qtype: 1-D tensors and rows that fill no whole block stay F32."""
    if w.ndim == 1 or qtype == Q.F32 or w.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        return w.astype(np.float32), Q.F32
    return gguf.quants.quantize(w.astype(np.float32), qtype), qtype


def decoded(state: dict[str, torch.Tensor], qtype: Q) -> dict[str, torch.Tensor]:
    """The values `state` reads back as once stored as qtype (fused tensors are stored whole, so
    each native tensor is quantized as one)."""
    out = {}
    for name, w in state.items():
        data, kind = stored(w.numpy(), qtype)
        out[name] = torch.from_numpy(gguf.quants.dequantize(data, kind).astype(np.float32).reshape(w.shape))
    return out


def write_gguf(path: Path, hf_state: dict[str, torch.Tensor], spec: ModelSpec, qtype: Q = Q.F32) -> None:
    """A GGUF of `hf_state` for spec.family (llama.cpp's architecture name), as the converter writes it."""
    arch = spec.family
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(spec.n_layers)
    w.add_context_length(spec.max_seq_len)
    w.add_embedding_length(spec.dim)
    w.add_feed_forward_length(spec.intermediate_size)
    w.add_head_count(spec.n_heads)
    w.add_head_count_kv(spec.kv_heads)
    w.add_layer_norm_rms_eps(spec.norm_eps)
    w.add_vocab_size(spec.vocab_size)  # the converters but llama's leave it to the token list; no tokens here
    if arch != "gemma2":  # Gemma2Model writes no RoPE base: llama.cpp and HF both default to 10000
        w.add_rope_freq_base(spec.rope_theta)
    if arch in ("qwen3", *GEMMAS):  # TextModel writes them where config.json has head_dim
        w.add_key_length(spec.head_size)
        w.add_value_length(spec.head_size)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(spec.attn_logit_softcap)
        w.add_final_logit_softcapping(spec.final_logit_softcap)
    if arch in GEMMAS and spec.sliding_window is not None:
        w.add_sliding_window(spec.sliding_window)
    if arch == "gemma3" and spec.final_logit_softcap is not None:
        w.add_final_logit_softcapping(spec.final_logit_softcap)
    if arch == "phi3":
        _phi3_metadata(w, spec)
    s = spec.rope_scaling
    if s is not None and s.type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(s.factor)
    if s is not None and s.type == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(s.factor)
        w.add_rope_scaling_orig_ctx_len(s.original_max_position_embeddings)
        w.add_rope_scaling_yarn_beta_fast(s.beta_fast)
        w.add_rope_scaling_yarn_beta_slow(s.beta_slow)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], spec.n_layers)
    for name, tensor in hf_state.items():
        if name == "lm_head.weight" and (spec.tie_embeddings or arch == "gemma2"):
            continue  # tied: llama.cpp reads token_embd for the output
        if arch in GEMMAS and name.endswith("norm.weight"):
            tensor = tensor + 1  # the converters' "ref code in Gemma3RMSNorm"
        data, kind = stored(tensor.float().numpy(), qtype)
        w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), data,
                     raw_dtype=None if kind == Q.F32 else kind)
    if s is not None and s.type == "longrope":
        w.add_tensor("rope_factors_long.weight", np.array(s.long_factor, dtype=np.float32))
        w.add_tensor("rope_factors_short.weight", np.array(s.short_factor, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _phi3_metadata(w: gguf.GGUFWriter, spec: ModelSpec) -> None:
    """Phi3MiniModel.set_gguf_parameters and generate_extra_tensors' metadata."""
    s = spec.rope_scaling
    w.add_rope_dimension_count(spec.rotary_dim)
    w.add_sliding_window(spec.sliding_window or 0)  # 0: none (Phi-4)
    w.add_rope_scaling_orig_ctx_len(s.original_max_position_embeddings if s is not None else spec.max_seq_len)
    if s is not None:
        scale = spec.max_seq_len / s.original_max_position_embeddings
        default = math.sqrt(1 + math.log(scale) / math.log(s.original_max_position_embeddings)) if scale > 1 else 1.0
        w.add_rope_scaling_attn_factors(default if s.attention_factor is None else s.attention_factor)

