"""A tiny random pipeline (recipes/tiny-random.yaml) as an lm-eval model, and lm-eval requests."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's bars, per call
ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "recipes" / "tiny-random.yaml")


@pytest.fixture(scope="session")
def runner_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runner-home")


def build(home: Path, *overrides: str, batch_size: int = 4):
    """RunnerLM over the tiny random recipe, eager torch ops in float32 (the reference's math)."""
    from runner import pipeline
    from runner.recipes import load as resolve
    from runner.eval.adapter import RunnerLM

    os.environ["RUNNER_HOME"] = str(home)
    recipe = resolve(TINY, ["generate.temperature=0", *overrides], check_files=True)
    return RunnerLM(pipeline.build(recipe, TINY), batch_size)


@pytest.fixture(scope="session")
def tiny_lm(runner_home):
    return build(runner_home, "model.arch.max_seq_len=48", "kernels=torch")


def request(kind: str, *args):
    from lm_eval.api.instance import Instance

    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def logits_of(model, ids: list[int]) -> torch.Tensor:
    """[T, V] float64 log-probabilities from one batch-1 forward of `ids`."""
    with torch.inference_mode():
        model.setup_cache(1, len(ids))
        logits = model(torch.tensor([ids]), torch.arange(len(ids)))[0]
    return torch.log_softmax(logits.double(), dim=-1)
