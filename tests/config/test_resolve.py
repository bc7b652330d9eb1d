"""runner.config.resolve: recipe files + base chain + spec + command line -> a typed Recipe.

Every recipe here is written into tmp_path by the test that uses it; only the last two
sections read the shipped specs/ and recipes/.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import os
import textwrap
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from runner.config import specs as specs_module
from runner.config.errors import ConfigError, Problem
from runner.config.resolve import known_specs, load_spec, resolve, to_yaml
from runner.config.schema import DType, GenerateSection, ModelSpec, Recipe, RopeScaling, TokenizerKind, TokenizerSection

REPO = Path(__file__).resolve().parents[2]
SPEC_FILES = sorted((REPO / "specs").glob("*.yaml"))
RECIPE_FILES = sorted((REPO / "recipes").glob("*.yaml"))
COMMAND_LINE = " (command line)"

MINIMAL = """\
model:
  spec: tiny-llama
  checkpoint: weights/model.pth
tokenizer:
  kind: sentencepiece
  path: tok.model
"""

# One function-scoped tmp_path per test is fine for hypothesis: the recipe is written once and only read.
HYPOTHESIS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def problems_of(recipe, overrides=(), **kwargs) -> list[Problem]:
    with pytest.raises(ConfigError) as info:
        resolve(recipe, list(overrides), **kwargs)
    assert info.value.problems, "a ConfigError must carry at least one problem"
    return info.value.problems


def only_problem(recipe, overrides=(), **kwargs) -> Problem:
    problems = problems_of(recipe, overrides, **kwargs)
    assert len(problems) == 1, [str(p) for p in problems]
    return problems[0]


def same_file(source: str, path: Path) -> bool:
    return os.path.realpath(source) == os.path.realpath(path)


def assert_names(p: Problem, *, source: str | Path | None = None, key: str | None = None, parts=()) -> None:
    """The problem's text names the file that set the value, the dotted key and each of `parts`."""
    text = str(p)
    if source is not None:
        if isinstance(source, Path):
            assert same_file(p.source, source), (p.source, source)
            assert p.source in text
        else:
            assert p.source == source and source in text, (p.source, source)
    if key is not None:
        assert p.key == key, (p.key, key)
        assert key in text
    for part in parts:
        assert str(part) in text, (part, text)


def levenshtein(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def schema_keys(cls=Recipe, prefix="") -> list[str]:
    """Every dotted key of the schema, read from the dataclasses (not a hand-kept list)."""
    out = []
    for f in dataclasses.fields(cls):
        out.append(prefix + f.name)
        inner = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(inner):
            out += schema_keys(type(inner), f"{prefix}{f.name}.")
    return out


@pytest.fixture
def recipe(tmp_path) -> Path:
    return write(tmp_path / "recipe.yaml", MINIMAL)


# --- command-line overrides ----------------------------------------------------------------


@pytest.mark.parametrize(
    "override, get, expected",
    [
        ("generate.max_new_tokens=7", lambda r: r.generate.max_new_tokens, 7),
        ("generate.temperature=0.25", lambda r: r.generate.temperature, 0.25),
        ("generate.temperature=1", lambda r: r.generate.temperature, 1.0),
        ("generate.prompt=hello", lambda r: r.generate.prompt, "hello"),
        ("generate.prompt=two words", lambda r: r.generate.prompt, "two words"),
        ("generate.prompt=42", lambda r: r.generate.prompt, "42"),
        ("generate.prompt='42'", lambda r: r.generate.prompt, "'42'"),  # text as typed, quotes and all
        ("generate.top_k=null", lambda r: r.generate.top_k, None),
        ("threads=null", lambda r: r.threads, None),
        ("threads=3", lambda r: r.threads, 3),
        ("device=cuda:1", lambda r: r.device, "cuda:1"),
        ("dtype=bfloat16", lambda r: r.dtype, DType.bfloat16),
        ("model.arch.n_layers=1", lambda r: r.model.arch.n_layers, 1),
        ("model.arch.rope_scaling.factor=4.0", lambda r: r.model.arch.rope_scaling, RopeScaling(factor=4.0)),
        ("tokenizer.special_tokens=[a,b]", lambda r: r.tokenizer.special_tokens, ["a", "b"]),
    ],
)
def test_override_sets_a_typed_value(recipe, override, get, expected):
    value = get(resolve(recipe, [override]))
    assert value == expected
    assert type(value) is type(expected)


def test_overrides_do_not_disturb_other_keys(recipe):
    plain = resolve(recipe)
    changed = resolve(recipe, ["generate.seed=99"])
    assert changed.generate.seed == 99
    assert dataclasses.replace(changed, generate=dataclasses.replace(changed.generate, seed=plain.generate.seed)) == plain


@HYPOTHESIS
@given(
    seed=st.integers(0, 2**63 - 1),
    max_new_tokens=st.integers(1, 10**6),
    temperature=st.floats(0, 1e6),
    top_k=st.one_of(st.none(), st.integers(1, 10**6)),
)
def test_valid_overrides_round_trip(recipe, seed, max_new_tokens, temperature, top_k):
    overrides = [f"generate.seed={seed}", f"generate.max_new_tokens={max_new_tokens}",
                 f"generate.temperature={temperature!r}", f"generate.top_k={'null' if top_k is None else top_k}"]
    g = resolve(recipe, overrides).generate
    assert (g.seed, g.max_new_tokens, g.temperature, g.top_k) == (seed, max_new_tokens, temperature, top_k)


@HYPOTHESIS
@given(prompt=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="$\\"), max_size=40))
def test_prompt_from_a_file_round_trips(tmp_path, prompt):
    # "$" and "\" are omegaconf's interpolation syntax; everything else must arrive untouched.
    path = tmp_path / "prompt.yaml"
    path.write_text(MINIMAL + yaml.safe_dump({"generate": {"prompt": prompt}}, allow_unicode=True))
    as_written = yaml.safe_load(path.read_text())["generate"]["prompt"]  # YAML itself folds a few line breaks
    assert resolve(path).generate.prompt == as_written


