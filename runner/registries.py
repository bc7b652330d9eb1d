"""What each stage offers, read from its registry: `runner list` prints it."""
from __future__ import annotations

from pathlib import Path


def stages() -> dict[str, list[str]]:
    """Stage name -> the choices a recipe has there."""
    from runner import decoders, kernels, loaders, sources, tokenizers
    from runner.config.resolve import known_specs
    from runner.config.schema import CompileMode, DType, Kernels, QuantMode

    try:
        here = kernels.choose_target()
    except kernels.KernelsUnavailable:  # RUNNER_KERNELS_TARGET names one this CPU lacks
        here = None
    return {
        "specs": known_specs(),
        "loaders": list(loaders.LOADERS),
        "sources": list(sources.SCHEMES),
        "tokenizers": [k.value for k in tokenizers.TOKENIZERS],
        "quant modes": [m.value for m in QuantMode],
        "dtypes": [d.value for d in DType],
        "draft kinds (decoders)": [f"{k.value} ({d.__name__})" for k, d in decoders.DECODERS.items()],
        "kernels": [k.value for k in Kernels],
        "kernel targets": [t.name + (" (this CPU's)" if t is here else "") for t in kernels.TARGETS],
        "compile modes": [m.value for m in CompileMode],
    }


def recipe_lines(folder: Path) -> list[str]:
    """The recipes in `folder`, a line each with what the recipe is for."""
    from runner.recipes import recipes_in

    found = recipes_in(folder)
    if not found:
        return [f"No recipes in ./{folder} (run from the project's folder, or name a recipe file)."]
    width = max(len(str(path)) for path, _ in found)
    return [f"Recipes in ./{folder} (runner RECIPE [key=value ...]):",
            *(f"  {str(path):<{width}}  {description}" for path, description in found)]
