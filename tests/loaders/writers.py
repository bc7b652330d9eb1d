"""Writers for the foreign formats, each following its reference converter rather than our loaders.

The q/k permutation here is llama.cpp's (convert_hf_to_gguf.py, LlamaModel.permute), which is also
the inverse of HF's convert_llama_weights_to_hf.py permute: HF rotate-half rows -> Meta's interleaved rows.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import gguf
import numpy as np
import torch

from runner.config.schema import ModelSpec, RopeScaling


def to_interleaved(w, n_head: int):
    """llama.cpp's permute, for numpy arrays and torch tensors alike."""
    x = w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
    x = x.swapaxes(1, 2) if isinstance(x, np.ndarray) else x.transpose(1, 2)
    return x.reshape(w.shape)


def from_interleaved_reference(w: np.ndarray, n_head: int) -> np.ndarray:
    """transformers' GGUF loader (LlamaTensorProcessor._reverse_permute_weights)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def same_arch(a: ModelSpec, b: ModelSpec) -> bool:
    """Equal once the implicit defaults (kv heads, head size) are spelled out."""
    def norm(s):
        return dataclasses.replace(s, n_kv_heads=s.kv_heads, head_dim=s.head_size)
    return norm(a) == norm(b)


# --- HF ---------------------------------------------------------------------------------------


def save_hf_bin(directory: Path, hf_state: dict[str, torch.Tensor], n_shards: int) -> None:
    """pytorch_model.bin, or pytorch_model-0000i-of-0000n.bin plus its index, as transformers 4 wrote them."""
    names = sorted(hf_state)
    if n_shards == 1:
        torch.save({k: hf_state[k].contiguous() for k in names}, directory / "pytorch_model.bin")
        return
    weight_map = {}
    for i in range(n_shards):
        file = f"pytorch_model-{i + 1:05d}-of-{n_shards:05d}.bin"
        part = names[i::n_shards]
        torch.save({k: hf_state[k].contiguous() for k in part}, directory / file)
        weight_map.update({k: file for k in part})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in hf_state.values())}, "weight_map": weight_map}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index))


# --- Meta -------------------------------------------------------------------------------------

# Model-parallel split axes of Meta's fairscale layers (column-parallel: 0, row-parallel: 1).
META_SPLIT = {"wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w3": 0, "w2": 1}


def meta_params(spec: ModelSpec) -> dict:
    """params.json whose Meta FFN formula gives spec.intermediate_size exactly."""
    base = int(2 * (4 * spec.dim) / 3)
    params = dict(dim=spec.dim, n_layers=spec.n_layers, n_heads=spec.n_heads, n_kv_heads=spec.kv_heads,
                  vocab_size=spec.vocab_size, multiple_of=spec.intermediate_size,
                  ffn_dim_multiplier=spec.intermediate_size / base, norm_eps=spec.norm_eps, rope_theta=spec.rope_theta)
    if spec.rope_scaling is not None:
        assert spec.rope_scaling == RopeScaling(), "Meta's params.json can only switch Llama-3.1's scaling on"
        params["use_scaled_rope"] = True
    return params


def save_meta(directory: Path, state: dict[str, torch.Tensor], spec: ModelSpec, n_shards: int = 1,
              embed_axis: int = 0) -> None:
    """A Meta-format directory (params.json, consolidated.NN.pth) from a native state dict.

    embed_axis: how the embedding is split across shards, 0 as Llama 3 does (vocab), 1 as Llama 1/2 (dim).
    A tied spec writes no output.weight.
    """
    assert spec.head_dim in (None, spec.dim // spec.n_heads), "Meta's layout has no head_dim"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "params.json").write_text(json.dumps(meta_params(spec)))
    q_size, kv_size = spec.n_heads * spec.head_size, spec.kv_heads * spec.head_size
    full = {"tok_embeddings.weight": (state["tok_embeddings.weight"], embed_axis), "norm.weight": (state["norm.weight"], None)}
    if not spec.tie_embeddings:
        full["output.weight"] = (state["output.weight"], 0)
    for i in range(spec.n_layers):
        p = f"layers.{i}."
        q, k, v = state[f"{p}attention.wqkv.weight"].split([q_size, kv_size, kv_size])
        w1, w3 = state[f"{p}feed_forward.w13.weight"].chunk(2)
        weights = {"wq": to_interleaved(q, spec.n_heads), "wk": to_interleaved(k, spec.kv_heads), "wv": v,
                   "wo": state[f"{p}attention.wo.weight"]}
        full.update({f"{p}attention.{n}.weight": (w, META_SPLIT[n]) for n, w in weights.items()})
        ffn = {"w1": w1, "w2": state[f"{p}feed_forward.w2.weight"], "w3": w3}
        full.update({f"{p}feed_forward.{n}.weight": (w, META_SPLIT[n]) for n, w in ffn.items()})
        full[f"{p}attention_norm.weight"] = (state[f"{p}attention_norm.weight"], None)
        full[f"{p}ffn_norm.weight"] = (state[f"{p}ffn_norm.weight"], None)
    for s in range(n_shards):
        shard = {name: (w if axis is None else w.chunk(n_shards, dim=axis)[s]).clone() for name, (w, axis) in full.items()}
        shard["rope.freqs"] = torch.zeros(spec.head_size // 2)  # Llama 1/2 carry one; loaders must skip it
        torch.save(shard, directory / f"consolidated.{s:02d}.pth")


# --- GGUF -------------------------------------------------------------------------------------

Q = gguf.GGMLQuantizationType


def encode(w: np.ndarray, qtype: Q) -> tuple[np.ndarray, Q]:
    """w stored as qtype; like llama.cpp, norms stay F32 and rows that do not fill whole blocks fall back to F32."""
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if w.ndim == 1 or w.shape[-1] % block or qtype == Q.F32:
        return w.astype(np.float32), Q.F32
    if qtype == Q.F16:
        return w.astype(np.float16), Q.F16
    return gguf.quants.quantize(w.astype(np.float32), qtype), qtype


def decode(data: np.ndarray, qtype: Q) -> np.ndarray:
    return gguf.quants.dequantize(data, qtype).astype(np.float32)


def llama3_rope_factors(spec: ModelSpec) -> np.ndarray:
    """convert_hf_to_gguf.py's rope_freqs for Llama-3.1 scaling (in float32, as it computes them)."""
    s, dim = spec.rope_scaling, spec.head_size
    freqs = 1.0 / (spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    low_wavelen, high_wavelen = s.original_max_position_embeddings / s.low_freq_factor, s.original_max_position_embeddings / s.high_freq_factor
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1)
        elif wavelen > low_wavelen:
            factors.append(s.factor)
        else:
            smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
            factors.append(1 / ((1 - smooth) / s.factor + smooth))
    return np.array(factors, dtype=np.float32)


