"""The matrix's tiny random recipes, a RUNNER_HOME of their own, and greedy decoding through the
whole pipeline (shared by test_pipeline and test_families)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from runner import generate as generating
from runner import kernels, pipeline
from runner.config.schema import FAMILIES
from runner.recipes import load as resolve
from tests.helpers import gguf_families
from tests.loaders import writers

ROOT = Path(__file__).resolve().parents[2]
# tiny-moe: 4 experts, top 2, a 32-token window; tiny-FAMILY: that family's features (specs/tiny-*.yaml)
RECIPES = {"dense": "tiny-random.yaml", "moe": "tiny-moe.yaml",
           **{family: f"tiny-{family}.yaml" for family in FAMILIES if family != "llama"}}
CALIBRATION = " ".join(["Once upon a time there was a little model that learned to count: one, two, three."] * 40)
PROMPT = "one two three one two three one two"  # 8 words; with 24 new tokens past tiny-moe's 32-token window


def selected(variable: str, every: list[str]) -> list[str]:
    """The values the comma list in `variable` names, each one of `every`; all of `every` where unset."""
    chosen = [value for value in os.environ.get(variable, "").split(",") if value]
    unknown = [value for value in chosen if value not in every]
    if unknown:
        raise ValueError(f"{variable}: {', '.join(unknown)} is not one of {', '.join(every)}")
    return chosen or every


def recipe_path(model: str) -> str:
    """The recipe file of a RECIPES key."""
    return str(ROOT / "recipes" / RECIPES[model])


@pytest.fixture(scope="session", autouse=True)
def kernels_loaded():
    """runner's kernels built (once, into the RUNNER_HOME the run was given) before the tests move
    RUNNER_HOME to a folder of their own: a process loads them once, so no test builds them anew."""
    try:
        kernels.load()
    except kernels.KernelsUnavailable:
        pass  # kernels: auto runs on torch's ops then, with its note


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """The random checkpoints' RUNNER_HOME, with a calibration text for GPTQ."""
    path = tmp_path_factory.mktemp("home")
    (path / "calibration.txt").write_text(CALIBRATION)
    return path


@pytest.fixture(autouse=True)
def runner_home(home, monkeypatch):
    monkeypatch.setenv("RUNNER_HOME", str(home))


def quant_overrides(mode: str, home: Path, model: str = "dense") -> list[str]:
    """quant.mode=`mode`, with a groupsize for int4, a small calibration for GPTQ, and for gguf
    the `model`'s random weights as a GGUF file to run."""
    out = [f"quant.mode={mode}"]
    if mode == "gguf":
        out.append(f"model.checkpoint={gguf_file(model, home)}")
    if mode.startswith("int4"):
        out.append("quant.groupsize=32")
    if mode == "int4-gptq":
        out += [f"quant.calibration.path={home / 'calibration.txt'}", "quant.calibration.samples=4",
                "quant.calibration.seq_len=32"]
    return out


def gguf_file(model: str, home: Path) -> Path:
    """`model`'s tiny recipe as a GGUF file of random weights, written once into `home`: its
    matrices in Q4_1 (blocks of 32, a scale and a min), its embedding too, as llama.cpp's
    converter lays the file out."""
    path = home / f"{model}.Q4_1.gguf"
    if not path.exists():
        spec = resolve(recipe_path(model), [], check_files=False).model.arch
        hf_state = gguf_families.to_hf(gguf_families.native_state(spec, seed=0), spec)
        if spec.family == "llama":
            writers.save_gguf(path, hf_state, spec, writers.Q.Q4_1)
        else:
            gguf_families.write_gguf(path, hf_state, spec, writers.Q.Q4_1)
    return path


def build(recipe_file: str, overrides: list[str], prompt: str = PROMPT, tokens: int = 24,
          note=None) -> pipeline.Pipeline:
    """The recipe's pipeline for greedy decoding of `tokens` new tokens after `prompt`; `note`
    hears its status lines."""
    recipe = resolve(recipe_file, overrides + ["generate.temperature=0", f"generate.max_new_tokens={tokens}",
                                               f"generate.prompt={prompt}"], check_files=True)
    return pipeline.build(recipe, recipe_file, note)


def greedy(recipe_file: str, overrides: list[str], prompt: str = PROMPT, tokens: int = 24) -> tuple[list[int], object]:
    """Greedy tokens and statistics of the recipe's pipeline for `prompt`."""
    built = build(recipe_file, overrides, prompt, tokens)
    return generating.generate(built, generating.encode_prompt(built, recipe_file))
