"""Checkpoint loaders: one per on-disk format, chosen by what the path holds."""
from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

import torch

from runner.config.errors import ConfigError, problem
from runner.config.schema import ModelSpec
from runner.loaders import gguf, hf, meta, native
from runner.model.llama import Transformer

# name -> module with matches(path) -> bool and load(path, spec) -> native state dict, and optionally
# read_spec(path) -> the ModelSpec fields the checkpoint declares. The first match wins: specific formats first.
LOADERS = {
    "hf": hf,  # a directory with config.json
    "meta": meta,  # a directory with params.json
    "gguf": gguf,  # a .gguf file, or any file starting with GGUF's magic
    "native": native,
}


def detect(path: Path) -> str:
    for name, loader in LOADERS.items():
        if loader.matches(path):
            return name
    raise ConfigError([problem(str(path), "model.checkpoint", f"no loader recognises it; formats: {', '.join(LOADERS)}")])


def read_spec(path: Path) -> dict | None:
    """The ModelSpec fields the checkpoint at `path` declares itself; None when its format declares none."""
    reader = getattr(LOADERS[detect(path)], "read_spec", None)
    return None if reader is None else reader(path)


def stored_quant(path: Path) -> dict | None:
    """How the checkpoint at `path` is quantized (runner.quant.metadata), None when it holds float weights."""
    reader = getattr(LOADERS[detect(path)], "read_quant", None)
    return None if reader is None else reader(path)


# Shapes a meta Transformer into what a checkpoint holds (say, quantized layers); identity for float ones.
Skeleton = Callable[[Transformer], Transformer]


def load_state_dict(path: Path, spec: ModelSpec, skeleton: Skeleton | None = None,
                    progress: Callable[[int, int], None] | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint at `path` in the native layout, its shapes checked against `spec` (as `skeleton`
    shapes it); a loader that converts layer by layer reports to progress(done, total)."""
    loader = LOADERS[detect(path)]
    takes = progress is not None and "progress" in inspect.signature(loader.load).parameters
    state = loader.load(path, spec, progress=progress) if takes else loader.load(path, spec)
    check_shapes(path, _skeleton(spec, skeleton).state_dict(), state)
    return state


def load_model(path: Path, spec: ModelSpec, device: torch.device, dtype: torch.dtype,
               skeleton: Skeleton | None = None, shard: Callable | None = None) -> Transformer:
    """Build the model for `spec` (shaped by `skeleton`) and fill it from the checkpoint at `path`.

    `shard(model)` (tensor parallelism) runs while the weights are still the checkpoint's
    (memory-mapped) tensors, before any copy or cast.
    """
    state = load_state_dict(path, spec, skeleton)
    model = _skeleton(spec, skeleton)
    model.load_state_dict(state, assign=True)
    del state
    model.cos_sin = torch.empty(0)  # built for real by setup_cache
    if shard is not None:
        model = shard(model)
    return model.to(device=device, dtype=dtype).eval()


def _skeleton(spec: ModelSpec, skeleton: Skeleton | None) -> Transformer:
    with torch.device("meta"):
        model = Transformer(spec)
        return model if skeleton is None else skeleton(model)


def check_shapes(path: Path, expected: dict, found: dict) -> None:
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    problems = []
    if missing:
        problems.append(problem(str(path), "model.checkpoint", f"lacks {len(missing)} tensor(s) the spec needs, first {missing[0]!r}"))
    if extra:
        problems.append(problem(str(path), "model.checkpoint", f"has {len(extra)} tensor(s) the spec does not, first {extra[0]!r}"))
    for name, tensor in expected.items():
        if name in found and tuple(found[name].shape) != tuple(tensor.shape):
            problems.append(problem(str(path), "model.checkpoint",
                                    f"tensor {name!r} has shape {tuple(found[name].shape)} but the spec (model.arch) "
                                    f"needs {tuple(tensor.shape)}"))
            break
    if problems:
        raise ConfigError(problems)