# --- layering: base chains and precedence --------------------------------------------------

LAYERS = ("base", "mid", "top", "command line")


@pytest.mark.parametrize("setters", [s for n in range(5) for s in itertools.combinations(LAYERS, n)],
                         ids=lambda s: "+".join(s) or "none")
def test_the_last_layer_that_sets_a_key_wins(tmp_path, setters):
    """generate.seed is set by some subset of base <- mid <- top <- command line."""
    seed = {layer: 100 + i for i, layer in enumerate(LAYERS)}

    def line(layer):
        return f"  seed: {seed[layer]}\n" if layer in setters else ""

    write(tmp_path / "base.yaml", MINIMAL + "generate:\n  prompt: from base\n" + line("base"))
    write(tmp_path / "mid.yaml", "base: base.yaml\ngenerate:\n  max_new_tokens: 11\n" + line("mid"))
    top = write(tmp_path / "top.yaml", "base: mid.yaml\ngenerate:\n  top_k: 5\n" + line("top"))
    overrides = ["generate.seed=103"] if "command line" in setters else []

    g = resolve(top, overrides).generate
    assert g.seed == (seed[setters[-1]] if setters else GenerateSection.seed)
    assert (g.prompt, g.max_new_tokens, g.top_k) == ("from base", 11, 5)  # every layer contributes


def test_a_child_overrides_its_base_and_the_command_line_overrides_both(tmp_path):
    write(tmp_path / "base.yaml", MINIMAL + "generate: {temperature: 0.1, top_p: 0.5}\n")
    child = write(tmp_path / "child.yaml", "base: base.yaml\ngenerate: {temperature: 0.2}\n")
    assert resolve(child).generate.temperature == 0.2
    assert resolve(child).generate.top_p == 0.5
    assert resolve(child, ["generate.temperature=0.3"]).generate.temperature == 0.3


