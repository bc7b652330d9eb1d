"""Checkpoint loaders: one per on-disk format, chosen by what the path holds."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from runner.config.errors import ConfigError, problem
from runner.config.schema import ModelSpec
from runner.loaders import gguf, hf, meta, native
from runner.loaders.base import Loader, Progress
from runner.model.llama import Transformer, ropes

# name -> the module implementing Loader for that format. The first match wins: specific formats first.
LOADERS: dict[str, Loader] = {
    "hf": hf,  # a directory with config.json
    "meta": meta,  # a directory with params.json
    "gguf": gguf,  # a .gguf file, or any file starting with GGUF's magic
    "native": native,
}


def detect(path: Path) -> str:
    """The name of the loader whose format `path` holds."""
    for name, loader in LOADERS.items():
        if loader.matches(path):
            return name
    raise ConfigError([problem(str(path), "model.checkpoint", f"no loader recognises it; formats: {', '.join(LOADERS)}")])


def read_spec(path: Path) -> dict | None:
    """The ModelSpec fields the checkpoint at `path` declares itself; None when its format declares none."""
    return LOADERS[detect(path)].read_spec(path)


def stored_quant(path: Path) -> dict | None:
    """How the checkpoint at `path` is quantized (runner.quant.metadata), None when it holds float weights."""
    return LOADERS[detect(path)].read_quant(path)


# Shapes a meta Transformer into what a checkpoint holds (say, quantized layers); identity for float ones.
Skeleton = Callable[[Transformer], Transformer]


def load_state_dict(path: Path, spec: ModelSpec, skeleton: Skeleton | None = None,
                    progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint at `path` in the native layout, its shapes checked against `spec` (as `skeleton`
    shapes it); a loader that converts layer by layer reports to progress(done, total)."""
    state = LOADERS[detect(path)].load(path, spec, progress)
    check_shapes(path, _skeleton(spec, skeleton).state_dict(), state)
    return state


def read_model(path: Path, spec: ModelSpec, skeleton: Skeleton | None = None) -> Transformer:
    """The model for `spec` (shaped by `skeleton`) on the checkpoint's own tensors, memory-mapped
    where the format allows: a tensor-parallel rank shards it before copying only its share."""
    state = load_state_dict(path, spec, skeleton)
    model = _skeleton(spec, skeleton)
    model.load_state_dict(state, assign=True)
    del state
    model.rope, model.local_rope = ropes(spec)  # the skeleton's are on the meta device; setup_cache builds them
    return model


def load_model(path: Path, spec: ModelSpec, device: torch.device, dtype: torch.dtype,
               skeleton: Skeleton | None = None) -> Transformer:
    """read_model's model, in `dtype` on `device`, ready to run."""
    return read_model(path, spec, skeleton).to(device=device, dtype=dtype).eval()


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
