"""Recipe resolution: YAML layers (base chain, spec, command line) -> a typed Recipe.

Every problem is gathered into one ConfigError that names the file that set the
offending value, its dotted key, the value and what would be valid.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import itertools
import os
import sys
import typing
from enum import Enum
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from runner.config.errors import ConfigError, Problem, problem
from runner.config.schema import ModelSpec, Recipe

SPECS_DIR = Path(os.environ.get("RUNNER_SPECS", Path(__file__).resolve().parents[2] / "specs"))
COMMAND_LINE = " (command line)"  # suffix of the recipe path for values set by overrides
# Keys holding file paths: a relative path is taken relative to the file that set it.
PATH_KEYS = ("model.checkpoint", "tokenizer.path", "draft.model.checkpoint", "quant.calibration.path",
             "draft.quant.calibration.path", "compile.cache_dir", "generate.prompt_file")


def known_specs() -> list[str]:
    return sorted(p.stem for p in SPECS_DIR.glob("*.yaml"))


def resolve(recipe_path: str | os.PathLike, overrides: typing.Sequence[str] = (), check_files: bool = False) -> Recipe:
    """Resolve a recipe file plus `key=value` overrides into a validated Recipe.

    With check_files, the files the recipe names must exist (the checkpoint may instead
    have a model.source to fetch it from).
    """
    layers = _recipe_layers(Path(recipe_path)) + [_override_layer(overrides, str(recipe_path))]
    merged = _merged(layers)
    for section in ("model", "draft.model"):
        try:
            spec_layer = _spec_layer(merged, layers, section)
        except OmegaConfBaseException as e:  # an interpolation under the section that cannot resolve
            key = e.full_key or section
            raise ConfigError([problem(_Origins(layers)(key), key, f"cannot resolve: {str(e.msg).splitlines()[0]}")]) from None
        if spec_layer is not None:
            layers.insert(0, spec_layer)
    # Schema defaults at the bottom, so that `${generate.top_k}` reads a default nobody set.
    merged = _merged([("defaults", _defaults())] + layers)

    origin = _Origins(layers)
    try:
        data = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as e:
        message = str(e.msg).splitlines()[0]
        raise ConfigError([problem(origin(e.full_key or ""), e.full_key or "", f"cannot resolve: {message}")]) from None
    _absolutize_paths(data, origin)
    _read_prompt_file(data, origin)

    problems = _shape_problems(Recipe, data, "", origin)
    cfg, type_problems = _merge_typed(data, origin)
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
    problems += [problem(origin(key), key, why, value) for key, value, why in recipe.problems()]
    if check_files:
        path = recipe.tokenizer.path
        if path is None and recipe.model.source is None:
            problems.append(problem(origin("tokenizer.path"), "tokenizer.path", "is required unless model.source provides the tokenizer"))
        elif path is not None and _path_trouble(Path(path), want_file=False) is not None:
            problems.append(problem(origin("tokenizer.path"), "tokenizer.path", _path_trouble(Path(path), False), path))
        checkpoint = Path(recipe.model.checkpoint)
        trouble = _path_trouble(checkpoint, want_file=False)
        if trouble is not None and (recipe.model.source is None or trouble.startswith("cannot")):
            why = trouble if trouble.startswith("cannot") else "not found, and no model.source says where to get it"
            problems.append(problem(origin("model.checkpoint"), "model.checkpoint", why, recipe.model.checkpoint))
    if problems:
        raise ConfigError(problems)
    return recipe


def _defaults() -> DictConfig:
    def drop_missing(d):
        return {k: drop_missing(v) if isinstance(v, dict) else v for k, v in d.items() if v != "???"}
    return OmegaConf.create(drop_missing(OmegaConf.to_container(OmegaConf.structured(Recipe), enum_to_str=True)))


def to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML, as `runner show` prints it."""
    return OmegaConf.to_yaml(OmegaConf.structured(recipe))


