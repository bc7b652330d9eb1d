"""Recipe files for running: resolved with the spec their checkpoint declares and the prompt their
generate.prompt_file names, and listed for the command line."""
from __future__ import annotations

import dataclasses
import itertools
import os
import sys
import typing
from pathlib import Path

from runner.config.errors import ConfigError, first_line, problem
from runner.config.resolve import resolve_with_origins
from runner.config.schema import Recipe
from runner.config.validate import Origin


def load(recipe_path: str | os.PathLike, overrides: typing.Sequence[str] = (), check_files: bool = False) -> Recipe:
    """The recipe at `recipe_path` with `key=value` overrides, resolved and validated (see
    runner.config.resolve.resolve), its generate.prompt_file read into generate.prompt."""
    recipe, origin = resolve_with_origins(recipe_path, overrides, check_files, declared_spec=_declared_spec)
    return read_prompt_file(recipe, origin)


def _declared_spec(checkpoint: Path) -> dict | None:
    # Imported here: the loaders bring torch, and most recipes name their spec.
    from runner.loaders import read_spec

    return read_spec(checkpoint)


def read_prompt_file(recipe: Recipe, origin: Origin) -> Recipe:
    """The recipe with generate.prompt_file's text (standard input for "-") as generate.prompt;
    unchanged without a prompt_file. origin(key) names the file that set a key, for the error."""
    key, path = "generate.prompt_file", recipe.generate.prompt_file
    if path is None:
        return recipe
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)
        raise ConfigError([problem(origin(key), key, f"cannot read it: {why}", path)]) from None
    return dataclasses.replace(recipe, generate=dataclasses.replace(recipe.generate, prompt=text))


def recipes_in(folder: Path) -> list[tuple[Path, str]]:
    """The recipes in `folder`, each with its one-line description: the first sentence of the
    comment at its top ("" without one)."""
    out = []
    for path in sorted(folder.glob("*.yaml")) if folder.is_dir() else ():
        try:
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            continue
        comment = " ".join(line.lstrip("#").strip() for line in itertools.takewhile(lambda l: l.startswith("#"), lines))
        sentence = comment.split(". ", 1)[0].rstrip(".")
        out.append((path, sentence if len(sentence) <= 110 else sentence[:109] + "…"))
    return out
