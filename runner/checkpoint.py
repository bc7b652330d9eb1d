"""The native checkpoint: a plain dict of tensors and metadata, written atomically.

File contents (readable by torch.load(weights_only=True)):
  {"format": "runner", "version": 1, "spec": {ModelSpec fields},
   "quant": None or runner.quant.metadata(section), "state_dict": {name: tensor}}
A quantized checkpoint holds the device-neutral layout of runner.quant; it is packed for the
device's kernels when loaded.
"""
from __future__ import annotations

import dataclasses
import os
import pickle
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch

from runner.config.errors import ConfigError, problem
from runner.config.schema import ModelSpec
from runner.model.llama import Transformer

FORMAT, VERSION = "runner", 1


@contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside `path`; it becomes `path` only if the block completes.

    An exception or Ctrl-C leaves no partial file at `path` (nor beside it).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make shared caches unreadable
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save(path: Path, spec: ModelSpec, state_dict: dict[str, torch.Tensor], quant: dict | None = None) -> None:
    """Write a native checkpoint atomically; `quant` records how its weights were quantized."""
    payload = {"format": FORMAT, "version": VERSION, "spec": dataclasses.asdict(spec), "quant": quant,
               "state_dict": {k: v.contiguous() for k, v in state_dict.items()}}
    with atomic_path(Path(path)) as tmp:
        torch.save(payload, tmp)


def read(path: Path, key: str = "model.checkpoint") -> dict:
    """Load a native checkpoint's payload lazily (mmap); refuse anything but plain data."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        reason = str(e).split("\n")[0]
        raise ConfigError([problem(str(path), key, f"refused: not a plain tensor checkpoint ({reason})")]) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise ConfigError([problem(str(path), key, f"unreadable checkpoint, truncated or corrupt ({str(e).splitlines()[0]})")]) from None
    if not isinstance(payload, dict):
        raise ConfigError([problem(str(path), key, f"holds a {type(payload).__name__}, not a checkpoint dict")])
    if payload.get("format") != FORMAT:
        # A bare state dict, as torch.save(model.state_dict()) writes it.
        payload = {"format": FORMAT, "version": VERSION, "spec": None, "quant": None, "state_dict": payload}
    return payload


def random_state_dict(spec: ModelSpec, seed: int) -> dict[str, torch.Tensor]:
    """Random weights for `spec`: N(0, 0.02) matrices and unit norms, as used for tests and tiny demos."""
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(spec).state_dict().items()}
    return {
        name: torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=generator) * 0.02
        for name, shape in shapes.items()
    }
