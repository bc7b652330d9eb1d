"""Checking plain data against a schema dataclass: unknown keys, sections and lists in the wrong
place, values of the wrong type. Every function takes the schema class, so the same checks serve
a whole recipe (Recipe) and a spec on its own (ModelSpec).

`origin(key)` names the file (or command line) that set a dotted key; `prefix` is prepended to the
keys reported, for data that sits under a section of a larger recipe (a spec under model.arch).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import typing
from collections.abc import Callable
from enum import Enum

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from runner.config.errors import Problem, problem

Origin = Callable[[str], str]  # dotted key -> the file or command line that set it


def dataclass_of(annotation):
    """The dataclass inside `X` or `Optional[X]`, else None."""
    for t in (annotation, *typing.get_args(annotation)):
        if dataclasses.is_dataclass(t):
            return t
    return None


def valid_keys(schema, prefix: str = "") -> list[str]:
    """Every dotted key of `schema`, sections included."""
    out = []
    for f, hint in typing.get_type_hints(schema).items():
        out.append(prefix + f)
        inner = dataclass_of(hint)
        if inner is not None:
            out += valid_keys(inner, f"{prefix}{f}.")
    return out


def is_text(schema, key: str) -> bool:
    """Whether `schema` types dotted `key` as a string."""
    cls, parts = schema, key.split(".")
    for i, part in enumerate(parts):
        hint = typing.get_type_hints(cls).get(part) if cls is not None else None
        if hint is None:
            return False
        if i == len(parts) - 1:
            return hint is str or hint == typing.Optional[str]
        cls = dataclass_of(hint)
    return False


def container_problems(schema, data: dict, source: str, prefix: str = "") -> list[Problem]:
    """A list or a scalar where the schema has a section (or the reverse): caught in each file or
    command line before the layers merge, which cannot merge a list onto a mapping."""
    hints, out = typing.get_type_hints(schema), []
    for key, value in data.items():
        hint = hints.get(key) if isinstance(key, str) else None
        full = f"{prefix}{key}"
        if hint is None or value is None or (isinstance(value, str) and "${" in value):
            continue  # unknown keys, nulls and interpolations are judged once merged
        if typing.Any in (hint, *typing.get_args(hint)):
            continue  # any shape (generate.json_schema: a JSON schema), judged where it is used
        inner = dataclass_of(hint)
        listed = any(typing.get_origin(t) is list for t in (hint, *typing.get_args(hint)))
        mapped = any(typing.get_origin(t) is dict for t in (hint, *typing.get_args(hint)))
        if mapped:
            if not isinstance(value, dict):
                out.append(problem(source, full, "must be a mapping of keys to values", value))
        elif inner is not None:
            if not isinstance(value, dict):
                out.append(problem(source, full, "must be a section of keys", value))
            else:
                out += container_problems(inner, value, source, full + ".")
        elif listed and not isinstance(value, list):
            out.append(problem(source, full, "must be a list", value))
        elif not listed and isinstance(value, (dict, list)):
            out.append(problem(source, full, f"must be a single value, not a {'list' if isinstance(value, list) else 'section'}",
                               value))
    return out


def shape_problems(schema, data, origin: Origin, prefix: str = "") -> list[Problem]:
    """Unknown keys (with the closest valid key) and scalars where a section belongs."""
    if not isinstance(data, dict):
        return [problem(origin(prefix.rstrip(".")), prefix.rstrip("."), "must be a section of keys", data)]
    hints = typing.get_type_hints(schema)
    out = []
    for key, value in data.items():
        full = prefix + str(key)
        if key not in hints:
            if prefix == "":  # a key in the wrong section is suggested where it belongs
                close = difflib.get_close_matches(full, valid_keys(schema), n=1, cutoff=0.6)
            else:
                close = [prefix + k for k in difflib.get_close_matches(str(key), list(hints), n=1, cutoff=0.6)]
            hint = f"; did you mean {close[0]}?" if close else f"; valid keys here: {', '.join(hints)}"
            out.append(problem(origin(full), full, f"unknown key{hint}", value))
            continue
        inner = dataclass_of(hints[key])
        if inner is not None and not (value is None and type(None) in typing.get_args(hints[key])):
            out += shape_problems(inner, value, origin, full + ".")
    return out


def merge_typed(schema, data: dict, origin: Origin, prefix: str = "") -> tuple[DictConfig | None, list[Problem]]:
    """`data` merged onto `schema`; a value of the wrong type is reported and dropped, then retried.
    None when the shapes disagree (shape_problems names why)."""
    data = _int_keys(schema, _escaped(copy.deepcopy(data)))
    problems = []
    structured = OmegaConf.structured(schema)
    while True:
        try:
            return OmegaConf.merge(structured, data), problems
        except OmegaConfBaseException as e:
            key = e.full_key or ""
            if not key or not _drop(data, key):
                return None, problems  # a shape problem, reported by shape_problems
            if isinstance(e, ConfigKeyError):
                continue  # an unknown key, reported by shape_problems with a suggestion
            message = str(e.msg).split("\n")[0]
            enum = _enum_at(schema, key)
            if enum is not None:  # omegaconf lists the members' Python names; users write their values
                message = f"must be one of {', '.join(m.value for m in enum)}"
                problems.append(problem(origin(prefix + key), prefix + key, message, e.value if hasattr(e, "value") else None))
                continue
            problems.append(problem(origin(prefix + key), prefix + key, message))


def defaults(schema) -> DictConfig:
    """The schema's default values, without the required keys that have none."""
    def drop_missing(d):
        return {k: drop_missing(v) if isinstance(v, dict) else v for k, v in d.items() if v != "???"}
    return OmegaConf.create(drop_missing(OmegaConf.to_container(OmegaConf.structured(schema), enum_to_str=True)))


def _enum_at(schema, key: str):
    """The Enum type of the field at dotted `key`, or None."""
    cls = schema
    *parents, leaf = key.split(".")
    for part in parents:
        cls = dataclass_of(typing.get_type_hints(cls).get(part)) if cls is not None else None
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


def _int_keys(schema, data):
    """Keys written as text ("5" on the command line) made integers where the schema maps ints."""
    if not isinstance(data, dict) or schema is None:
        return data
    hints, out = typing.get_type_hints(schema), {}
    for key, value in data.items():
        hint = hints.get(key) if isinstance(key, str) else None
        if typing.get_origin(hint) is dict and typing.get_args(hint)[0] is int and isinstance(value, dict):
            value = {int(k) if isinstance(k, str) and k.lstrip("-").isdigit() else k: v for k, v in value.items()}
        elif hint is not None:
            value = _int_keys(dataclass_of(hint), value)
        out[key] = value
    return out


def _escaped(data):
    """Resolved values as text again: a `${` left in them (written escaped, `\\${`) stays text."""
    if isinstance(data, dict):
        return {k: _escaped(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_escaped(v) for v in data]
    return data.replace("${", "\\${") if isinstance(data, str) else data
