"""Weight transforms applied after loading, in order (dtype, then quantization)."""
from __future__ import annotations

import torch

from runner import quant
from runner.config.errors import ConfigError, problem
from runner.config.schema import QuantMode, QuantSection, Recipe

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# quant.mode -> function(model, section: QuantSection, *, calibration=None, progress=None,
#                        source="recipe", key="quant") -> model, quantized and packed for its device.
# calibration: LongTensor [samples, seq_len] of token ids, needed where quant.needs_calibration(section);
# key: the section's dotted name in errors ("draft.quant" for a draft model).
QUANT_MODES = {
    QuantMode.none: lambda model, section, **_: model,
    QuantMode.int8: quant.transform,
    QuantMode.int4: quant.transform,
    QuantMode.int4_gptq: quant.transform,
}


def torch_dtype(recipe: Recipe) -> torch.dtype:
    return DTYPES[recipe.dtype.value]


def apply(model: torch.nn.Module, section: QuantSection, recipe_file: str, key: str = "quant",
          calibration: torch.Tensor | None = None, progress=None) -> torch.nn.Module:
    """Quantize `model` as `section` (the recipe's quant, or draft.quant) says."""
    if section.mode not in QUANT_MODES:
        modes = ", ".join(m.value for m in QUANT_MODES)
        raise ConfigError([problem(recipe_file, f"{key}.mode", f"not available; modes: {modes}", section.mode.value)])
    return QUANT_MODES[section.mode](model, section, calibration=calibration, progress=progress,
                                     source=recipe_file, key=key)
