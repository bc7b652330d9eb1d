"""Recipe resolution: YAML layers (base chain, spec, command line) -> a typed Recipe.

Every problem is gathered into one ConfigError that names the file that set the
offending value, its dotted key, the value and what would be valid.
"""
from __future__ import annotations

import os
import typing
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from runner.config.errors import ConfigError, Problem, problem
from runner.config.layers import Origins, absolutize_paths, merged, override_layer, path_trouble, recipe_layers
from runner.config.schema import Recipe
from runner.config.specs import DeclaredSpec, known_specs, load_spec, spec_layer
from runner.config.validate import defaults, merge_typed, shape_problems

__all__ = ["resolve", "resolve_with_origins", "resolve_data", "to_yaml", "known_specs", "load_spec"]


def resolve(recipe_path: str | os.PathLike, overrides: typing.Sequence[str] = (), check_files: bool = False,
            declared_spec: DeclaredSpec | None = None) -> Recipe:
    """Resolve a recipe file plus `key=value` overrides into a validated Recipe.

    With check_files, the files the recipe names must exist (the checkpoint may instead
    have a model.source to fetch it from). declared_spec(checkpoint) reads the spec fields a
    checkpoint declares, for a model section that names no spec; None: checkpoints declare none.
    generate.prompt_file is left unread (runner.recipes.read_prompt_file reads it).
    """
    return resolve_with_origins(recipe_path, overrides, check_files, declared_spec)[0]


def resolve_with_origins(recipe_path: str | os.PathLike, overrides: typing.Sequence[str] = (), check_files: bool = False,
                         declared_spec: DeclaredSpec | None = None) -> tuple[Recipe, Origins]:
    """resolve(), and which file or command line set each dotted key (for the steps after it)."""
    layers = recipe_layers(Path(recipe_path), Recipe) + [override_layer(overrides, str(recipe_path), Recipe)]
    recipe_only = merged(layers)
    for section in ("model", "draft.model"):
        try:
            layer = spec_layer(recipe_only, Origins(layers), section, declared_spec)
        except OmegaConfBaseException as e:  # an interpolation under the section that cannot resolve
            key = e.full_key or section
            raise ConfigError([problem(Origins(layers)(key), key, f"cannot resolve: {str(e.msg).splitlines()[0]}")]) from None
        if layer is not None:
            layers.insert(0, layer)
    # Schema defaults at the bottom, so that `${generate.top_k}` reads a default nobody set.
    cfg = merged([("defaults", defaults(Recipe))] + layers)

    origin = Origins(layers)
    try:
        data = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        message = str(e.msg).splitlines()[0]
        raise ConfigError([problem(origin(e.full_key or ""), e.full_key or "", f"cannot resolve: {message}")]) from None
    absolutize_paths(data, origin)
    _prompt_or_prompt_file(data, origin)

    recipe, problems = _typed(data, origin)
    if check_files:
        problems += _file_problems(recipe, origin)
    if problems:
        raise ConfigError(problems)
    return recipe, origin


def _typed(data: dict, origin: Origins) -> tuple[Recipe, list[Problem]]:
    """The Recipe `data` holds, and every problem with it; raises when no Recipe can be built."""
    problems = shape_problems(Recipe, data, origin)
    cfg, type_problems = merge_typed(Recipe, data, origin)
    problems += type_problems
    try:
        missing = sorted(OmegaConf.missing_keys(cfg)) if cfg is not None else []
        reported = {p.key for p in problems}
        problems += [problem(origin(k), k, "is required but has no value") for k in missing if k not in reported]
        if cfg is None or missing:
            raise ConfigError(problems)
        recipe: Recipe = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:  # a value that only fails when read (text where a number belongs)
        key = e.full_key or ""
        raise ConfigError(problems + [problem(origin(key), key, str(e.msg).splitlines()[0])]) from None
    return recipe, problems + [problem(origin(key), key, why, value) for key, value, why in recipe.problems()]


def _prompt_or_prompt_file(data: dict, origin: Origins) -> None:
    """Of generate.prompt and generate.prompt_file the later layer's wins (a command-line prompt_file
    over a recipe's prompt): the loser's prompt_file is dropped. One layer naming both is an error."""
    generate = data.get("generate")
    if not isinstance(generate, dict) or generate.get("prompt_file") is None:
        return
    key = "generate.prompt_file"
    prompt_layer, file_layer = origin.layer_of("generate.prompt"), origin.layer_of(key)
    if prompt_layer == file_layer:
        raise ConfigError([problem(origin(key), key, "and generate.prompt are both set here; keep one", generate["prompt_file"])])
    if prompt_layer > file_layer:
        generate["prompt_file"] = None


def _file_problems(recipe: Recipe, origin: Origins) -> list[Problem]:
    """The tokenizer and checkpoint files that are not there (a model.source may fetch the checkpoint)."""
    problems = []
    path = recipe.tokenizer.path
    if path is None and recipe.model.source is None:
        problems.append(problem(origin("tokenizer.path"), "tokenizer.path", "is required unless model.source provides the tokenizer"))
    elif path is not None and path_trouble(Path(path), want_file=False) is not None:
        problems.append(problem(origin("tokenizer.path"), "tokenizer.path", path_trouble(Path(path), False), path))
    checkpoint = Path(recipe.model.checkpoint)
    trouble = path_trouble(checkpoint, want_file=False)
    if trouble is not None and (recipe.model.source is None or trouble.startswith("cannot")):
        why = trouble if trouble.startswith("cannot") else "not found, and no model.source says where to get it"
        problems.append(problem(origin("model.checkpoint"), "model.checkpoint", why, recipe.model.checkpoint))
    return problems


def to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML, as `runner show` prints it."""
    return OmegaConf.to_yaml(OmegaConf.structured(recipe))


def resolve_data(data: dict, source: str) -> Recipe:
    """Validate an in-memory recipe (all of it attributed to `source`)."""
    cfg, problems = merge_typed(Recipe, data, lambda key: source)
    problems = shape_problems(Recipe, data, lambda key: source) + problems
    if cfg is not None:
        problems += [problem(source, k, "is required but has no value") for k in sorted(OmegaConf.missing_keys(cfg))]
    if problems:
        raise ConfigError(problems)
    recipe = OmegaConf.to_object(cfg)
    problems = [problem(source, key, why, value) for key, value, why in recipe.problems()]
    if problems:
        raise ConfigError(problems)
    return recipe
