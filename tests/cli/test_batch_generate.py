"""generate.num_samples and generate.prompts decode their rows as one batch: each row prints what it
would alone (sample j seeded with generate.seed + j), stop strings cut each row, and speculative
decoding, which decodes one row, refuses a prompts list by name."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "recipes" / "tiny-random.yaml")


def run(*overrides: str, recipe: str = TINY) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runner", recipe, "generate.max_new_tokens=24", *overrides],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def texts(result: subprocess.CompletedProcess) -> list[str]:
    """Each row's printed text, in order (the lines between the --- headers, the figures line cut)."""
    assert result.returncode == 0, result.stderr
    body = result.stdout.rsplit("\n", 2)[0]  # the last line is the batch's figures
    return [chunk.split("\n", 1)[1].rstrip("\n") for chunk in body.split("--- ")[1:]]


def alone(*overrides: str, recipe: str = TINY) -> str:
    result = run(*overrides, recipe=recipe)
    assert result.returncode == 0, result.stderr
    return result.stdout.rsplit("\n", 2)[0]


@pytest.mark.parametrize("kernels", ["auto", "torch"])
def test_samples_decoded_together_are_each_seeds_sample_alone(kernels):
    together = run("generate.num_samples=3", f"kernels={kernels}", "generate.seed=7")
    rows = texts(together)
    assert len(rows) == 3 and len(set(rows)) == 3  # three different samples
    assert "3 rows decoded together: " in together.stdout
    for j, text in enumerate(rows):
        assert text == alone(f"generate.seed={7 + j}", f"kernels={kernels}")


def test_prompts_are_decoded_together_each_as_alone_greedy():
    prompts = ["Once upon a time", "The little cat", "One two three"]
    rows = texts(run("generate.prompts=" + json.dumps(prompts), "generate.temperature=0"))
    assert [text == alone("generate.prompt=" + p, "generate.temperature=0") for p, text in zip(prompts, rows)] == [True] * 3
    moe = str(ROOT / "recipes" / "tiny-moe.yaml")
    rows = texts(run("generate.prompts=" + json.dumps(prompts), "generate.temperature=0", recipe=moe))
    assert rows == [alone("generate.prompt=" + p, "generate.temperature=0", recipe=moe) for p in prompts]


def test_a_stop_string_cuts_only_its_own_row():
    prompts = ["Once upon a time", "The little cat"]
    full = texts(run("generate.prompts=" + json.dumps(prompts), "generate.temperature=0"))
    stop = full[0][len(prompts[0]) + 4:len(prompts[0]) + 9]
    assert stop not in full[1]
    cut = texts(run("generate.prompts=" + json.dumps(prompts), "generate.temperature=0",
                    "generate.stop=" + json.dumps([stop])))
    assert cut == [full[0][:len(prompts[0]) + 4], full[1]]


def test_prompts_with_speculative_decoding_is_a_recipe_error():
    result = run('generate.prompts=["a", "b"]', "draft.kind=ngram")
    assert result.returncode == 2 and "generate.prompts" in result.stderr and "Traceback" not in result.stderr
    assert run('generate.prompts=["a", ""]').returncode == 2
