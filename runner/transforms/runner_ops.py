"""The transform that switches a model's math to runner's CPU kernels (runner.kernels.KernelOps).

`kernels: auto` uses them wherever the model runs on the CPU, they build and load, and their
build has a vector path for this CPU (AVX2 or better); otherwise it says why and keeps torch's
ops. `kernels: runner` uses them whatever their target, or stops; `kernels: torch` never does.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from runner import kernels
from runner.kernels import coverage
from runner.config.errors import ConfigError, problem
from runner.config.schema import Kernels


def use_runner_ops(model: torch.nn.Module, choice: Kernels, device: torch.device, source: str,
                   note: Callable[[str], None] | None = None) -> str | None:
    """Switch `model` to runner's kernels as `choice` says; returns their instruction set, or None
    where the model keeps torch's ops."""
    say = note or (lambda text: None)
    if choice is Kernels.torch:
        return None
    if device.type != "cpu":
        if choice is Kernels.runner:
            raise ConfigError([problem(source, "kernels", f"runner's kernels run on the CPU only, not {device}; "
                                       "use auto or torch", choice.value)])
        return None
    try:
        isa = kernels.load(say)
    except kernels.KernelsUnavailable as e:
        if choice is Kernels.runner:
            raise ConfigError([problem(source, "kernels", f"runner's CPU kernels cannot be built here ({e}); "
                                       "use auto or torch to run on torch's ops", choice.value)]) from None
        say(f"kernels: runner's CPU kernels cannot be built here ({e}); running on torch's ops")
        return None
    if choice is Kernels.auto and not kernels.vectorised():
        say(f"kernels: runner's CPU kernels have no vector path for this CPU ({isa}); running on torch's ops")
        return None
    model.use_ops(kernels.KernelOps())
    fallbacks = coverage.note(model.spec)  # what of this model the kernels leave to torch's ops
    if fallbacks:
        say(fallbacks)
    _pack_quantized(model, device)
    return isa


def _pack_quantized(model: torch.nn.Module, device: torch.device) -> None:
    """Quantized layers switch to runner's integer kernels where those take them."""
    from runner.quant.gguf_layers import GGUFLinear
    from runner.quant.linear import QuantizedExperts, QuantizedLinear

    for layer in model.modules():
        if isinstance(layer, (QuantizedExperts, GGUFLinear)) or isinstance(layer, QuantizedLinear) and "runner" in layer.KERNELS:
            try:
                layer.pack_for(device, "runner")
            except ValueError:  # this layer's shape or dtype: it keeps the kernel it had
                pass
