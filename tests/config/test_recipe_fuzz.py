"""No traceback for any recipe: mutated shipped recipes end in exit 0 or exit 2, never a crash.

Hypothesis takes each recipes/*.yaml and damages it the way a new user would: keys deleted or
misspelt, values of the wrong type or container, sections written as lists or scalars, odd
numbers and odd paths (a name the OS refuses, a NUL byte), and broken YAML text. The result is
written into a copy of recipes/ (so `base:` and assets/ still resolve) and handed, in-process,
to `runner show` and to `runner run`, whose model stage is stubbed out: only resolution runs.
"""
from __future__ import annotations

import dataclasses
import datetime
import io
import shutil
import typing
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from unittest import mock

import pytest
import yaml
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from runner import cli as cli_module
from runner.config.schema import Recipe

REPO = Path(__file__).resolve().parents[2]
RECIPE_FILES = sorted((REPO / "recipes").glob("*.yaml"))

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LONG_NAME = "x" * 300  # one path component longer than any file system's NAME_MAX (255)


def _dataclass_in(hint):
    """The dataclass inside `X` or `Optional[X]`, else None."""
    return next((t for t in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(t)), None)


def schema_keys(cls=Recipe, prefix="") -> list[str]:
    """Every dotted key of the schema, read from the dataclasses (Optional sections included)."""
    out = []
    for name, hint in typing.get_type_hints(cls).items():
        out.append(prefix + name)
        inner = _dataclass_in(hint)
        if inner is not None:
            out += schema_keys(inner, f"{prefix}{name}.")
    return out


def section_keys(cls=Recipe, prefix="") -> list[str]:
    """The dotted keys whose value must be a mapping (a section)."""
    out = []
    for name, hint in typing.get_type_hints(cls).items():
        inner = _dataclass_in(hint)
        if inner is not None:
            out += [prefix + name, *section_keys(inner, f"{prefix}{name}.")]
    return out


def text_keys(cls=Recipe, prefix="") -> list[str]:
    """The dotted keys typed as text: paths, names, the prompt (where an odd path may land)."""
    out = []
    for name, hint in typing.get_type_hints(cls).items():
        inner = _dataclass_in(hint)
        if inner is not None:
            out += text_keys(inner, f"{prefix}{name}.")
        elif hint is str or hint == typing.Optional[str]:
            out.append(prefix + name)
    return out


KEYS = schema_keys() + ["base"]
SECTIONS = section_keys()
TEXT_KEYS = text_keys() + ["base"]

# --- what a user might write ------------------------------------------------------------------

ODD_SCALARS = [
    None, True, False, 0, -1, 1, 2**63, 2**64, 10**40, -(10**40), 0.5, -0.0, 1e308,
    float("nan"), float("inf"), float("-inf"), "nan", "inf", "-inf", ".nan", "1e400",
    "", " ", "???", "null", "none", "yes", "off", "0x10", "1_000", "12abc",
    "x" * 5000, "é🙂", "two\nlines", "\t", "a\0b", "\x7f\x85",
    "${model}", "${generate}", "${nope}", "${model.nope}", "${oc.env:RUNNER_FUZZ_UNSET}", "${",
    "${oc.decode:'[1'}", "\\${escaped}", "${model.checkpoint}",
    datetime.date(2024, 1, 1), b"\x00\xff",
]
ODD_PATHS = [
    "", ".", "..", "/", "~", "~no-such-user/x", "assets", "assets/tiny-sp.model", "/dev/null",
    "/no/such/dir/model.pth", LONG_NAME, f"{LONG_NAME}.yaml", f"{LONG_NAME}/model.pth",
    f"dir/{LONG_NAME}", f"~/{LONG_NAME}", "../" * 300 + "x", "a\0b", "a\0b.yaml", "x" * 5000,
    "tiny-random.yaml", "smollm2-135m.yaml", "assets/", "specs/tiny-llama.yaml", "-",
]
ODD_CONTAINERS = [
    [], [1, 2], ["a"], [[]], [None], [{"kind": "gguf"}], {}, {"a": 1}, {1: 2}, {None: 1},
    {"": ""}, {"a.b": 1}, {"${model}": 1}, {True: False}, {"spec": [1]},
]
SECTION_VALUES = [[1, 2], [], ["a", "b"], [{"a": 1}], 3, -1, "int8", "", "x" * 5000, None, True,
                  "${model}", "${nope}", float("nan"), LONG_NAME, 10**40]

