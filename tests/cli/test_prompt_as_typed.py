"""A command-line value for a string key is the text the user typed, whatever YAML would make of
it: code, "Q: ... A:", `null`, `[a]`, `{x}`, numbers, quotes, newlines (issue: prompts as typed)."""
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.config.errors import ConfigError
from runner.config.resolve import resolve
from runner.recipes import load

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "recipes" / "tiny-random.yaml")
# What YAML reads as something else than the text: the edge cases, then any printable text.
TRICKY = st.sampled_from(["def fibonacci(n):", "Q: what? A:", "Note: x", "null", "~", "true", "no", "[a]", "{x: 1}",
                          "- dash", "# comment", "42", "1e3", "'quoted'", '"double"', "a: b: c", "key=value", "",
                          "line one\nline two: yes", " padded ", "&anchor", "*alias", "!tag x", "%", "@", "`"])
TEXT = TRICKY | st.text(st.characters(codec="utf-8", exclude_categories=("Cs",), exclude_characters="\x00"), max_size=80)


@settings(max_examples=200, deadline=None)
@given(TEXT.filter(lambda t: "${" not in t and "\\$" not in t))
def test_any_text_reaches_the_recipe_unchanged(text):
    assert resolve(TINY, [f"generate.prompt={text}"]).generate.prompt == text


def test_interpolation_still_works_on_the_command_line():
    recipe = resolve(TINY, ["generate.prompt=${model.spec} says hi"])
    assert recipe.generate.prompt == f"{recipe.model.spec} says hi"


def test_a_mapping_where_a_string_belongs_in_a_file_is_an_error(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base: {TINY}\ngenerate:\n  prompt: {{a: 1}}\n")
    with pytest.raises(ConfigError, match="generate.prompt"):
        resolve(recipe)


def test_code_with_a_colon_runs_from_the_command_line():
    run = subprocess.run([sys.executable, "-m", "runner", TINY, "generate.prompt=def f(n):", "generate.max_new_tokens=3"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("def f(n):")


def test_a_prompt_file_is_read_as_it_is(tmp_path):
    text = "Q: why?\nA: because: {it} is [so] # really\n"
    (tmp_path / "p.txt").write_text(text)
    assert load(TINY, [f"generate.prompt_file={tmp_path / 'p.txt'}"]).generate.prompt == text


def test_resolve_keeps_the_prompt_file_unread(tmp_path):
    (tmp_path / "p.txt").write_text("from the file")
    recipe = resolve(TINY, [f"generate.prompt_file={tmp_path / 'p.txt'}"])
    assert recipe.generate.prompt_file == str(tmp_path / "p.txt")
    assert recipe.generate.prompt != "from the file"
    # Nor does it look at the file: a missing one is for the reading step to report.
    assert resolve(TINY, [f"generate.prompt_file={tmp_path / 'missing.txt'}"]).generate.prompt_file.endswith("missing.txt")


def test_a_prompt_file_in_a_recipe_is_found_beside_it_and_a_command_line_prompt_wins(tmp_path):
    (tmp_path / "p.txt").write_text("from the file")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base: {TINY}\ngenerate:\n  prompt_file: p.txt\n")
    assert load(recipe).generate.prompt == "from the file"
    assert load(recipe, ["generate.prompt=typed"]).generate.prompt == "typed"
    assert resolve(recipe, ["generate.prompt=typed"]).generate.prompt_file is None


def test_a_command_line_prompt_file_wins_over_a_recipe_prompt(tmp_path):
    (tmp_path / "p.txt").write_text("from the file")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base: {TINY}\ngenerate:\n  prompt: typed\n")
    assert load(recipe, [f"generate.prompt_file={tmp_path / 'p.txt'}"]).generate.prompt == "from the file"


def test_naming_both_in_one_place_or_a_missing_file_is_an_error(tmp_path):
    (tmp_path / "p.txt").write_text("x")
    with pytest.raises(ConfigError, match="generate.prompt_file: and generate.prompt are both set here"):
        load(TINY, [f"generate.prompt_file={tmp_path / 'p.txt'}", "generate.prompt=y"])
    with pytest.raises(ConfigError, match="generate.prompt_file: cannot read it"):
        load(TINY, [f"generate.prompt_file={tmp_path / 'missing.txt'}"])


def test_an_unreadable_prompt_file_is_blamed_on_the_file_that_names_it(tmp_path):
    (tmp_path / "base.yaml").write_text(f"base: {TINY}\ngenerate:\n  prompt_file: missing.txt\n")
    (tmp_path / "r.yaml").write_text("base: base.yaml\n")
    with pytest.raises(ConfigError) as info:
        load(tmp_path / "r.yaml")
    [p] = info.value.problems
    assert (p.source, p.key, p.value) == (str(tmp_path / "base.yaml"), "generate.prompt_file", str(tmp_path / "missing.txt"))
    with pytest.raises(ConfigError) as info:
        load(tmp_path / "r.yaml", ["generate.prompt_file=nope.txt"])
    assert info.value.problems[0].source == f"{tmp_path / 'r.yaml'} (command line)"


def test_a_prompt_from_standard_input():
    run = subprocess.run([sys.executable, "-m", "runner", TINY, "generate.prompt_file=-", "generate.max_new_tokens=3"],
                         cwd=ROOT, input="piped: in\n", capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("piped: in\n")
