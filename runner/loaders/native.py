"""The native format: a runner checkpoint (or a bare state dict) in the native layout."""
from __future__ import annotations

from pathlib import Path

import torch

from runner import checkpoint
from runner.config.schema import ModelSpec, RopeScaling
from runner.loaders.base import Progress


def matches(path: Path) -> bool:
    return path.is_file() and path.suffix in (".pth", ".pt", ".bin")


def load(path: Path, spec: ModelSpec, progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """The state dict, memory-mapped; nothing to convert, so progress is not called."""
    return checkpoint.read(path)["state_dict"]


def read_spec(path: Path) -> dict | None:
    """The spec a runner checkpoint carries; None for a bare state dict."""
    spec = checkpoint.read(path)["spec"]
    if spec is not None and spec.get("rope_scaling") is not None:
        spec = {**spec, "rope_scaling": RopeScaling(**spec["rope_scaling"])}
    return spec


def read_quant(path: Path) -> dict | None:
    """How a runner checkpoint's weights were quantized (runner.quant.metadata); None for float ones."""
    return checkpoint.read(path).get("quant")