def test_base_paths_are_relative_to_the_file_that_names_them(tmp_path, monkeypatch):
    write(tmp_path / "shared" / "deeper" / "root.yaml", MINIMAL + "generate: {prompt: root}\n")
    write(tmp_path / "shared" / "mid.yaml", "base: deeper/root.yaml\ngenerate: {seed: 5}\n")
    top = write(tmp_path / "recipes" / "top.yaml", "base: ../shared/mid.yaml\ngenerate: {top_k: 3}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    g = resolve(top).generate
    assert (g.prompt, g.seed, g.top_k) == ("root", 5, 3)


def test_a_missing_base_names_the_missing_file_and_the_recipe_that_names_it(tmp_path):
    child = write(tmp_path / "child.yaml", "base: nowhere.yaml\n")
    p = only_problem(child)
    assert "nowhere.yaml" in str(p)
    assert "not found" in str(p)
    # The user has to know which recipe's `base:` is wrong.
    assert_names(p, source=child, key="base")


@pytest.mark.parametrize("chain", [["a"], ["a", "b"], ["a", "b", "c"]], ids=len)
def test_a_base_cycle_is_an_error_naming_the_chain(tmp_path, chain):
    for name, nxt in zip(chain, chain[1:] + chain[:1]):
        write(tmp_path / f"{name}.yaml", f"base: {nxt}.yaml\n")
    p = only_problem(tmp_path / f"{chain[0]}.yaml")
    assert p.key == "base"
    assert "cycle" in str(p)
    assert same_file(p.source, tmp_path / f"{chain[-1]}.yaml")  # the file whose base closes the loop
    names = [str(tmp_path / f"{n}.yaml") for n in chain + chain[:1]]
    assert " -> ".join(names) in str(p)


def test_a_cycle_through_other_directories_is_caught(tmp_path):
    write(tmp_path / "x" / "a.yaml", "base: ../y/b.yaml\n")
    write(tmp_path / "y" / "b.yaml", "base: ./../x/a.yaml\n")  # the same file, spelt differently
    p = only_problem(tmp_path / "x" / "a.yaml")
    assert "cycle" in str(p)


def test_base_must_be_a_path(tmp_path):
    child = write(tmp_path / "child.yaml", "base: [a.yaml, b.yaml]\n")
    assert_names(only_problem(child), source=child, key="base", parts=["a.yaml"])


# --- interpolation -------------------------------------------------------------------------


def test_interpolation_between_sections(tmp_path):
    path = write(tmp_path / "r.yaml", MINIMAL + "generate:\n  seed: ${model.arch.dim}\n  max_new_tokens: ${generate.seed}\n")
    g = resolve(path).generate
    assert (g.seed, g.max_new_tokens) == (64, 64)  # tiny-llama's dim, read through the spec layer
    assert resolve(path, ["model.arch.dim=96"]).generate.max_new_tokens == 96


def test_interpolation_is_resolved_after_every_layer_is_merged(tmp_path):
    write(tmp_path / "base.yaml", MINIMAL + "generate: {seed: '${generate.max_new_tokens}'}\n")
    child = write(tmp_path / "child.yaml", "base: base.yaml\ngenerate: {max_new_tokens: 42}\n")
    assert resolve(child).generate.seed == 42
    assert resolve(child, ["generate.max_new_tokens=9"]).generate.seed == 9


def test_interpolation_can_read_a_schema_default(recipe):
    # generate.top_k is set by no file: its value is the schema's default, which is still a value.
    assert resolve(recipe, ["generate.seed=${generate.top_k}"]).generate.seed == GenerateSection.top_k


def test_env_interpolation_with_a_default(tmp_path, monkeypatch):
    path = write(tmp_path / "r.yaml", MINIMAL + "generate: {prompt: '${oc.env:RUNNER_TEST_PROMPT,fallback}'}\n")
    monkeypatch.delenv("RUNNER_TEST_PROMPT", raising=False)
    assert resolve(path).generate.prompt == "fallback"
    monkeypatch.setenv("RUNNER_TEST_PROMPT", "from the environment")
    assert resolve(path).generate.prompt == "from the environment"


def test_a_broken_interpolation_names_the_key_and_the_reference(recipe):
    p = only_problem(recipe, ["generate.seed=${generate.nope}"])
    assert_names(p, source=f"{recipe}{COMMAND_LINE}", key="generate.seed", parts=["generate.nope"])


# --- relative paths ------------------------------------------------------------------------


def test_paths_are_relative_to_the_recipe_file_not_the_cwd(tmp_path, monkeypatch):
    path = write(tmp_path / "recipes" / "r.yaml", MINIMAL)
    monkeypatch.chdir(tmp_path)
    r = resolve("recipes/r.yaml")
    assert r.model.checkpoint == str(tmp_path / "recipes" / "weights" / "model.pth")
    assert r.tokenizer.path == str(tmp_path / "recipes" / "tok.model")
    assert resolve(path) == r


def test_paths_set_in_a_base_are_relative_to_the_base(tmp_path):
    write(tmp_path / "shared" / "base.yaml", MINIMAL)
    child = write(tmp_path / "child.yaml", "base: shared/base.yaml\ngenerate: {seed: 1}\n")
    r = resolve(child)
    assert r.model.checkpoint == str(tmp_path / "shared" / "weights" / "model.pth")
    assert r.tokenizer.path == str(tmp_path / "shared" / "tok.model")


def test_a_path_set_in_a_base_stays_relative_to_the_base_when_the_child_edits_its_section(tmp_path):
    # The child sets model.spec and tokenizer.kind, not the paths: those still come from the base.
    write(tmp_path / "shared" / "base.yaml", MINIMAL)
    child = write(tmp_path / "child.yaml", "base: shared/base.yaml\nmodel: {spec: stories15M}\ntokenizer: {kind: tiktoken}\n")
    r = resolve(child)
    assert r.model.checkpoint == str(tmp_path / "shared" / "weights" / "model.pth")
    assert r.tokenizer.path == str(tmp_path / "shared" / "tok.model")


def test_paths_given_on_the_command_line_are_relative_to_the_cwd(tmp_path, monkeypatch):
    path = write(tmp_path / "recipes" / "r.yaml", MINIMAL)
    cwd = tmp_path / "work"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    r = resolve(path, ["model.checkpoint=ck/m.pth", "tokenizer.path=../t.model"])
    assert r.model.checkpoint == str(cwd / "ck" / "m.pth")
    assert r.tokenizer.path == str(tmp_path / "t.model")


def test_overriding_a_sibling_key_does_not_move_a_path_to_the_cwd(tmp_path, monkeypatch):
    path = write(tmp_path / "recipes" / "r.yaml", MINIMAL)
    cwd = tmp_path / "work"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    r = resolve(path, ["tokenizer.kind=sentencepiece", "model.source=random:0"])
    assert r.tokenizer.path == str(tmp_path / "recipes" / "tok.model")
    assert r.model.checkpoint == str(tmp_path / "recipes" / "weights" / "model.pth")


def test_absolute_and_home_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = write(tmp_path / "r.yaml", MINIMAL)
    r = resolve(path, [f"model.checkpoint={tmp_path}/abs/m.pth", "tokenizer.path=~/t.model"])
    assert r.model.checkpoint == str(tmp_path / "abs" / "m.pth")
    assert r.tokenizer.path == str(tmp_path / "home" / "t.model")


def test_a_path_built_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNNER_HOME", str(tmp_path / "home"))
    path = write(tmp_path / "r.yaml", MINIMAL.replace("weights/model.pth", "'${oc.env:RUNNER_HOME,/nope}/tiny/model.pth'"))
    assert resolve(path).model.checkpoint == str(tmp_path / "home" / "tiny" / "model.pth")


# --- specs ---------------------------------------------------------------------------------


def spec_yaml(name: str) -> dict:
    return yaml.safe_load((REPO / "specs" / f"{name}.yaml").read_text())


def test_the_spec_is_merged_into_model_arch(recipe):
    arch = resolve(recipe).model.arch
    for key, value in spec_yaml("tiny-llama").items():
        assert getattr(arch, key) == value, key


def test_arch_fields_can_be_overridden_from_the_recipe_and_the_command_line(tmp_path):
    path = write(tmp_path / "r.yaml", MINIMAL.replace("  spec: tiny-llama\n", "  spec: tiny-llama\n  arch: {n_layers: 1, dim: 32}\n"))
    spec = spec_yaml("tiny-llama")
    arch = resolve(path).model.arch
    assert (arch.n_layers, arch.dim, arch.n_heads) == (1, 32, spec["n_heads"])
    arch = resolve(path, ["model.arch.dim=128", "model.arch.vocab_size=1000"]).model.arch
    assert (arch.n_layers, arch.dim, arch.vocab_size, arch.n_heads) == (1, 128, 1000, spec["n_heads"])


def test_a_spec_can_be_a_yaml_file_next_to_the_recipe(tmp_path, monkeypatch):
    write(tmp_path / "specs" / "mine.yaml", (REPO / "specs" / "tiny-llama.yaml").read_text().replace("dim: 64", "dim: 32"))
    path = write(tmp_path / "recipes" / "r.yaml", MINIMAL.replace("spec: tiny-llama", "spec: ../specs/mine.yaml"))
    monkeypatch.chdir(tmp_path / "recipes")
    assert resolve(path).model.arch.dim == 32
    # Like model.checkpoint, the path is the recipe's, whatever the cwd.
    monkeypatch.chdir(tmp_path)
    assert resolve(path).model.arch.dim == 32


@pytest.mark.parametrize("folder", ["stories15M", "STORIES15m", "Stories15M"])
def test_the_spec_is_inferred_from_the_checkpoint_folder(tmp_path, folder):
    path = write(tmp_path / "r.yaml", MINIMAL.replace("  spec: tiny-llama\n", "").replace("weights/", f"{folder}/"))
    r = resolve(path)
    assert r.model.spec is None
    for key, value in spec_yaml("stories15M").items():
        assert getattr(r.model.arch, key) == value, key
    assert resolve(path, ["model.arch.n_layers=2"]).model.arch.n_layers == 2


def test_an_explicit_spec_beats_the_checkpoint_folder(tmp_path):
    path = write(tmp_path / "r.yaml", MINIMAL.replace("weights/", "stories15M/"))
    assert resolve(path).model.arch.dim == spec_yaml("tiny-llama")["dim"]


def test_an_uninferable_spec_lists_the_known_ones(tmp_path):
    path = write(tmp_path / "r.yaml", MINIMAL.replace("  spec: tiny-llama\n", "").replace("weights/", "my-model/"))
    p = only_problem(path)
    assert_names(p, source=path, key="model.spec", parts=["my-model", *known_specs()])


def test_a_full_arch_needs_no_spec(tmp_path):
    arch = "\n".join(f"    {k}: {v}" for k, v in spec_yaml("tiny-llama").items())
    path = write(tmp_path / "r.yaml", MINIMAL.replace("  spec: tiny-llama\n", f"  arch:\n{arch}\n"))
    assert resolve(path).model.arch == resolve(write(tmp_path / "s.yaml", MINIMAL)).model.arch


def test_an_unknown_spec_lists_the_known_ones(recipe):
    p = only_problem(recipe, ["model.spec=llama-9"])
    assert_names(p, source=f"{recipe}{COMMAND_LINE}", key="model.spec", parts=["'llama-9'", *known_specs()])


def test_known_specs_are_the_shipped_files():
    assert known_specs() == sorted(p.stem for p in SPEC_FILES)
    assert "tiny-llama" in known_specs()


@pytest.mark.parametrize("spec_file", SPEC_FILES, ids=lambda p: p.stem)
def test_every_shipped_spec_resolves(recipe, spec_file):
    arch = resolve(recipe, [f"model.spec={spec_file.stem}"]).model.arch
    declared = yaml.safe_load(spec_file.read_text())
    assert declared, "a spec file must declare the architecture"
    for key, value in declared.items():
        got = getattr(arch, key)
        if dataclasses.is_dataclass(got):  # the fields the file declares; the rest keep their defaults
            got = {k: v for k, v in dataclasses.asdict(got).items() if k in value}
        assert got == value, key
    assert load_spec(spec_file.stem) == arch
    assert load_spec(str(spec_file)) == arch
    assert arch.n_heads % arch.kv_heads == 0 and arch.head_size % 2 == 0


@pytest.mark.parametrize("recipe_file", RECIPE_FILES, ids=lambda p: p.name)
def test_every_shipped_recipe_resolves(recipe_file, tmp_path, monkeypatch):
    monkeypatch.setenv("RUNNER_HOME", str(tmp_path / "home"))
    r = resolve(recipe_file)
    assert isinstance(r, Recipe)
    assert os.path.isabs(r.model.checkpoint)
    assert r.tokenizer.path is None or os.path.isabs(r.tokenizer.path)
    assert "${" not in to_yaml(r)
    # What `runner show` prints is itself a recipe that resolves to the same thing.
    shown = write(tmp_path / "shown.yaml", to_yaml(r))
    assert resolve(shown) == r


def test_shipped_recipes_exist():
    assert any(p.name == "tiny-random.yaml" for p in RECIPE_FILES)


# --- errors: unknown keys ------------------------------------------------------------------


@pytest.mark.parametrize(
    "typo, suggestion",
    [
        ("generate.temprature", "generate.temperature"),
        ("generate.max_new_token", "generate.max_new_tokens"),
        ("generate.topk", "generate.top_k"),
        ("model.arch.rope_thta", "model.arch.rope_theta"),
        ("model.arch.n_kv_head", "model.arch.n_kv_heads"),
        ("model.chekpoint", "model.checkpoint"),
        ("tokenizer.pth", "tokenizer.path"),
        ("dtyp", "dtype"),
        ("paralel", "parallel"),
    ],
)
def test_an_unknown_key_suggests_the_closest_valid_key(tmp_path, recipe, typo, suggestion):
    p = only_problem(recipe, [f"{typo}=1"])
    assert_names(p, source=f"{recipe}{COMMAND_LINE}", key=typo, parts=[f"did you mean {suggestion}?", "1"])

    *sections, leaf = typo.split(".")
    nested = leaf + ": 1"
    for section in reversed(sections):
        nested = f"{section}:\n" + textwrap.indent(nested, "  ")
    in_file = write(tmp_path / "typo.yaml", "base: recipe.yaml\n" + nested + "\n")
    p = only_problem(in_file)
    assert_names(p, source=in_file, key=typo, parts=[suggestion])


def test_a_top_level_key_with_no_close_match_lists_the_valid_keys(recipe):
    p = only_problem(recipe, ["zzzz=1"])
    assert_names(p, source=f"{recipe}{COMMAND_LINE}", key="zzzz", parts=[f.name for f in dataclasses.fields(Recipe)])
    assert "did you mean" not in str(p)


@pytest.mark.parametrize("typo", ["generate.qqqqqqqq", "tokenizer.xyz", "model.arch.zz"])
def test_a_nested_key_with_no_close_match_lists_that_sections_keys(recipe, typo):
    section = {"generate": GenerateSection, "tokenizer": TokenizerSection, "model.arch": ModelSpec}[typo.rsplit(".", 1)[0]]
    p = only_problem(recipe, [f"{typo}=1"])
    assert_names(p, key=typo, parts=[f.name for f in dataclasses.fields(section)])
    assert "did you mean" not in str(p)  # no resemblance: a suggestion would only mislead


VALID_KEYS = schema_keys()


@HYPOTHESIS
@given(key=st.sampled_from([k for k in VALID_KEYS if len(k.rsplit(".", 1)[-1]) >= 5]), data=st.data())
def test_a_one_letter_typo_suggests_a_key_at_least_as_close(recipe, key, data):
    *sections, leaf = key.split(".")
    i = data.draw(st.integers(0, len(leaf) - 1), label="position")
    edit = data.draw(st.sampled_from(["delete", "double", "swap"]), label="edit")
    leaf = {"delete": leaf[:i] + leaf[i + 1:], "double": leaf[:i] + leaf[i] + leaf[i:],
            "swap": leaf[:i] + leaf[i + 1:i + 2] + leaf[i:i + 1] + leaf[i + 2:]}[edit]
    typo = ".".join([*sections, leaf])
    assume(typo not in VALID_KEYS)
    p = only_problem(recipe, [f"{typo}=1"])
    assert p.key == typo
    text = str(p)
    assert "did you mean " in text, text
    suggested = text.split("did you mean ", 1)[1].split("?", 1)[0]
    assert suggested in VALID_KEYS
    assert levenshtein(suggested, typo) <= levenshtein(key, typo), (typo, suggested, key)


@HYPOTHESIS
@given(name=st.from_regex(r"[a-z_][a-z0-9_]{0,15}", fullmatch=True))
def test_an_unknown_key_is_never_silently_accepted(recipe, name):
    assume(name not in {f.name for f in dataclasses.fields(GenerateSection)})
    p = only_problem(recipe, [f"generate.{name}=1"])
    assert_names(p, source=f"{recipe}{COMMAND_LINE}", key=f"generate.{name}", parts=["unknown key"])


# --- errors: types and ranges --------------------------------------------------------------


def test_a_wrong_type_names_key_value_and_type(recipe):
    p = only_problem(recipe, ["generate.max_new_tokens=abc"])
    assert_names(p, source=f"{recipe}{COMMAND_LINE}", key="generate.max_new_tokens", parts=["abc"])
    assert "int" in str(p).lower()


@pytest.mark.parametrize("key, bad, enum", [("dtype", "fp8", DType), ("tokenizer.kind", "bpe", TokenizerKind)])
def test_a_bad_enum_value_lists_the_allowed_ones(recipe, key, bad, enum):
    p = only_problem(recipe, [f"{key}={bad}"])
    assert_names(p, source=f"{recipe}{COMMAND_LINE}", key=key, parts=[bad, *(m.value for m in enum)])


def test_a_wrong_type_in_a_file_is_attributed_to_the_file(tmp_path):
    path = write(tmp_path / "r.yaml", MINIMAL + "dtype: fp8\ngenerate: {top_k: many}\n")
    ps = problems_of(path)
    assert sorted(p.key for p in ps) == ["dtype", "generate.top_k"]
    for p in ps:
        assert_names(p, source=path)
    assert "many" in str(next(p for p in ps if p.key == "generate.top_k"))


def test_a_scalar_where_a_section_belongs(recipe):
    assert_names(only_problem(recipe, ["generate=3"]), key="generate", parts=["section", "3"])


@pytest.mark.parametrize(
    "override, key, allowed",
    [
        ("generate.max_new_tokens=0", "generate.max_new_tokens", ">= 1"),
        ("generate.max_new_tokens=-5", "generate.max_new_tokens", ">= 1"),
        ("generate.temperature=-0.5", "generate.temperature", ">= 0"),
        ("generate.top_p=0", "generate.top_p", "(0, 1]"),
        ("generate.top_p=1.5", "generate.top_p", "(0, 1]"),
        ("generate.top_k=0", "generate.top_k", ">= 1"),
        ("generate.num_samples=0", "generate.num_samples", ">= 1"),
        ("generate.cache_len=1", "generate.cache_len", ">= 2"),
        ("threads=0", "threads", ">= 1"),
        ("device=tpu", "device", "cuda"),
        ("model.arch.dim=0", "model.arch.dim", ">= 1"),
        ("model.arch.rope_theta=0", "model.arch.rope_theta", "> 0"),
        ("quant.activations=int8", "quant.activations", "int4 modes (int4, int4-gptq) and gguf only"),
    ],
)
def test_an_out_of_range_value_names_key_value_and_range(recipe, override, key, allowed):
    value = override.split("=", 1)[1]
    p = next(p for p in problems_of(recipe, [override]) if p.key == key)
    assert_names(p, source=f"{recipe}{COMMAND_LINE}", key=key, parts=[allowed])
    assert p.has_value and p.value == yaml.safe_load(value)


def top_p_refused(recipe, value: float) -> Problem | None:
    try:
        r = resolve(recipe, [f"generate.top_p={value!r}"])
    except ConfigError as e:
        [p] = e.problems
        return p
    assert r.generate.top_p == value
    return None


@HYPOTHESIS
@given(value=st.floats(allow_nan=True, allow_infinity=True).filter(lambda x: not 0 < x <= 1))
def test_every_top_p_outside_0_1_is_refused(recipe, value):
    p = top_p_refused(recipe, value)
    assert p is not None, value
    assert_names(p, key="generate.top_p", parts=["(0, 1]"])
    assert p.value == value or (math.isnan(p.value) and math.isnan(value))


@HYPOTHESIS
@given(value=st.floats(min_value=0, max_value=1, exclude_min=True))
def test_every_top_p_inside_0_1_is_accepted(recipe, value):
    assert top_p_refused(recipe, value) is None


@HYPOTHESIS
@given(value=st.floats(max_value=0, exclude_max=True, allow_infinity=True))
def test_every_negative_temperature_is_refused(recipe, value):
    p = only_problem(recipe, [f"generate.temperature={value!r}"])
    assert_names(p, key="generate.temperature", parts=[">= 0"])
    assert p.value == value


@HYPOTHESIS
@given(key=st.sampled_from(["max_new_tokens", "top_k", "num_samples"]), value=st.integers(max_value=0))
def test_every_count_below_one_is_refused(recipe, key, value):
    p = only_problem(recipe, [f"generate.{key}={value}"])
    assert_names(p, key=f"generate.{key}", parts=[">= 1", repr(value)])


@HYPOTHESIS
@given(key=st.sampled_from(["max_new_tokens", "top_k", "num_samples"]), value=st.integers(min_value=1, max_value=2**62))
def test_every_count_from_one_is_accepted(recipe, key, value):
    assert getattr(resolve(recipe, [f"generate.{key}={value}"]).generate, key) == value


def test_an_override_without_equals_sign(recipe):
    p = only_problem(recipe, ["generate.max_new_tokens"])
    assert_names(p, source=f"{recipe}{COMMAND_LINE}", parts=["key=value", "generate.max_new_tokens"])


def test_missing_required_keys_are_named(tmp_path):
    path = write(tmp_path / "r.yaml", "model: {spec: tiny-llama}\n")
    ps = problems_of(path)
    assert sorted(p.key for p in ps) == ["model.checkpoint", "tokenizer.kind"]
    assert all("required" in str(p) for p in ps)


def test_tokenizer_path_is_required_at_run_time_without_a_model_source(tmp_path):
    path = write(tmp_path / "r.yaml", "model: {spec: tiny-llama, checkpoint: m.pth}\ntokenizer: {kind: gguf}\n")
    p = next(p for p in problems_of(path, check_files=True) if p.key == "tokenizer.path")
    assert_names(p, source=path, key="tokenizer.path", parts=["required", "model.source"])


# --- errors: files -------------------------------------------------------------------------


def test_check_files_reports_a_missing_checkpoint_and_tokenizer(recipe, tmp_path):
    ps = problems_of(recipe, check_files=True)
    assert sorted(p.key for p in ps) == ["model.checkpoint", "tokenizer.path"]
    for p in ps:
        assert_names(p, source=recipe, parts=["not found", str(tmp_path)])
    assert "model.source" in str(next(p for p in ps if p.key == "model.checkpoint"))
    resolve(recipe)  # without check_files, missing files are no problem


def test_check_files_accepts_a_missing_checkpoint_with_a_source(recipe, tmp_path):
    (tmp_path / "tok.model").write_bytes(b"")
    resolve(recipe, ["model.source=random:0"], check_files=True)
    p = only_problem(recipe, check_files=True)
    assert_names(p, source=recipe, key="model.checkpoint", parts=[str(tmp_path / "weights" / "model.pth")])
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "model.pth").write_bytes(b"")
    resolve(recipe, check_files=True)