def load_spec(name_or_path: str) -> ModelSpec:
    """A spec file on its own (for `runner init`), validated like a recipe's model.arch."""
    path = _spec_path(name_or_path)
    if path is None:
        raise ConfigError([problem(name_or_path, "spec", f"unknown spec; known: {', '.join(known_specs())}", name_or_path)])
    recipe = resolve_data({"model": {"arch": OmegaConf.to_container(_load_yaml(path)), "checkpoint": "-"}, "tokenizer": {"kind": "tiktoken", "path": "-"}}, str(path))
    return recipe.model.arch


def resolve_data(data: dict, source: str) -> Recipe:
    """Validate an in-memory recipe (all of it attributed to `source`)."""
    cfg, problems = _merge_typed(data, lambda key: source)
    problems = _shape_problems(Recipe, data, "", lambda key: source) + problems
    if cfg is not None:
        problems += [problem(source, k, "is required but has no value") for k in sorted(OmegaConf.missing_keys(cfg))]
    if problems:
        raise ConfigError(problems)
    recipe = OmegaConf.to_object(cfg)
    problems = [problem(source, key, why, value) for key, value, why in recipe.problems()]
    if problems:
        raise ConfigError(problems)
    return recipe


# --- layers -------------------------------------------------------------------------------


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


def _not_found(path: Path) -> str:
    """"file not found", with the closest recipe's path when the name looks mistyped."""
    folder = path.parent if path.parent.is_dir() else Path("recipes")
    names = {p.name: p for p, _ in recipes_in(folder)}
    close = difflib.get_close_matches(path.name, list(names), n=1, cutoff=0.6)
    return f"file not found; did you mean {names[close[0]]}?" if close else "file not found"


