"""Weight transforms applied after loading, in order (dtype, then quantization)."""
from __future__ import annotations

import torch

from runner import quant
from runner.config.errors import ConfigError, problem
from runner.config.schema import QuantMode, QuantSection, Recipe

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(recipe: Recipe) -> torch.dtype:
    return DTYPES[recipe.dtype.value]


def quantize(model: torch.nn.Module, section: QuantSection, recipe_path: str, key: str = "quant",
             calibration: torch.Tensor | None = None, progress=None) -> torch.nn.Module:
    """`model` quantized as `section` (the recipe's quant, or draft.quant) says and packed for its
    device; mode none leaves it as it is.

    calibration: LongTensor [samples, seq_len] of token ids, where quant.needs_calibration(section);
    key: the section's dotted name in errors ("draft.quant" for a draft model).
    """
    if section.mode is QuantMode.none:
        return model
    if section.mode is QuantMode.gguf:
        raise ConfigError([problem(recipe_path, f"{key}.mode", "gguf runs a GGUF file's quantized blocks as "
                                   "stored; it does not quantize a float model (load the GGUF file with it)", "gguf")])
    return quant.transform(model, section, calibration=calibration, progress=progress, source=recipe_path, key=key)
