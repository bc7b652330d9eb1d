"""What of a model's math runner's CPU kernels leave to torch, named so that `runner` can say it.

KernelOps runs each op on runner's kernels where they cover it and falls back to torch's op,
per op, where they do not: attention whose scores are scaled otherwise than by 1 / sqrt(head_dim)
or soft-capped, or whose RoPE turns part of each head; a GELU-tanh gate. Its fused decode step
(every layer in one kernel call) takes plain LLaMA layers only; any family's extra puts each
layer's ops back on calls of their own (still runner's kernels where they apply). The model's own
elementwise extras (q/k/v biases, scaled embeddings, the final soft-cap) are torch's under any ops.
"""
from __future__ import annotations

from runner.config.schema import ModelSpec


def fallbacks(spec: ModelSpec) -> list[str]:
    """What a model of `spec` runs on torch's ops, or off the fused decode step, under runner's
    kernels, each with why: e.g. ["attention on torch (soft-capping)", "fused decode step off
    (sandwich norms)"] (the fused step's reasons leave out attention's and the gate's, which keep
    it off too). Empty where every op takes runner's kernels."""
    attention = []
    if spec.query_pre_attn_scalar not in (None, spec.head_size):  # head_size's: the kernels' own 1 / sqrt(D)
        attention.append("query_pre_attn_scalar")
    if spec.attn_logit_softcap is not None:
        attention.append("soft-capping")
    if spec.rotary_dim != spec.head_size:
        attention.append("partial rotary")
    gate = None if spec.activation == "silu" or spec.moe else spec.activation  # experts are SwiGLU
    fused = []  # beside attention and gate, which keep the fused step off as well
    for on, why in ((spec.qkv_bias, "q/k/v biases"), (spec.qk_norm, "q/k norms"),
                    (spec.rope_local_theta is not None, "local RoPE base"),
                    (len({spec.window(layer) for layer in range(spec.n_layers)}) > 1, "windows per layer"),
                    (spec.sandwich_norms, "sandwich norms"), (spec.moe, "mixture of experts")):
        if on:
            fused.append(why)
    out = [f"attention on torch ({', '.join(attention)})"] if attention else []
    out += [f"feed-forward gate on torch ({gate})"] if gate else []
    if fused:
        out.append(f"fused decode step off ({', '.join(fused)})")
    elif out:
        out.append("fused decode step off")
    return out


def note(spec: ModelSpec) -> str | None:
    """The line `runner` prints for `spec`'s fallbacks, or None where there are none."""
    found = fallbacks(spec)
    return f"kernels: {', '.join(found)}" if found else None