def test_a_missing_recipe_file(tmp_path):
    p = only_problem(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(p) and "not found" in str(p)


@pytest.mark.parametrize("in_base", [False, True], ids=["recipe", "base"])
def test_malformed_yaml_shows_file_and_line(tmp_path, in_base):
    bad = write(tmp_path / "bad.yaml", "model:\n  spec: tiny-llama\n  checkpoint: x\n bad: [\n")
    target = write(tmp_path / "child.yaml", "base: bad.yaml\n") if in_base else bad
    p = only_problem(target)
    assert f"{bad}:4" in str(p)
    assert "YAML" in str(p)


def test_a_recipe_that_is_not_a_mapping(tmp_path):
    path = write(tmp_path / "list.yaml", "- a\n- b\n")
    assert_names(only_problem(path), source=path, parts=["mapping", "list"])


def test_a_section_repeated_in_one_file_is_an_error(tmp_path):
    # PyYAML keeps the last of two equal keys: the first `generate:` block would vanish silently.
    path = write(tmp_path / "r.yaml", MINIMAL + "generate: {max_new_tokens: 5}\ndevice: cpu\ngenerate: {seed: 1}\n")
    p = only_problem(path)
    assert f"{path}:" in str(p) and "generate" in str(p)


def test_an_empty_recipe_reports_what_is_required(tmp_path):
    path = write(tmp_path / "empty.yaml", "")
    assert {"model.checkpoint", "tokenizer.kind"} <= {p.key for p in problems_of(path)}


# --- errors: all at once, and attributed to the right file ---------------------------------


def test_several_bad_keys_are_all_reported(tmp_path):
    path = write(tmp_path / "r.yaml", MINIMAL.replace("  spec: tiny-llama\n", "  spec: tiny-llama\n  arch: {rope_thta: 3}\n")
                 + "generate: {temprature: 1, top_kk: 2}\n")
    ps = problems_of(path)
    assert sorted(p.key for p in ps) == ["generate.temprature", "generate.top_kk", "model.arch.rope_thta"]
    for p in ps:
        assert_names(p, source=path)


def test_several_out_of_range_values_are_all_reported(recipe):
    ps = problems_of(recipe, ["generate.max_new_tokens=0", "generate.temperature=-1", "generate.top_k=0"])
    assert sorted(p.key for p in ps) == ["generate.max_new_tokens", "generate.temperature", "generate.top_k"]


def test_problems_of_different_kinds_are_all_reported_at_once(recipe):
    # An unknown key, a wrong type and a value out of range: the user should see all three in one run.
    ps = problems_of(recipe, ["generate.temprature=1", "dtype=fp8", "generate.max_new_tokens=0"])
    assert sorted(p.key for p in ps) == ["dtype", "generate.max_new_tokens", "generate.temprature"]


def test_a_value_set_in_a_base_is_attributed_to_the_base(tmp_path):
    base = write(tmp_path / "base.yaml", MINIMAL + "generate: {max_new_tokens: 0}\n")
    child = write(tmp_path / "child.yaml", "base: base.yaml\ndevice: cpu\n")
    assert_names(only_problem(child), source=base, key="generate.max_new_tokens", parts=["0", ">= 1"])


def test_a_value_set_in_a_base_is_attributed_to_the_base_when_the_child_edits_its_section(tmp_path):
    base = write(tmp_path / "base.yaml", MINIMAL + "generate: {max_new_tokens: 0}\n")
    child = write(tmp_path / "child.yaml", "base: base.yaml\ngenerate: {seed: 3}\n")
    assert_names(only_problem(child), source=base, key="generate.max_new_tokens")
    # Nor does a command-line override of a sibling key take the blame.
    assert_names(only_problem(child, ["generate.top_k=5"]), source=base, key="generate.max_new_tokens")


def test_a_value_set_on_the_command_line_is_attributed_to_the_command_line(tmp_path, monkeypatch):
    write(tmp_path / "recipes" / "r.yaml", MINIMAL + "generate: {max_new_tokens: 5}\n")
    monkeypatch.chdir(tmp_path)
    p = only_problem("recipes/r.yaml", ["generate.max_new_tokens=0"])
    assert_names(p, source="recipes/r.yaml (command line)", key="generate.max_new_tokens", parts=["0"])


@pytest.fixture
def own_specs(tmp_path, monkeypatch) -> Path:
    """A specs/ folder of the test's own: tiny-llama with a typo, and tiny-llama with 3 kv heads for 4 heads."""
    specs = tmp_path / "specs"
    tiny = (REPO / "specs" / "tiny-llama.yaml").read_text()
    write(specs / "typo.yaml", tiny + "dimm: 3\n")
    write(specs / "odd.yaml", tiny.replace("n_kv_heads: 2", "n_kv_heads: 3"))
    monkeypatch.setattr(specs_module, "SPECS_DIR", specs)
    return specs


def test_an_unknown_key_in_a_spec_is_attributed_to_the_spec_file(tmp_path, own_specs):
    path = write(tmp_path / "r.yaml", MINIMAL.replace("tiny-llama", "typo"))
    assert_names(only_problem(path), source=own_specs / "typo.yaml", key="model.arch.dimm", parts=["model.arch.dim"])


def test_a_bad_value_from_the_spec_is_attributed_to_the_spec_file(tmp_path, own_specs):
    path = write(tmp_path / "r.yaml", MINIMAL.replace("tiny-llama", "odd"))
    assert_names(only_problem(path), source=own_specs / "odd.yaml", key="model.arch.n_kv_heads", parts=["3", "n_heads"])
