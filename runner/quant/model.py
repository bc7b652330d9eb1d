"""Quantizing a whole Transformer, or shaping one to load a quantized checkpoint into."""
from __future__ import annotations

import dataclasses
from enum import Enum
from typing import Callable

import torch
from torch import nn

from runner.config.schema import QuantActivations, QuantEmbedding, QuantMode, QuantOutput, QuantSection
import runner.quant.calibrate as calibrate
from runner.quant.gguf_layers import GGUFEmbedding, GGUFLinear
from runner.quant.linear import Int4Linear, Int8Embedding, Int8Linear, QuantizedExperts, QuantizedLinear
from runner.quant.plan import check_groupsize, make_plan, module, replace, untie

Progress = Callable[[int, int], None]


def needs_calibration(section: QuantSection) -> bool:
    """Whether quantize() needs calibration tokens (calibrate.calibration_tokens) for this section."""
    return section.mode is QuantMode.int4_gptq


def quantize(model: nn.Module, section: QuantSection, calibration: torch.Tensor | None = None,
             progress: Progress | None = None, source: str = "recipe", key: str = "quant") -> nn.Module:
    """Replace the model's layers in place as `section` says; returns the model.

    calibration: LongTensor [samples, seq_len] of token ids, for int4-gptq only.
    progress(done, total) is called after each layer. Errors name `source` (the recipe file)
    and the section's dotted `key` ("quant", or "draft.quant" for a draft model).
    The new layers run their fallback kernel until pack_for(model, device).
    """
    if is_quantized(model):
        raise ValueError("the model is already quantized; load a quantized checkpoint into quantized_skeleton instead")
    plan = make_plan(model, section)
    check_groupsize(model, plan, section.groupsize, source, key)
    untie(model, plan)
    if needs_calibration(section):
        if calibration is None:
            raise ValueError("int4-gptq needs calibration tokens (see calibrate.calibration_tokens)")
        calibrate.run_gptq(model, plan, section, calibration, progress, source, key)
    else:
        with torch.no_grad():
            for done, (name, scheme) in enumerate(plan.items(), 1):
                replace(model, name, scheme.quantize(module(model, name)))
                if progress is not None:
                    progress(done, len(plan))
    model.operands_changed()
    return model


def quantized_skeleton(model: nn.Module, section: QuantSection, source: str = "recipe", key: str = "quant") -> nn.Module:
    """Swap in empty (meta) quantized layers as `section` says, computing nothing.

    Load a quantized state dict into the result with load_state_dict(sd, assign=True).
    """
    plan = make_plan(model, section)
    check_groupsize(model, plan, section.groupsize, source, key)
    untie(model, plan)
    for name, scheme in plan.items():
        replace(model, name, scheme.empty(module(model, name)))
    model.operands_changed()
    return model


def pack_for(model: nn.Module, device: torch.device | str, kernel: str | None = None) -> dict[str, str]:
    """Lay every quantized layer out for its fastest kernel on `device` (or the one named).

    Returns {layer name: kernel name}, for the reporter to show which layers fell back.
    """
    chosen = {name: layer.pack_for(device, kernel) for name, layer in model.named_modules()
              if isinstance(layer, (QuantizedLinear, QuantizedExperts, GGUFLinear))}
    model.operands_changed()
    return chosen


def use_activations(model: nn.Module, section: QuantSection) -> None:
    """Make the int4 layers, an int8 output layer beside them, and GGUF layers quantize their
    activations as section.activations says (a choice of kernel, not of stored layout: a quantized
    checkpoint serves either)."""
    int8_x = section.activations is QuantActivations.int8
    for layer in model.modules():
        if isinstance(layer, (Int4Linear, Int8Linear, GGUFLinear)):
            layer.int8_x = int8_x
    model.operands_changed()


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and persistent buffers (what a checkpoint holds), shared ones once."""
    return sum(t.numel() * t.element_size() for t in unique_tensors(model).values())


def unique_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state by name, a tensor that several names hold (a tied layer's) under its first."""
    seen, out = set(), {}
    for name, t in model.state_dict(keep_vars=True).items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.dtype) if not t.is_meta else id(t)
        if key not in seen:
            seen.add(key)
            out[name] = t
    return out


LAYOUT_VERSION = 1  # of the neutral tensors (int8.py, int4.py); bump when they change


def metadata(section: QuantSection) -> dict:
    """The section as plain data (str/int/float/None), for a checkpoint to record how it was quantized."""
    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value.value if isinstance(value, Enum) else value
    return {"layout": LAYOUT_VERSION, **plain(dataclasses.asdict(section))}


def from_metadata(data: dict) -> QuantSection:
    """The section a checkpoint's metadata(...) recorded (the keys that shape the layers)."""
    if data.get("layout") != LAYOUT_VERSION:
        raise ValueError(f"quantized layout version {data.get('layout')!r}; this runner reads {LAYOUT_VERSION}")
    return QuantSection(mode=QuantMode(data["mode"]), groupsize=data["groupsize"],
                        output=QuantOutput(data["output"]), embedding=QuantEmbedding(data["embedding"]))


def is_quantized(model: nn.Module) -> bool:
    """Whether any layer is already quantized (a quantized checkpoint was loaded)."""
    return any(isinstance(m, (QuantizedLinear, QuantizedExperts, Int8Embedding, GGUFLinear, GGUFEmbedding))
               for m in model.modules())


def transform(model: nn.Module, section: QuantSection, *, calibration: torch.Tensor | None = None,
              progress: Progress | None = None, source: str = "recipe", key: str = "quant") -> nn.Module:
    """The weight transform of every mode but none (runner.transforms.quantize): quantize, then
    pack for the model's device."""
    quantize(model, section, calibration, progress, source, key)
    pack_for(model, model.norm.weight.device)
    use_activations(model, section)
    return model
