"""Weight transforms applied after loading, in order (dtype, then quantization)."""
from __future__ import annotations

import torch

from runner.config.errors import ConfigError, problem
from runner.config.schema import QuantMode, Recipe

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# quant.mode -> function(model, recipe) -> model
QUANT_MODES = {QuantMode.none: lambda model, recipe: model}


def torch_dtype(recipe: Recipe) -> torch.dtype:
    return DTYPES[recipe.dtype.value]


def apply(model: torch.nn.Module, recipe: Recipe, recipe_file: str) -> torch.nn.Module:
    if recipe.quant.mode not in QUANT_MODES:
        raise ConfigError([problem(recipe_file, "quant.mode", f"not available; modes: {', '.join(m.value for m in QUANT_MODES)}", recipe.quant.mode.value)])
    return QUANT_MODES[recipe.quant.mode](model, recipe)
