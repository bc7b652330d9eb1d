"""What every checkpoint loader implements: one module per on-disk format, listed in runner.loaders.LOADERS."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch

from runner.config.schema import ModelSpec

# progress(done, total): how far a long step has got, in the step's own units (layers, bytes).
Progress = Callable[[int, int], None]


class Loader(Protocol):
    """A checkpoint format. Each format implements every function, returning None where it
    declares nothing, so callers never ask a loader what it supports."""

    def matches(self, path: Path) -> bool:
        """Whether `path` holds this format."""

    def load(self, path: Path, spec: ModelSpec, progress: Progress | None = None) -> dict[str, torch.Tensor]:
        """The checkpoint in the native layout, memory-mapped where the format allows; a format
        converted layer by layer reports progress(layers done, layers)."""

    def read_spec(self, path: Path) -> dict | None:
        """The ModelSpec fields the checkpoint declares; None when the format declares none."""

    def read_quant(self, path: Path) -> dict | None:
        """How the weights were quantized by runner (runner.quant.metadata); None for float weights."""
