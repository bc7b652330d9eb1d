"""Where a checkpoint comes from when it is not on disk yet (`model.source`).

Schemes: `random:SEED` writes random weights for the recipe's spec (tests, demos; no download).
"""
from __future__ import annotations

from pathlib import Path

from runner import checkpoint
from runner.config.errors import ConfigError, problem
from runner.config.schema import ModelSection

SCHEMES = ("random",)


def prepare(model: ModelSection, recipe_file: str) -> Path:
    """The checkpoint path, fetching or creating it first when it is missing and a source says how."""
    path = Path(model.checkpoint)
    if path.exists():
        return path
    if model.source is None:
        raise ConfigError([problem(recipe_file, "model.checkpoint", "file not found (and no model.source says where to get it)", str(path))])
    scheme, _, rest = model.source.partition(":")
    if scheme == "random":
        try:
            seed = int(rest or 0)
        except ValueError:
            raise ConfigError([problem(recipe_file, "model.source", "random:SEED needs an integer seed", model.source)]) from None
        checkpoint.save(path, model.arch, checkpoint.random_state_dict(model.arch, seed))
        return path
    raise ConfigError([problem(recipe_file, "model.source", f"unknown scheme {scheme!r}; known: {', '.join(SCHEMES)}", model.source)])
