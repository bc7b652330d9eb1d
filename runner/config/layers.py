"""A recipe's layers: its YAML files (each key once per mapping), the `base:` chain they form, the
command line's key=value overrides, and which layer set each key (for error messages).

A layer is (name, config): the file's path, or the recipe's path plus COMMAND_LINE for overrides.
The schema class is passed in: each file is checked against it for lists and sections in the
wrong place before the layers merge, and it says which override values are text.
"""
from __future__ import annotations

import difflib
import os
import typing
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from runner.config.errors import ConfigError, first_line, problem
from runner.config.validate import container_problems, is_text

COMMAND_LINE = " (command line)"  # suffix of the recipe path for values set by overrides
# Keys holding file paths: a relative path is taken relative to the file that set it.
PATH_KEYS = ("model.checkpoint", "tokenizer.path", "draft.model.checkpoint", "quant.calibration.path",
             "draft.quant.calibration.path", "compile.cache_dir", "generate.prompt_file")

Layer = tuple[str, DictConfig]


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a key repeated in one mapping is an error rather than a silent overwrite."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise yaml.constructor.ConstructorError(None, None, "a key must be a plain name, not a list or mapping",
                                                        key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(path: Path, schema=None) -> DictConfig:
    """The mapping in YAML file `path`; with `schema`, its sections and lists are checked against it."""
    try:
        found = path.is_file()
    except OSError as e:  # a name the OS refuses (too long, ...)
        raise ConfigError([problem(str(path)[:200], "", f"cannot read it: {e.strerror or e}")]) from None
    if not found:
        raise ConfigError([problem(str(path), "", _not_found(path))])
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError([problem(where, "", f"malformed YAML: {what}")]) from None
    except UnicodeDecodeError:
        raise ConfigError([problem(str(path), "", "is not UTF-8 text: a recipe is a YAML file")]) from None
    except (ValueError, TypeError, RecursionError, OSError) as e:  # a tag YAML cannot apply, a self-including alias
        raise ConfigError([problem(str(path), "", f"malformed YAML: {first_line(e)}")]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([problem(str(path), "", f"must be a mapping of keys to values, not a {type(data).__name__}")])
    problems = container_problems(schema, data, str(path)) if schema is not None else []
    if problems:
        raise ConfigError(problems)
    try:
        return OmegaConf.create(data)
    except OmegaConfBaseException as e:
        raise ConfigError([problem(str(path), e.full_key or "", f"malformed value: {str(e.msg).splitlines()[0]}")]) from None
    except (RecursionError, ValueError, TypeError) as e:
        raise ConfigError([problem(str(path), "", f"malformed value: {first_line(e)}")]) from None


def _not_found(path: Path) -> str:
    """"file not found", with the closest recipe's path when the name looks mistyped."""
    folder = path.parent if path.parent.is_dir() else Path("recipes")
    names = {p.name: p for p in sorted(folder.glob("*.yaml")) if p.is_file()}
    close = difflib.get_close_matches(path.name, list(names), n=1, cutoff=0.6)
    return f"file not found; did you mean {names[close[0]]}?" if close else "file not found"


def path_trouble(path: Path, want_file: bool = True) -> str | None:
    """None when `path` is there (a file, with want_file); else what is wrong with it."""
    if "\0" in str(path):  # pathlib answers "not there" for these
        return "cannot be used as a path (it holds a NUL byte)"
    try:
        if path.is_file() or (not want_file and path.exists()):
            return None
        return "is a folder, not a file" if path.is_dir() else "file not found"
    except (OSError, ValueError) as e:  # a name the OS refuses: too long, a NUL byte
        return f"cannot be used as a path ({getattr(e, 'strerror', None) or first_line(e)})"


def recipe_layers(path: Path, schema, seen: tuple[Path, ...] = ()) -> list[Layer]:
    """The recipe and its `base:` chain, outermost base first."""
    path = path.resolve() if path.is_absolute() else Path(os.path.abspath(path))
    if path in seen:
        chain = " -> ".join(str(p) for p in seen + (path,))
        raise ConfigError([problem(str(seen[-1]), "base", f"recipes extend each other in a cycle: {chain}")])
    cfg = load_yaml(path, schema)
    try:
        base = cfg.pop("base", None)
    except OmegaConfBaseException as e:  # an interpolation in it, say ${missing}: base names a file as written
        raise ConfigError([problem(str(path), "base", f"must be the path of another recipe ({first_line(e)})")]) from None
    layers = [(str(path), cfg)]
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError([problem(str(path), "base", "must be the path of another recipe", base)])
        trouble = path_trouble(path.parent / base)
        if trouble:
            raise ConfigError([problem(str(path), "base", f"{trouble}: {os.path.normpath(path.parent / base)}"[:300], base)])
        layers = recipe_layers(path.parent / base, schema, seen + (path,)) + layers
    return layers


def override_layer(overrides: typing.Sequence[str], recipe_path: str, schema) -> Layer:
    """The command line's `key=value` overrides as one layer over the recipe at `recipe_path`."""
    name = recipe_path + COMMAND_LINE
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError([problem(name, "", "overrides are written key=value, e.g. generate.max_new_tokens=50", o) for o in bad])
    layers = []
    try:
        for override in overrides:
            key, _, value = override.partition("=")
            if is_text(schema, key):  # the text as typed, whatever YAML would make of it (${...} still interpolates)
                layers.append(nest(key, value))
            else:
                layers.append(OmegaConf.from_dotlist([override]))
            problems = container_problems(schema, OmegaConf.to_container(layers[-1]), name)
            if problems:
                raise ConfigError(problems)
        return name, OmegaConf.merge(*layers) if layers else OmegaConf.create({})
    except OmegaConfBaseException as e:
        raise ConfigError([problem(name, "", f"cannot parse override: {str(e.msg).splitlines()[0]}")]) from None
    except (yaml.YAMLError, ValueError, TypeError, RecursionError) as e:
        raise ConfigError([problem(name, "", f"cannot parse override: {first_line(e)}")]) from None


def merged(layers: list[Layer]) -> DictConfig:
    """The layers merged, later over earlier."""
    try:
        return OmegaConf.merge(*(cfg for _, cfg in layers))
    except (OmegaConfBaseException, TypeError, ValueError) as e:  # shapes two layers disagree on
        key = getattr(e, "full_key", "") or ""
        raise ConfigError([problem(Origins(layers)(key) if key else layers[-1][0], key,
                                   f"cannot be merged with the recipe it extends: {first_line(e)}")]) from None


def nest(key: str, value) -> DictConfig:
    """`value` under dotted `key`: nest("model.arch", x) is {model: {arch: x}}."""
    for part in reversed(key.split(".")):
        value = {part: value}
    return OmegaConf.create(value)


class Origins:
    """Which layer last set a dotted key (or the section holding it)."""

    def __init__(self, layers: list[Layer]):
        self.layers = [(name, set(_flatten(OmegaConf.to_container(cfg)))) for name, cfg in layers]

    def layer_of(self, key: str) -> int:
        """The index of the last layer that sets `key` itself; -1: none (the schema's default)."""
        return max((i for i, (_, keys) in enumerate(self.layers) if key in keys), default=-1)

    def __call__(self, key: str) -> str:
        parts = key.split(".") if key else []
        for i in range(len(parts), 0, -1):
            prefix = ".".join(parts[:i])
            for name, keys in reversed(self.layers):
                if prefix in keys:
                    return name
        return self.layers[-2][0]  # the recipe file itself (the last layer is the command line)


def _flatten(data, prefix=""):
    if isinstance(data, dict):
        for key, value in data.items():
            full = f"{prefix}{key}"
            yield full
            yield from _flatten(value, full + ".")


def relative_to(source: str) -> Path:
    """The folder a relative path set by layer `source` is taken from: the file's, or the cwd's
    for the command line."""
    return Path.cwd() if source.endswith(COMMAND_LINE) else Path(source).parent


def absolutize_paths(data: dict, origin: Origins) -> None:
    """Each PATH_KEYS value made absolute, relative to the layer that set it ("-", standard input, kept)."""
    for key in PATH_KEYS:
        *parents, name = key.split(".")
        holder = data
        for part in parents:
            holder = holder.get(part) if isinstance(holder, dict) else None
        value = holder.get(name) if isinstance(holder, dict) else None
        if not isinstance(value, str) or value in ("???", "-"):
            continue
        try:
            path = Path(value).expanduser()
        except RuntimeError:  # ~user of no such user: left as written, to be reported as not found
            path = Path(value)
        if not path.is_absolute():
            path = relative_to(origin(key)) / path
        holder[name] = os.path.normpath(path)