# Lines a careless edit leaves in a YAML file.
BROKEN_LINES = [
    "key: [unclosed", "key: {unclosed", "]", "}", "\tkey: tab", "key:\tvalue", ": stray", "stray:",
    "a: b: c", "key: 'unclosed", 'key: "unclosed', "- stray item", "*undefined", "key: *undefined",
    "key: &a [*a]", "key: !!python/object/apply:os.system ['true']", "key: !custom x",
    "key: !!binary AAEC", "key: !!set {a, b}", "key: !!float nope", "key: !!int 1.5",
    "key: !!timestamp 2024-01-01", "key: 2024-01-01", "---", "...", "%YAML 1.1", "<<: {model: 1}",
    "<<: 5", "? [1, 2]\n: x", "? {a: 1}\n: x", "  indented: wrong", "model:", "generate: 1",
    "model: 1\nmodel: 2", "key: @reserved", "key: `reserved", "key: %", "key: |\nno indent",
]
WHOLE_FILES = ["", "\n", "# only a comment\n", "- a\n- b\n", "42\n", "null\n", "~\n", "[\n", "{\n",
               "just some words\n", "---\na: 1\n---\nb: 2\n", "!!python/none\n", "? a\n", "base: base: x\n"]


def typos(name) -> list:
    """Misspellings of key `name`, and keys that are not even strings."""
    name = str(name)
    out = [name[:-1], name + "s", name.upper(), name.capitalize(), name.replace("_", "-"),
           name.replace("_", ""), f" {name}", f"{name} ", f"{name}.", f"generate.{name}", f"{name}\n",
           "", "1", 1, True, None, 1.5, "${" + name + "}"]
    if len(name) > 1:
        out.append(name[1] + name[0] + name[2:])
    return out


@dataclasses.dataclass
class Mutant:
    """A shipped recipe after some damage: the file text (or bytes) and what was done to it."""

    source: str
    steps: list[str]
    content: str | bytes

    def __repr__(self) -> str:
        cut = f" ...({len(self.content) - 2000} more)" if len(self.content) > 2000 else ""
        return f"Mutant({self.source}: {'; '.join(self.steps)})\n{self.content[:2000]!r}{cut}"


def key_paths(data, prefix=()) -> list[tuple]:
    out = []
    if isinstance(data, dict):
        for key, value in data.items():
            out.append(prefix + (key,))
            out += key_paths(value, prefix + (key,))
    return out


def holder_of(data: dict, path: tuple, create: bool = False):
    for part in path[:-1]:
        if not isinstance(data.get(part), dict):
            if not create:
                return None
            data[part] = {}
        data = data[part]
    return data


def odd_values(fuzz_name: str):
    return st.one_of(
        st.sampled_from(ODD_SCALARS + ODD_PATHS + ODD_CONTAINERS + [fuzz_name]),
        st.integers(),
        st.floats(),
        st.text(st.characters(exclude_categories=("Cs",)), max_size=20),
    )


@st.composite
def mutants(draw) -> Mutant:
    source = draw(st.sampled_from(RECIPE_FILES))
    fuzz_name = f"fuzz-{source.name}"
    data = yaml.safe_load(source.read_text()) or {}
    steps: list[str] = []
    text_steps = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["delete", "rename", "set", "set", "path", "section", "text", "text"]))
        paths = key_paths(data)
        if kind in ("delete", "rename") and paths:
            path = draw(st.sampled_from(paths))
            holder = holder_of(data, path)
            if kind == "delete":
                del holder[path[-1]]
                steps.append(f"delete {'.'.join(map(str, path))}")
            else:
                new = draw(st.sampled_from(typos(path[-1])) | st.text(max_size=8))
                holder[new] = holder.pop(path[-1])
                steps.append(f"rename {'.'.join(map(str, path))} -> {new!r}")
        elif kind in ("set", "delete", "rename"):
            key = draw(st.sampled_from(KEYS + [".".join(map(str, p)) for p in paths]))
            value = draw(odd_values(fuzz_name))
            holder_of(data, tuple(key.split(".")), create=True)[key.split(".")[-1]] = value
            steps.append(f"set {key} = {value!r:.80}")
        elif kind == "path":
            key = draw(st.sampled_from(TEXT_KEYS))
            value = draw(st.sampled_from(ODD_PATHS + [fuzz_name]))
            holder_of(data, tuple(key.split(".")), create=True)[key.split(".")[-1]] = value
            steps.append(f"set {key} = {value!r:.80}")
        elif kind == "section":
            key = draw(st.sampled_from(SECTIONS))
            value = draw(st.sampled_from(SECTION_VALUES))
            holder_of(data, tuple(key.split(".")), create=True)[key.split(".")[-1]] = value
            steps.append(f"set section {key} = {value!r:.80}")
        else:
            text_steps.append(draw(st.sampled_from(["insert", "insert", "whole", "tabs", "truncate", "encoding"])))
    content: str | bytes = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    for kind in text_steps:
        if isinstance(content, bytes):
            break
        lines = content.splitlines()
        if kind == "insert":
            line = draw(st.sampled_from(BROKEN_LINES + lines) if lines else st.sampled_from(BROKEN_LINES))
            at = draw(st.integers(0, len(lines)))
            content = "\n".join(lines[:at] + [line] + lines[at:]) + "\n"
            steps.append(f"insert line {at}: {line!r}")
        elif kind == "whole":
            content = draw(st.sampled_from(WHOLE_FILES))
            steps.append("replace the whole file")
        elif kind == "tabs" and lines:
            at = draw(st.integers(0, len(lines) - 1))
            lines[at] = lines[at].replace("  ", "\t")
            content = "\n".join(lines) + "\n"
            steps.append(f"tabs on line {at}")
        elif kind == "truncate":
            at = draw(st.integers(0, len(content)))
            content = content[:at]
            steps.append(f"truncate at {at}")
        elif kind == "encoding":
            how = draw(st.sampled_from(["latin-1", "utf-16", "bom", "nul", "junk"]))
            content = {
                "latin-1": lambda c: (c + "# café au lait\n").encode("latin-1", "replace"),
                "utf-16": lambda c: c.encode("utf-16"),
                "bom": lambda c: ("\ufeff" + c).encode("utf-8"),
                "nul": lambda c: c.encode("utf-8") + b"key: a\x00b\n",
                "junk": lambda c: b"\xff\xfe\xfd" + c.encode("utf-8"),
            }[how](content)
            steps.append(f"encode as {how}")
    return Mutant(source.name, steps, content)


