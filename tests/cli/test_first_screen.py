"""The first screen: `runner` alone shows the help and the recipes with what each is for;
`runner list recipes` lists them; a mistyped recipe name suggests the closest one."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def runner(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runner", *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def first_comment_words(path: Path) -> str:
    return path.read_text().splitlines()[0].lstrip("#").split()[0]


def test_runner_alone_prints_the_help_then_every_recipe_with_its_description():
    run = runner()
    assert run.returncode == 0
    assert run.stdout.index("Usage: runner") < run.stdout.index("Recipes in ./recipes")
    listed = run.stdout[run.stdout.index("Recipes in ./recipes"):].splitlines()[1:]
    assert len(listed) == len(RECIPES)
    for line, path in zip(listed, RECIPES):
        name, description = line.split(maxsplit=1)
        assert name == f"recipes/{path.name}"
        assert description.startswith(first_comment_words(path))
    assert runner("list", "recipes").stdout == run.stdout[run.stdout.index("Recipes in ./recipes"):]


def test_outside_the_project_it_says_there_are_no_recipes_here(tmp_path):
    run = runner("list", "recipes", cwd=tmp_path)
    assert run.returncode == 0 and "No recipes in ./recipes" in run.stdout


def test_a_mistyped_recipe_suggests_the_closest_name():
    for typo, meant in (("recipes/smolm2-135m.yaml", "smollm2-135m.yaml"),
                        ("recipes/smollm2-135m-fats.yaml", "smollm2-135m-fast.yaml"),
                        ("recipes/tiny_random.yaml", "tiny-random.yaml")):
        run = runner(typo)
        assert run.returncode == 2
        [line] = run.stderr.splitlines()
        assert line.endswith(f"file not found; did you mean {ROOT / 'recipes' / meant}?"), line
    run = runner("recipes/nothing-like-it-at-all.yaml")
    assert run.returncode == 2 and run.stderr.strip().endswith("file not found")


def test_a_recipe_path_the_os_refuses_is_one_error_line():
    run = runner("show", "r" * 300 + ".yaml")
    assert run.returncode == 2 and "Traceback" not in run.stderr
    [line] = run.stderr.splitlines()
    assert line.startswith("error: ") and "name too long" in line.lower()
