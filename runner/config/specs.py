"""Model specs (specs/*.yaml): which spec a recipe's model section names, and loading one, alone
or as the layer under the section's `arch`.

Knowing which spec a checkpoint declares (a GGUF's metadata, an HF config.json) is the loaders'
job: the caller hands it in as `declared_spec`, so this package never imports them.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from runner.config.errors import ConfigError, problem
from runner.config.layers import Layer, Origins, load_yaml, nest, path_trouble, relative_to
from runner.config.schema import ModelSpec
from runner.config.validate import merge_typed, shape_problems

SPECS_DIR = Path(os.environ.get("RUNNER_SPECS", Path(__file__).resolve().parents[2] / "specs"))
# A checkpoint's path -> the ModelSpec fields it declares (values may be dataclasses); None, or a
# ConfigError, when its format declares none.
DeclaredSpec = Callable[[Path], dict | None]


def known_specs() -> list[str]:
    """The names of the shipped specs (specs/*.yaml)."""
    return sorted(p.stem for p in SPECS_DIR.glob("*.yaml"))


def spec_path(name: str) -> Path | None:
    """The spec file `name` stands for: a YAML file's path, or a name in specs/ (any case); None if neither."""
    if name.endswith((".yaml", ".yml")):
        return Path(name) if path_trouble(Path(name)) is None else None
    by_name = {p.stem.lower(): p for p in SPECS_DIR.glob("*.yaml")}
    return by_name.get(name.lower())


def load_spec(name_or_path: str) -> ModelSpec:
    """A spec file on its own (for `runner init`), validated as a recipe's model.arch would be."""
    path = spec_path(name_or_path)
    if path is None:
        raise ConfigError([problem(name_or_path, "spec", f"unknown spec; known: {', '.join(known_specs())}", name_or_path)])
    data = OmegaConf.to_container(load_yaml(path))
    source, prefix = str(path), "model.arch."  # reported as the recipe key the spec fills
    cfg, problems = merge_typed(ModelSpec, data, lambda key: source, prefix)
    problems = shape_problems(ModelSpec, data, lambda key: source, prefix) + problems
    if cfg is not None:
        problems += [problem(source, prefix + k, "is required but has no value") for k in sorted(OmegaConf.missing_keys(cfg))]
    if problems:
        raise ConfigError(problems)
    spec: ModelSpec = OmegaConf.to_object(cfg)
    problems = [problem(source, prefix + key, why, value) for key, value, why in spec.problems()]
    if problems:
        raise ConfigError(problems)
    return spec


def spec_layer(merged: DictConfig, origin: Origins, section: str = "model",
               declared_spec: DeclaredSpec | None = None) -> Layer | None:
    """The spec as the layer under SECTION.arch (SECTION is model or draft.model).

    The spec is named by SECTION.spec; else the checkpoint's folder names one in specs/; else the
    checkpoint declares its own (asked of declared_spec).
    """
    parent, _, leaf = section.rpartition(".")
    holder = OmegaConf.select(merged, parent) if parent else merged
    if not isinstance(holder, DictConfig) or OmegaConf.is_interpolation(holder, leaf):
        return None  # absent, or a copy of another section (e.g. draft.model: ${model}) that has its own
    model = holder.get(leaf)
    if not isinstance(model, DictConfig):
        return None
    key = f"{section}.spec"
    name = model.get("spec")
    if name is None:
        checkpoint = model.get("checkpoint")
        trouble = path_trouble(Path(str(checkpoint))) if checkpoint else None
        if trouble and trouble.startswith("cannot"):
            where = f"{section}.checkpoint"
            raise ConfigError([problem(origin(where), where, trouble, str(checkpoint))])
        folder = Path(str(checkpoint)).parent.name if checkpoint else ""
        path = spec_path(folder) if folder else None
        if path is None and checkpoint and path_trouble(Path(str(checkpoint)), want_file=False) is None:
            declared = _declared(Path(str(checkpoint)), declared_spec)
            if declared is not None:
                return str(checkpoint), nest(section, {"arch": declared})
        if path is None and "arch" not in model:
            raise ConfigError([problem(origin(key), key,
                                       f"is not set, the checkpoint declares no spec, and its folder {folder!r} names none; "
                                       f"set it to one of: {', '.join(known_specs())}")])
    else:
        name = str(name)
        if name.endswith((".yaml", ".yml")) and not Path(name).expanduser().is_absolute():
            name = str(relative_to(origin(key)) / name)
        path = spec_path(name)
        if path is None:
            raise ConfigError([problem(origin(key), key, f"unknown spec; known: {', '.join(known_specs())}", name)])
    if path is None:
        return None
    spec = load_yaml(path)
    problems = shape_problems(ModelSpec, OmegaConf.to_container(spec), lambda _: str(path), f"{section}.arch.")
    if problems:
        raise ConfigError(problems)
    return str(path), nest(section, {"arch": spec})


def _declared(checkpoint: Path, declared_spec: DeclaredSpec | None) -> dict | None:
    """The spec fields the checkpoint declares, as plain data; None when it declares none."""
    if declared_spec is None:
        return None
    try:
        fields = declared_spec(checkpoint)
    except ConfigError:
        return None  # not a format that declares one; the caller asks for model.spec
    if fields is None:
        return None
    return {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in fields.items()}