# --- running the CLI in-process -----------------------------------------------------------------


def _resolution_only(task, resolved, recipe, *args):
    """`runner run` up to its last check before a model is built (see parallel.run)."""
    from runner import parallel

    parallel.check(resolved.parallel, resolved.device, recipe)
    return {0: None}


def invoke(*args: str) -> tuple[int, str, str]:
    """cli.main(args): its exit status, stdout and stderr. Any other exception escapes (a traceback).

    Standard input is empty (generate.prompt_file: - reads it).
    """
    out, err = io.StringIO(), io.StringIO()
    with (redirect_stdout(out), redirect_stderr(err), mock.patch("sys.stdin", io.StringIO("")),
          mock.patch("runner.parallel.run", _resolution_only)):
        try:
            cli_module.main(list(args))
            code = 0
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def assert_clean_exit(code: int, out: str, err: str, command: str) -> None:
    """Exit 0, or exit 2 with only `error: ...` lines on stderr."""
    assert code in (0, 2), f"{command}: exit {code}\n{err}"
    assert "Traceback" not in err
    if code == 2:
        assert err.strip(), f"{command}: exit 2 with nothing on stderr"
        bad = [line for line in err.rstrip("\n").split("\n") if not line.startswith("error: ")]
        assert not bad, f"{command}: stderr lines that are not 'error: ...': {bad}"
    elif command == "show":
        assert isinstance(yaml.safe_load(out), dict), out


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A copy of recipes/ (assets included) and an empty RUNNER_HOME; nothing in the repo is touched."""
    root = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(REPO / "recipes", root / "recipes")
    (root / "home").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RUNNER_HOME", str(root / "home"))
        mp.delenv("RUNNER_FUZZ_UNSET", raising=False)
        mp.chdir(root)
        yield root


def write_recipe(workspace: Path, name: str, content: str | bytes) -> Path:
    path = workspace / "recipes" / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


# --- the fuzz -----------------------------------------------------------------------------------


@FUZZ
@given(mutant=mutants())
def test_a_mutated_recipe_exits_0_or_2_without_a_traceback(workspace, mutant):
    path = write_recipe(workspace, f"fuzz-{mutant.source}", mutant.content)
    note(repr(mutant))
    for command in ("show", "run"):
        assert_clean_exit(*invoke(command, str(path)), command)


OVERRIDE_KEYS = KEYS + ["model.", ".model", "model..spec", "model.spec.x", "generate.prompt.x", "0",
                        "generate[0]", "a b", "${model}", "generate.temprature", "Model.spec"]
OVERRIDE_VALUES = [
    "[1,2]", "[]", "{a: 1}", "{}", "[", "{", "]", "'", '"', "null", "~", "???", "nan", "inf", "-inf", "-1", "0",
    "99999999999999999999999", "1e400", "", " ", "a: b", ":", "=", "x=y", "${nope}", "${", "${model}",
    "${oc.env:RUNNER_FUZZ_UNSET}", "!!python/object/apply:os.system [true]", "*alias", "&a b", "- x",
    LONG_NAME, f"{LONG_NAME}/model.pth", f"{LONG_NAME}.yaml", "x" * 5000, "/dev/null", "assets", "\t", "é🙂",
]


@FUZZ
@given(
    recipe=st.sampled_from(RECIPE_FILES),
    overrides=st.lists(
        st.tuples(st.sampled_from(OVERRIDE_KEYS),
                  st.sampled_from(OVERRIDE_VALUES) | st.text(st.characters(exclude_categories=("Cs",),
                                                                           exclude_characters="\0"), max_size=20)),
        min_size=1, max_size=3),
)
def test_odd_overrides_exit_0_or_2_without_a_traceback(workspace, recipe, overrides):
    args = [f"{key}={value}" for key, value in overrides]
    path = workspace / "recipes" / recipe.name
    note(f"runner {path} {' '.join(map(repr, args))}")
    for command in ("show", "run"):
        assert_clean_exit(*invoke(command, str(path), *args), command)


# --- the cases the issue names, and what the fuzz found -------------------------------------------


def assert_exit_2(code: int, out: str, err: str, key: str | None = None) -> None:
    """Exit 2 with only `error: ...` lines, one of them naming dotted `key` (when given)."""
    assert code == 2, err or out
    lines = err.rstrip("\n").split("\n")
    assert err and all(line.startswith("error: ") for line in lines), err
    assert key is None or any(f": {key}:" in line for line in lines), err


@pytest.mark.parametrize(
    "command, text, key",
    [
        pytest.param("show", "model: [1, 2]", "model", id="show-model-list"),
        pytest.param("run", "model: [1, 2]", "model", id="run-model-list"),
        pytest.param("show", "generate: 3", "generate", id="show-generate-scalar"),
        pytest.param("run", "generate: 3", "generate", id="run-generate-scalar"),
        pytest.param("show", 'quant: "int8"', "quant", id="show-quant-string"),
        pytest.param("run", 'quant: "int8"', "quant", id="run-quant-string"),
        pytest.param("run", f"tokenizer:\n  path: {LONG_NAME}/tok.model", "tokenizer.path", id="run-long-tokenizer-dir"),
        pytest.param("run", f"tokenizer:\n  path: {LONG_NAME}", "tokenizer.path", id="run-long-tokenizer-name"),
        pytest.param("run", f"model:\n  checkpoint: {LONG_NAME}/model.pth", "model.checkpoint",
                     id="run-long-checkpoint-with-source"),
        pytest.param("run", f"model:\n  checkpoint: {LONG_NAME}/model.pth\n  source: null", "model.checkpoint",
                     id="run-long-checkpoint-no-source"),
        pytest.param("show", f"model:\n  spec: null\n  checkpoint: {LONG_NAME}/model.pth", "model.checkpoint",
                     id="show-long-checkpoint-no-spec"),
        pytest.param("show", f"model:\n  spec: {LONG_NAME}.yaml", "model.spec", id="show-long-spec-file"),
        pytest.param("run", 'tokenizer:\n  path: "tok\\0.model"', "tokenizer.path", id="run-nul-tokenizer"),
        pytest.param("run", "tokenizer:\n  path: ~no-such-user/tok.model", "tokenizer.path", id="run-unknown-user-home"),
        pytest.param("show", 'generate:\n  prompt_file: "p\\0.txt"', "generate.prompt_file", id="show-nul-prompt-file"),
        pytest.param("show", f"generate:\n  prompt_file: {LONG_NAME}.txt", "generate.prompt_file",
                     id="show-long-prompt-file"),
        pytest.param("run", 'model:\n  checkpoint: "weights\\0/model.pth"', "model.checkpoint", id="run-nul-checkpoint"),
    ],
)
def test_the_issues_recipes_exit_2_naming_the_key(workspace, command, text, key):
    path = write_recipe(workspace, "issue.yaml", f"base: tiny-random.yaml\n{text}\n")
    assert_exit_2(*invoke(command, str(path)), key)


@pytest.mark.parametrize("base, key", [
    pytest.param(LONG_NAME, "base", id="long-name"),
    pytest.param(f"{LONG_NAME}.yaml", "base", id="long-yaml-name"),
    pytest.param(f"dir/{LONG_NAME}/x.yaml", "base", id="long-folder"),
    pytest.param("a\0b.yaml", "base", id="nul"),
    pytest.param("assets", "base", id="a-folder"),
    pytest.param("issue.yaml", "base", id="itself"),
    pytest.param("assets/tiny-sp.model", None, id="a-binary-file"),  # its content is the problem, wherever reported
])
def test_an_odd_base_exits_2(workspace, base, key):
    path = write_recipe(workspace, "issue.yaml", yaml.safe_dump({"base": base}))
    assert_exit_2(*invoke("show", str(path)), key)


BASE = "base: tiny-random.yaml\n"
# Smallest forms of what the fuzz above has found: each must exit 2 with `error:` lines only.
FOUND = [
    pytest.param(BASE + "model: [1, 2]\n", [], id="list-over-a-base-section"),
    pytest.param("generate: [a]\n", [], id="list-over-a-schema-section"),
    pytest.param(BASE, ["model=[]"], id="override-list-over-a-section"),
    pytest.param(BASE, ["generate.stop={}"], id="override-mapping-over-a-list"),
    pytest.param(BASE, ["generate=[1,2]", "generate.top_k=1"], id="overrides-list-then-key"),
    pytest.param((BASE + "# caf\xe9\n").encode("latin-1"), [], id="latin-1-file"),
    pytest.param(b"\xff\xfe" + BASE.encode("utf-16-le"), [], id="utf-16-file"),
    pytest.param("base: assets/tiny-sp.model\n", [], id="binary-base"),
    pytest.param((BASE + "generate:\n  prompt: a\x00b\n").encode(), [], id="nul-byte-in-file"),
    pytest.param(BASE + "threads: !!int 1.5\n", [], id="bad-int-tag"),
    pytest.param(BASE + "generate:\n  temperature: !!float nope\n", [], id="bad-float-tag"),
    pytest.param(BASE + "? {a: 1}\n: x\n", [], id="mapping-as-key"),
    pytest.param(BASE + "? [1, 2]\n: x\n", [], id="list-as-key"),
    pytest.param(BASE + "key: &a [*a]\n", [], id="recursive-alias"),
    pytest.param(BASE + "model:\n  arch:\n    n_heads: 0\n", [], id="zero-heads"),
    pytest.param(BASE + "model:\n  spec: ${nope}\n", [], id="spec-broken-interpolation"),
    pytest.param(BASE + "draft:\n  model:\n    spec: ${oc.env:RUNNER_FUZZ_UNSET}\n", [], id="draft-spec-unset-env"),
    pytest.param(BASE + "draft: ${nope}\n", [], id="section-broken-interpolation"),
    pytest.param(BASE + "generate: \\${x}\n", [], id="escaped-interpolation-as-section"),
    pytest.param(BASE + "generate:\n  top_k: \\${x}\n", [], id="escaped-interpolation-as-int"),
    pytest.param(BASE, ["generate.top_k=["], id="override-unclosed-bracket"),
    pytest.param(BASE, ["generate.top_k=*alias"], id="override-undefined-alias"),
    pytest.param(BASE, ["generate.top_k=="], id="override-equals-sign"),
    pytest.param(BASE, ["generate.top_k=\x01"], id="override-control-character"),
    pytest.param(BASE, ["generate.top_k='"], id="override-unclosed-quote"),
    pytest.param(BASE, ["threads=\t"], id="override-tab"),
    pytest.param(BASE, ["generate.top_k=${"], id="override-unclosed-interpolation"),
    pytest.param('"base\\n": tiny-random.yaml\n', [], id="key-with-a-newline"),
]


@pytest.mark.parametrize("command", ["show", "run"])
@pytest.mark.parametrize("content, overrides", FOUND)
def test_what_the_fuzz_found_exits_2(workspace, command, content, overrides):
    path = write_recipe(workspace, "found.yaml", content)
    assert_exit_2(*invoke(command, str(path), *overrides))


# Where exit 0 is as right as exit 2, so long as there is no traceback.
EITHER = [
    # omegaconf's escape for a literal `${...}`: text a prompt may well hold
    pytest.param(BASE + "generate:\n  prompt: 'echo \\${HOME}'\n", id="escaped-interpolation-in-the-prompt"),
    # `runner show` does not look for the tokenizer; it need not expand `~user` either
    pytest.param(BASE + "tokenizer:\n  path: ~no-such-user/tok.model\n", id="unknown-user-home"),
]


@pytest.mark.parametrize("command", ["show", "run"])
@pytest.mark.parametrize("content", EITHER)
def test_what_the_fuzz_found_exits_0_or_2(workspace, command, content):
    path = write_recipe(workspace, "found.yaml", content)
    assert_clean_exit(*invoke(command, str(path)), command)
