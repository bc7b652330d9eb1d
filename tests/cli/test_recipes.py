"""Shipped recipes whose weights cannot be here: they resolve, and running them says what to do."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def runner(*args, home):
    env = {"RUNNER_HOME": str(home), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "runner", *args], capture_output=True, text=True, cwd=REPO, env=env)


@pytest.mark.parametrize("recipe", ["recipes/llama2-7b-spec.yaml", "recipes/llama3.1-70b-spec.yaml"])
def test_a_recipe_without_weights_names_the_checkpoint_and_the_prepare_command(recipe, tmp_path):
    shown = runner("show", recipe, home=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "kind: model" in shown.stdout
    ran = runner(recipe, home=tmp_path)
    assert ran.returncode == 2
    assert "Traceback" not in ran.stderr
    assert str(tmp_path) in ran.stderr and "model.pth" in ran.stderr
    assert f"runner prepare {recipe}" in ran.stderr
    assert not any(tmp_path.rglob("*.pth"))  # nothing fetched or written


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path):
    ran = runner("recipes/tiny-random.yaml", "model.arch.vocab_size=100", home=tmp_path)
    assert ran.returncode == 2
    assert "tokenizer" in ran.stderr and "512" in ran.stderr and "100" in ran.stderr
    assert "Traceback" not in ran.stderr
