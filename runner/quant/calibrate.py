"""Running GPTQ through a Transformer, one block at a time.

Sequential: the activations that calibrate block i come from the embedding and blocks < i
already quantized, so each block corrects the error of those before it. Within a block the
linears are quantized in forward order (wqkv, wo, w13, w2), each calibrated on a forward
pass through the block with its predecessors already quantized ("true sequential").
The output layer is calibrated on the final norm of the last block's quantized outputs.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn

from runner.config.errors import ConfigError, problem
from runner.config.schema import QuantSection
from runner.model.llama import KVCache, ropes
import runner.quant.gptq as gptq
from runner.quant.linear import Int4Linear
from runner.quant.plan import Scheme, block_linears, module, replace

CHUNK = 8  # calibration samples per forward pass


def calibration_tokens(ids: list[int], section: QuantSection, source: str, key: str = "quant") -> torch.Tensor:
    """calibration.samples consecutive windows of seq_len tokens: LongTensor [samples, seq_len]."""
    cal = section.calibration
    need = cal.samples * cal.seq_len
    if len(ids) < need:
        raise ConfigError([problem(source, f"{key}.calibration.samples",
                                   f"{cal.samples} samples of {cal.seq_len} tokens need {need} tokens but "
                                   f"{cal.path} holds {len(ids)}; lower samples or seq_len, or use a longer text",
                                   cal.samples)])
    return torch.tensor(ids[:need], dtype=torch.long).view(cal.samples, cal.seq_len)


def run_gptq(model: nn.Module, plan: dict[str, Scheme], section: QuantSection, tokens: torch.Tensor,
             progress: Callable[[int, int], None] | None = None, source: str = "recipe", key: str = "quant") -> None:
    """Replace every planned layer of `model` in place: int4 ones by GPTQ, the others by rounding.

    tokens: LongTensor [samples, seq_len] (calibration_tokens).
    """
    seq_len = tokens.shape[1]
    if seq_len > model.spec.max_seq_len:
        raise ConfigError([problem(source, f"{key}.calibration.seq_len",
                                   f"exceeds the model's max_seq_len ({model.spec.max_seq_len})", seq_len)])
    done, total = 0, len(plan)

    def step(name: str, new: nn.Module) -> None:
        nonlocal done
        replace(model, name, new)
        done += 1
        if progress is not None:
            progress(done, total)

    def quantize_layer(name: str, run: Callable[[], None]) -> None:
        scheme = plan[name]
        layer = module(model, name)
        if scheme.kind != "int4" or getattr(layer, "n_experts", None):
            # Experts are rounded to nearest: each would need a Hessian of the tokens routed to it.
            step(name, scheme.quantize(layer))
            return
        h = _hessian(layer, run)
        try:
            q, scales, zeros = gptq.quantize(layer.weight.detach(), h, scheme.groupsize, section.damping, section.block_size)
        except gptq.NotPositiveDefinite as e:
            raise ConfigError([problem(source, f"{key}.damping", f"{e} for {name}; raise it", section.damping)]) from None
        step(name, Int4Linear.from_levels(q, scales, zeros))

    device = model.norm.weight.device
    tokens = tokens.to(device)
    if "tok_embeddings" in plan:
        step("tok_embeddings", plan["tok_embeddings"].quantize(model.tok_embeddings))
    with torch.no_grad():
        x = torch.cat([model.embed(t) for t in tokens.split(CHUNK)])  # [S, T, dim]
        pos = torch.arange(seq_len, device=device)
        for i, (block, (cos_sin, mask)) in enumerate(zip(model.layers, _layer_inputs(model, pos))):
            rope = cos_sin, mask, pos
            for name in block_linears(block):
                if f"layers.{i}.{name}" in plan:
                    quantize_layer(f"layers.{i}.{name}", lambda: _forward(block, x, rope))
            x = _forward(block, x, rope)
        if "output" in plan:
            quantize_layer("output", lambda: [model.output(model.norm(c)) for c in x.split(CHUNK)])


def _hessian(layer: nn.Linear, run: Callable[[], None]) -> torch.Tensor:
    """H = 2 X^T X / n over the inputs `layer` sees while `run` runs."""
    state = {"h": torch.zeros(layer.in_features, layer.in_features, dtype=torch.float64, device=layer.weight.device),
             "n": 0}

    def hook(_module, inputs, _output):
        state["h"], state["n"] = gptq.hessian_add(state["h"], state["n"], inputs[0])

    handle = layer.register_forward_hook(hook)
    try:
        run()
    finally:
        handle.remove()
    return state["h"]


def _layer_inputs(model: nn.Module, pos: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's cos_sin [T, 2, D] and causal mask [T, T] for windows at positions `pos` [T]."""
    rope_pair = ropes(model.spec)
    for rope in rope_pair:
        if rope is not None:
            rope.setup(len(pos), pos.device)
    return model.layer_inputs(pos, len(pos), ropes=rope_pair)


def _forward(block: nn.Module, x: torch.Tensor, rope) -> torch.Tensor:
    """block(x) for x [S, T, dim], CHUNK samples at a time."""
    cos_sin, mask, pos = rope
    out = []
    for chunk in x.split(CHUNK):
        with _scratch_cache(block.attention, chunk):
            out.append(block(chunk, cos_sin, mask, pos))
    return torch.cat(out)


@contextmanager
def _scratch_cache(attention: nn.Module, x: torch.Tensor):
    """A KV cache sized for x [B, T, dim], in place of the model's own for the duration."""
    kept = attention.kv_cache
    attention.kv_cache = KVCache(x.shape[0], attention.n_kv_heads, x.shape[1], attention.head_dim, x.dtype, x.device)
    try:
        yield
    finally:
        attention.kv_cache = kept