def llama_writer(path: Path, spec: ModelSpec, arch: str = "llama") -> gguf.GGUFWriter:
    """A GGUF writer with the metadata llama.cpp's converter writes for a LLaMA-shaped `spec`."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(spec.max_seq_len)
    writer.add_embedding_length(spec.dim)
    writer.add_block_count(spec.n_layers)
    writer.add_feed_forward_length(spec.intermediate_size)
    writer.add_head_count(spec.n_heads)
    writer.add_head_count_kv(spec.kv_heads)
    writer.add_rope_freq_base(spec.rope_theta)
    writer.add_layer_norm_rms_eps(spec.norm_eps)
    writer.add_vocab_size(spec.vocab_size)
    writer.add_rope_dimension_count(spec.head_size)
    return writer


def save_gguf(path: Path, hf_state: dict[str, torch.Tensor], spec: ModelSpec, qtype: Q = Q.F32,
              arch: str = "llama", key_length: bool = False) -> dict[str, torch.Tensor]:
    """A llama.cpp-style GGUF of an HF state dict; returns the HF state dict its stored values decode to."""
    writer = llama_writer(path, spec, arch)
    if key_length or spec.head_size != spec.dim // spec.n_heads:
        writer.add_key_length(spec.head_size)
        writer.add_value_length(spec.head_size)
    if spec.moe:  # as convert_hf_to_gguf.py writes Mixtral: llama with stacked expert tensors
        writer.add_expert_count(spec.n_experts)
        writer.add_expert_used_count(spec.n_experts_per_token)
    if spec.sliding_window is not None:
        writer.add_sliding_window(spec.sliding_window)

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if not spec.tie_embeddings:
        names["lm_head.weight"] = "output.weight"
    per_layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    hf_state = dict(hf_state)
    for i in range(spec.n_layers):
        names.update({f"model.layers.{i}.{hf}.weight": f"blk.{i}.{g}.weight" for hf, g in per_layer.items()
                      if not (spec.moe and hf.startswith("mlp."))})
        if spec.moe:  # transformers v5's fused experts: gate and up side by side in gate_up_proj
            mlp = f"model.layers.{i}.mlp."
            gate, up = hf_state.pop(f"{mlp}experts.gate_up_proj").chunk(2, dim=1)
            hf_state.update({f"{mlp}experts.gate": gate, f"{mlp}experts.up": up})
            names.update({f"{mlp}gate.weight": f"blk.{i}.ffn_gate_inp.weight", f"{mlp}experts.gate": f"blk.{i}.ffn_gate_exps.weight",
                          f"{mlp}experts.up": f"blk.{i}.ffn_up_exps.weight", f"{mlp}experts.down_proj": f"blk.{i}.ffn_down_exps.weight"})

    decoded = {}
    for hf_name, gguf_name in names.items():
        w = hf_state[hf_name].float().numpy()
        heads = spec.n_heads if "q_proj" in hf_name else spec.kv_heads if "k_proj" in hf_name else None
        if heads:
            w = to_interleaved(w, heads)
        data, stored = encode(w, qtype)
        writer.add_tensor(gguf_name, data, raw_dtype=None if stored in (Q.F32, Q.F16) else stored)
        back = decode(data, stored)
        decoded[hf_name] = torch.from_numpy(from_interleaved_reference(back, heads) if heads else back)
    if spec.rope_scaling is not None:
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors(spec))
    if spec.tie_embeddings:
        decoded["lm_head.weight"] = decoded["model.embed_tokens.weight"]
    for i in range(spec.n_layers if spec.moe else 0):
        mlp = f"model.layers.{i}.mlp."
        decoded[f"{mlp}experts.gate_up_proj"] = torch.cat([decoded.pop(f"{mlp}experts.gate"), decoded.pop(f"{mlp}experts.up")], dim=1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return decoded