def _load_yaml(path: Path) -> DictConfig:
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
        raise ConfigError([problem(str(path), "", f"malformed YAML: {_first_line(e)}")]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([problem(str(path), "", f"must be a mapping of keys to values, not a {type(data).__name__}")])
    problems = _container_problems(Recipe, data, "", str(path))
    if problems:
        raise ConfigError(problems)
    try:
        return OmegaConf.create(data)
    except OmegaConfBaseException as e:
        raise ConfigError([problem(str(path), e.full_key or "", f"malformed value: {str(e.msg).splitlines()[0]}")]) from None
    except (RecursionError, ValueError, TypeError) as e:
        raise ConfigError([problem(str(path), "", f"malformed value: {_first_line(e)}")]) from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _container_problems(cls, data: dict, prefix: str, source: str) -> list[Problem]:
    """A list or a scalar where the schema has a section (or the reverse): caught in each file or
    command line before the layers merge, which cannot merge a list onto a mapping."""
    hints, out = typing.get_type_hints(cls), []
    for key, value in data.items():
        hint = hints.get(key) if isinstance(key, str) else None
        full = f"{prefix}{key}"
        if hint is None or value is None or (isinstance(value, str) and "${" in value):
            continue  # unknown keys, nulls and interpolations are judged once merged
        inner = _dataclass_of(hint)
        listed = any(typing.get_origin(t) is list for t in (hint, *typing.get_args(hint)))
        if inner is not None:
            if not isinstance(value, dict):
                out.append(problem(source, full, "must be a section of keys", value))
            else:
                out += _container_problems(inner, value, full + ".", source)
        elif listed and not isinstance(value, list):
            out.append(problem(source, full, "must be a list", value))
        elif not listed and isinstance(value, (dict, list)):
            out.append(problem(source, full, f"must be a single value, not a {'list' if isinstance(value, list) else 'section'}",
                               value))
    return out


def _recipe_layers(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[str, DictConfig]]:
    """The recipe and its `base:` chain, outermost base first."""
    path = path.resolve() if path.is_absolute() else Path(os.path.abspath(path))
    if path in seen:
        chain = " -> ".join(str(p) for p in seen + (path,))
        raise ConfigError([problem(str(seen[-1]), "base", f"recipes extend each other in a cycle: {chain}")])
    cfg = _load_yaml(path)
    base = cfg.pop("base", None)
    layers = [(str(path), cfg)]
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError([problem(str(path), "base", "must be the path of another recipe", base)])
        trouble = _path_trouble(path.parent / base)
        if trouble:
            raise ConfigError([problem(str(path), "base", f"{trouble}: {os.path.normpath(path.parent / base)}"[:300], base)])
        layers = _recipe_layers(path.parent / base, seen + (path,)) + layers
    return layers


def _merged(layers) -> DictConfig:
    try:
        return OmegaConf.merge(*(cfg for _, cfg in layers))
    except (OmegaConfBaseException, TypeError, ValueError) as e:  # shapes two layers disagree on
        key = getattr(e, "full_key", "") or ""
        raise ConfigError([problem(_Origins(layers)(key) if key else layers[-1][0], key,
                                   f"cannot be merged with the recipe it extends: {_first_line(e)}")]) from None


def _override_layer(overrides: typing.Sequence[str], recipe_path: str) -> tuple[str, DictConfig]:
    name = recipe_path + COMMAND_LINE
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError([problem(name, "", "overrides are written key=value, e.g. generate.max_new_tokens=50", o) for o in bad])
    layers = []
    try:
        for override in overrides:
            key, _, value = override.partition("=")
            if _is_text(key):  # the text as typed, whatever YAML would make of it (${...} still interpolates)
                for part in reversed(key.split(".")):
                    value = {part: value}
                layers.append(OmegaConf.create(value))
            else:
                layers.append(OmegaConf.from_dotlist([override]))
            problems = _container_problems(Recipe, OmegaConf.to_container(layers[-1]), "", name)
            if problems:
                raise ConfigError(problems)
        return name, OmegaConf.merge(*layers) if layers else OmegaConf.create({})
    except OmegaConfBaseException as e:
        raise ConfigError([problem(name, "", f"cannot parse override: {str(e.msg).splitlines()[0]}")]) from None
    except (yaml.YAMLError, ValueError, TypeError, RecursionError) as e:
        raise ConfigError([problem(name, "", f"cannot parse override: {_first_line(e)}")]) from None


def _is_text(key: str) -> bool:
    """Whether the schema types recipe key `key` (dotted) as a string."""
    cls, parts = Recipe, key.split(".")
    for i, part in enumerate(parts):
        hint = typing.get_type_hints(cls).get(part) if cls is not None else None
        if hint is None:
            return False
        if i == len(parts) - 1:
            return hint is str or hint == typing.Optional[str]
        cls = _dataclass_of(hint)
    return False


def _path_trouble(path: Path, want_file: bool = True) -> str | None:
    """None when `path` is there (a file, with want_file); else what is wrong with it."""
    if "\0" in str(path):  # pathlib answers "not there" for these
        return "cannot be used as a path (it holds a NUL byte)"
    try:
        if path.is_file() or (not want_file and path.exists()):
            return None
        return "is a folder, not a file" if path.is_dir() else "file not found"
    except (OSError, ValueError) as e:  # a name the OS refuses: too long, a NUL byte
        return f"cannot be used as a path ({getattr(e, 'strerror', None) or _first_line(e)})"


def _spec_path(name: str) -> Path | None:
    if name.endswith((".yaml", ".yml")):
        return Path(name) if _path_trouble(Path(name)) is None else None
    by_name = {p.stem.lower(): p for p in SPECS_DIR.glob("*.yaml")}
    return by_name.get(name.lower())


def _spec_layer(merged: DictConfig, layers, section: str = "model") -> tuple[str, DictConfig] | None:
    """The spec as the layer under SECTION.arch (SECTION is model or draft.model).

    The spec is named by SECTION.spec; else the checkpoint's folder names one in specs/; else the
    checkpoint declares its own (HF config.json, GGUF metadata, a runner checkpoint).
    """
    parent, _, leaf = section.rpartition(".")
    holder = OmegaConf.select(merged, parent) if parent else merged
    if not isinstance(holder, DictConfig) or OmegaConf.is_interpolation(holder, leaf):
        return None  # absent, or a copy of another section (e.g. draft.model: ${model}) that has its own
    model = holder.get(leaf)
    if not isinstance(model, DictConfig):
        return None
    origin = _Origins(layers)
    key = f"{section}.spec"
    name = model.get("spec")
    if name is None:
        checkpoint = model.get("checkpoint")
        trouble = _path_trouble(Path(str(checkpoint))) if checkpoint else None
        if trouble and trouble.startswith("cannot"):
            where = f"{section}.checkpoint"
            raise ConfigError([problem(origin(where), where, trouble, str(checkpoint))])
        folder = Path(str(checkpoint)).parent.name if checkpoint else ""
        path = _spec_path(folder) if folder else None
        if path is None and checkpoint and _path_trouble(Path(str(checkpoint)), want_file=False) is None:
            declared = _declared_spec(Path(str(checkpoint)))
            if declared is not None:
                return str(checkpoint), _nest(section, {"arch": declared})
        if path is None and "arch" not in model:
            raise ConfigError([problem(origin(key), key,
                                       f"is not set, the checkpoint declares no spec, and its folder {folder!r} names none; "
                                       f"set it to one of: {', '.join(known_specs())}")])
    else:
        name = str(name)
        if name.endswith((".yaml", ".yml")) and not Path(name).expanduser().is_absolute():
            source = origin(key)
            name = str((Path.cwd() if source.endswith(COMMAND_LINE) else Path(source).parent) / name)
        path = _spec_path(name)
        if path is None:
            raise ConfigError([problem(origin(key), key, f"unknown spec; known: {', '.join(known_specs())}", name)])
    if path is None:
        return None
    spec = _load_yaml(path)
    problems = _shape_problems(ModelSpec, OmegaConf.to_container(spec), "", lambda _: str(path))
    if problems:
        raise ConfigError([dataclasses.replace(p, key=f"{section}.arch.{p.key}") for p in problems])
    return str(path), _nest(section, {"arch": spec})


def _declared_spec(checkpoint: Path) -> dict | None:
    """The spec fields a checkpoint carries itself (imports the loaders, so only when needed)."""
    from runner.loaders import read_spec

    try:
        fields = read_spec(checkpoint)
    except ConfigError:
        return None  # not a format that declares one; the caller asks for model.spec
    if fields is None:
        return None
    return {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in fields.items()}


def _nest(section: str, value) -> DictConfig:
    for part in reversed(section.split(".")):
        value = {part: value}
    return OmegaConf.create(value)


def _read_prompt_file(data: dict, origin: "_Origins") -> None:
    """generate.prompt_file's text becomes generate.prompt. The later of the two keys wins (a
    command-line prompt_file over a recipe's prompt); one file or command line naming both is an error."""
    generate = data.get("generate")
    if not isinstance(generate, dict) or generate.get("prompt_file") is None:
        return
    key, path = "generate.prompt_file", generate["prompt_file"]
    prompt_layer, file_layer = origin.layer_of("generate.prompt"), origin.layer_of(key)
    if prompt_layer == file_layer:
        raise ConfigError([problem(origin(key), key, "and generate.prompt are both set here; keep one", path)])
    if prompt_layer > file_layer:
        generate["prompt_file"] = None
        return
    if not isinstance(path, str):
        return  # a wrong type: the schema's check names it
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else _first_line(e)
        raise ConfigError([problem(origin(key), key, f"cannot read it: {why}", path)]) from None
    generate["prompt"] = text


class _Origins:
    """Which layer last set a dotted key (or the section holding it)."""

    def __init__(self, layers):
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
        return self.layers[-2][0]  # the recipe file itself


def _flatten(data, prefix=""):
    if isinstance(data, dict):
        for key, value in data.items():
            full = f"{prefix}{key}"
            yield full
            yield from _flatten(value, full + ".")


def _absolutize_paths(data: dict, origin) -> None:
    for key in PATH_KEYS:
        *parents, name = key.split(".")
        holder = data
        for part in parents:
            holder = holder.get(part) if isinstance(holder, dict) else None
        value = holder.get(name) if isinstance(holder, dict) else None
        if not isinstance(value, str) or value in ("???", "-"):  # "-": standard input
            continue
        try:
            path = Path(value).expanduser()
        except RuntimeError:  # ~user of no such user: left as written, to be reported as not found
            path = Path(value)
        if not path.is_absolute():
            source = origin(key)
            base = Path.cwd() if source.endswith(COMMAND_LINE) else Path(source).parent
            path = base / path
        holder[name] = os.path.normpath(path)


# --- validation ---------------------------------------------------------------------------


def _dataclass_of(annotation):
    """The dataclass inside `X` or `Optional[X]`, else None."""
    for t in (annotation, *typing.get_args(annotation)):
        if dataclasses.is_dataclass(t):
            return t
    return None


def _valid_keys(cls, prefix="") -> list[str]:
    out = []
    for f, hint in typing.get_type_hints(cls).items():
        out.append(prefix + f)
        inner = _dataclass_of(hint)
        if inner is not None:
            out += _valid_keys(inner, f"{prefix}{f}.")
    return out


def _shape_problems(cls, data, prefix, origin) -> list[Problem]:
    """Unknown keys (with the closest valid key) and scalars where a section belongs."""
    if not isinstance(data, dict):
        return [problem(origin(prefix.rstrip(".")), prefix.rstrip("."), "must be a section of keys", data)]
    hints = typing.get_type_hints(cls)
    out = []
    for key, value in data.items():
        full = prefix + str(key)
        if key not in hints:
            if prefix == "" or cls is Recipe:
                close = difflib.get_close_matches(full, _valid_keys(Recipe), n=1, cutoff=0.6)
            else:
                close = [prefix + k for k in difflib.get_close_matches(str(key), list(hints), n=1, cutoff=0.6)]
            hint = f"; did you mean {close[0]}?" if close else f"; valid keys here: {', '.join(hints)}"
            out.append(problem(origin(full), full, f"unknown key{hint}", value))
            continue
        inner = _dataclass_of(hints[key])
        if inner is not None and not (value is None and type(None) in typing.get_args(hints[key])):
            out += _shape_problems(inner, value, full + ".", origin)
    return out


def _enum_at(key: str):
    """The Enum type of the recipe field at dotted `key`, or None."""
    cls = Recipe
    *parents, leaf = key.split(".")
    for part in parents:
        cls = _dataclass_of(typing.get_type_hints(cls).get(part)) if cls is not None else None
    hint = typing.get_type_hints(cls).get(leaf) if cls is not None else None
    for t in (hint, *typing.get_args(hint)):
        if isinstance(t, type) and issubclass(t, Enum):
            return t
    return None


def _drop(data: dict, key: str) -> bool:
    *parents, leaf = key.split(".")
    for part in parents:
        data = data.get(part) if isinstance(data, dict) else None
    if isinstance(data, dict) and leaf in data:
        del data[leaf]
        return True
    return False


def _escaped(data):
    """Resolved values as text again: a `${` left in them (written escaped, `\\${`) stays text."""
    if isinstance(data, dict):
        return {k: _escaped(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_escaped(v) for v in data]
    return data.replace("${", "\\${") if isinstance(data, str) else data


def _merge_typed(data: dict, origin) -> tuple[DictConfig | None, list[Problem]]:
    """Merge onto the schema; a value of the wrong type is reported and dropped, then retried."""
    data = _escaped(copy.deepcopy(data))
    problems = []
    schema = OmegaConf.structured(Recipe)
    while True:
        try:
            return OmegaConf.merge(schema, data), problems
        except OmegaConfBaseException as e:
            key = e.full_key or ""
            if not key or not _drop(data, key):
                return None, problems  # a shape problem, already reported by _shape_problems
            if isinstance(e, ConfigKeyError):
                continue  # an unknown key, already reported with a suggestion
            message = str(e.msg).split("\n")[0]
            enum = _enum_at(key)
            if enum is not None:  # omegaconf lists the members' Python names; users write their values
                message = f"must be one of {', '.join(m.value for m in enum)}"
                problems.append(problem(origin(key), key, message, e.value if hasattr(e, "value") else None))
                continue
            problems.append(problem(origin(key), key, message))
