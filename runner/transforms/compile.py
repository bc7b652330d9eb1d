"""torch.compile as a step transform: the model's forward, compiled for decode and/or prefill.

A compile failure (say, inductor cannot build on this machine) stops the run with the
compiler's error summarised, unless the recipe says `compile.fallback: eager`.
"""
from __future__ import annotations

import os
import time
import types
from typing import Callable

import torch

from runner.config.errors import ConfigError, problem
from runner.config.schema import CompileFallback, CompileMode, CompileSection

Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class CompiledForward:
    """Dispatches one-token calls to the decode step and longer ones to the prefill step.

    The first call of each compiled step compiles it; a failure then falls back or raises as the
    recipe says. compile_seconds accumulates the time those first calls took.
    """

    def __init__(self, model: torch.nn.Module, section: CompileSection, source: str,
                 note: Callable[[str], None] | None = None):
        self.model, self.section, self.source = model, section, source
        self.note = note or (lambda text: None)
        self.compile_seconds = 0.0
        mode = None if section.mode is CompileMode.default else section.mode.value
        self.decode = _Step(model, "decode", dict(mode=mode, fullgraph=section.fullgraph, dynamic=False)) if section.decode else None
        self.prefill = (_Step(model, "prefill", dict(mode=mode, fullgraph=section.fullgraph, dynamic=section.dynamic))
                        if section.prefill else None)

    def __call__(self, tokens: torch.Tensor, input_pos: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        step = self.decode if tokens.shape[1] == 1 else self.prefill
        if step is None:
            return self.model(tokens, input_pos, last_only)
        if step.compiled:
            return step.fn(tokens, input_pos, last_only)
        start = time.perf_counter()
        try:
            out = step.fn(tokens, input_pos, last_only)
        except Exception as e:  # torch raises many types here; the summary is what matters
            summary = _summary(e)
            if self.section.fallback is not CompileFallback.eager:
                raise ConfigError([problem(self.source, f"compile.{step.name}",
                                           f"torch.compile failed: {summary} (set compile.fallback: eager to run "
                                           "eagerly instead)", True)]) from None
            self.note(f"compile.{step.name}: torch.compile failed ({summary}); running eagerly (compile.fallback: eager)")
            step.fn = self.model
            out = self.model(tokens, input_pos, last_only)
        step.compiled = True
        self.compile_seconds += time.perf_counter() - start
        return out


# Buffers that change with the cache's size; every other module state is fixed once built.
RESIZED = ("kv_cache", "rope")


def _guards(entries) -> list[bool]:
    """Which of dynamo's guards to keep: all but those on the model's modules (checking each
    weight and attribute on every call would cost a fair share of a small model's decode step),
    except the shapes of the buffers a new cache size replaces."""
    keep = []
    for entry in entries:
        on_module = entry.orig_guard.source.is_unspecialized_nn_module()
        resized = entry.guard_type == "TENSOR_MATCH" and any(name in entry.name for name in RESIZED)
        keep.append(not on_module or resized)
    return keep


class _Step:
    """One compiled step, with dynamo's guards filtered by _guards: the model is fixed once the
    pipeline is built, save its cache's size."""

    def __init__(self, model, name: str, options: dict):
        self.name, self.compiled = name, False
        self.fn = torch.compile(_own_forward(model), **options, options={"guard_filter_fn": _guards})


def _own_forward(model: torch.nn.Module):
    """model.forward with a code object of its own. dynamo keeps its graphs per code object, and
    with the guards on the model filtered away, two models of one class (a target and its draft)
    would otherwise run each other's graphs."""
    fn = type(model).forward
    own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    return types.MethodType(own, model)


def compiled_forward(model: torch.nn.Module, section: CompileSection, source: str,
                     note: Callable[[str], None] | None = None) -> Forward:
    """The forward the decoders call: the model itself, or its steps compiled as `section` says."""
    if not (section.decode or section.prefill):
        return model
    if section.cache_dir is not None:
        # Inductor reads its cache location from the environment only.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = section.cache_dir
    return CompiledForward(model, section, source, note)


def _summary(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    head = next((line for line in lines if "Error" in line or "error" in line), lines[0] if lines else "")
    return f"{type(error).__name__}: {head[:300]}"
