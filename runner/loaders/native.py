"""The native format: a runner checkpoint (or a bare state dict) in the native layout."""
from __future__ import annotations

from pathlib import Path

import torch

from runner import checkpoint
from runner.config.schema import ModelSpec


def matches(path: Path) -> bool:
    return path.is_file() and path.suffix in (".pth", ".pt", ".bin")


def load(path: Path, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """The state dict, memory-mapped."""
    return checkpoint.read(path)["state_dict"]
