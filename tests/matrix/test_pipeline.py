"""The correctness matrix: every quant mode x draft kind x model (dense, mixture of experts, and a
tiny random model of each family beyond LLaMA) through the whole pipeline. tox's factors pick rows
with RUNNER_MATRIX_QUANT / RUNNER_MATRIX_DRAFT / RUNNER_MATRIX_MODEL (comma lists); with any of them
set, every combination of what they select runs. With none set (tox's default `all` run) dense and
MoE run every combination and each family a share of them (see `rows`), so that the default run
stays short while every family, quant mode and draft kind still meet.

Reference: plain greedy decoding of the same (quantized) target. Speculative decoding must match
it token for token; a checkpoint written by `runner quantize` must give the tokens that
quantizing on load gives.
"""
from __future__ import annotations

import os

import pytest
import torch

from runner import pipeline
from runner.config.errors import ConfigError
from runner.config.schema import DraftKind, QuantMode
from runner.recipes import load as resolve
from tests.matrix.conftest import RECIPES, greedy, quant_overrides, recipe_path, selected
from tests.serve.conftest import serve  # noqa: F401  (the fixture: a real server per module)

# The int8 self-draft's least acceptance rate where a model's differs from the others' 0.5: the
# dense model keeps more, tiny-gemma3's six layers carry an int4 target further from the draft.
MIN_ACCEPTANCE = {"dense": 0.75, "gemma3": 0.35}


VARIABLES = ("RUNNER_MATRIX_QUANT", "RUNNER_MATRIX_DRAFT", "RUNNER_MATRIX_MODEL")
QUANTS = selected("RUNNER_MATRIX_QUANT", [m.value for m in QuantMode])
DRAFTS = selected("RUNNER_MATRIX_DRAFT", [k.value for k in DraftKind])
MODELS = selected("RUNNER_MATRIX_MODEL", list(RECIPES))
AMBIENT_HOME = os.environ.get("RUNNER_HOME")  # before the tests move it (conftest.runner_home)
FAMILY_SHARE = not any(os.environ.get(variable) for variable in VARIABLES)  # the default run: families take a share


def rows(first: list[str], second: list[str]) -> list[tuple[str, str, str]]:
    """(model, a, b) for every model and every pair of `first` x `second` (quant modes and draft
    kinds, or dtypes and quant modes). In the default run each family takes one pair, the families
    walking through the values other than none in step, so that each quantizing mode and each
    draft kind meets some family."""
    # quant.mode gguf refuses mixtures of experts (test_gguf_refuses_a_mixture_of_experts)
    full = [(model, a, b) for model in MODELS for a in first for b in second
            if not (FAMILY_SHARE and model not in ("dense", "moe")) and not (model == "moe" and "gguf" in (a, b))]
    if not FAMILY_SHARE:
        return full
    quantized = [m for m in first if m != "none"] or first
    others = [b for b in second if b != "none"] or second
    families = [model for model in MODELS if model not in ("dense", "moe")]
    return full + [(model, quantized[i % len(quantized)], others[i % len(others)]) for i, model in enumerate(families)]


def draft_overrides(kind: str) -> list[str]:
    if kind == "model":
        # The target drafts for itself in int8: a cheap draft whose proposals are mostly right.
        return ["draft.kind=model", "draft.model=${model}", "draft.quant.mode=int8", "draft.speculate_k=3"]
    if kind == "ngram":
        return ["draft.kind=ngram", "draft.speculate_k=4"]
    return []


@pytest.mark.parametrize("model,mode,draft", rows(QUANTS, DRAFTS))
def test_decoding_matches_plain_greedy_of_the_same_target(model, mode, draft, home):
    recipe = recipe_path(model)
    quant = quant_overrides(mode, home, model)
    expected, _ = greedy(recipe, quant)
    tokens, stats = greedy(recipe, quant + draft_overrides(draft))
    assert tokens == expected
    assert len(tokens) == 24
    if draft != "none":
        spec = stats.speculative
        # Every target forward output the drafts it kept and one token of its own (no EOS cut a round).
        assert len(tokens) == spec.target_forwards + spec.accepted
        # Useful, not only correct: drafts were kept (rejecting every draft still decodes right).
        if draft == "model":
            # The target's own int8 copy; measured 0.85 to 1 (dense), 0.67 to 1 (experts: int8
            # rounding sometimes flips a token's routing, and with it a whole feed-forward).
            assert spec.acceptance_rate >= MIN_ACCEPTANCE.get(model, 0.5)
        else:
            assert spec.accepted > 0  # the prompt repeats; measured 1 to 10 of 24 tokens


@pytest.mark.parametrize("model,dtype,mode", rows(["float32", "bfloat16"], QUANTS))
def test_runner_quantize_writes_what_loading_reproduces_and_guards(model, dtype, mode, home, tmp_path):
    """A quantized checkpoint gives the tokens of quantizing on load, and refuses another quant mode;
    with quant.mode none there is nothing to quantize, and saying so is an error."""
    recipe = recipe_path(model)
    overrides = quant_overrides(mode, home, model) + [f"dtype={dtype}"]
    resolved = resolve(recipe, overrides, check_files=True)
    if mode == "none":
        with pytest.raises(ConfigError, match="nothing to quantize"):
            pipeline.quantized_path(resolved, recipe)
        return
    on_load, _ = greedy(recipe, overrides)
    out = tmp_path / "quantized.pth"
    pipeline.write_quantized(resolved, recipe, out)
    stored = torch.load(out, weights_only=True, mmap=True)
    assert stored["quant"]["mode"] == mode
    loaded, _ = greedy(recipe, overrides + [f"model.checkpoint={out}"])
    assert loaded == on_load
    other = "int8" if mode != "int8" else "none"
    with pytest.raises(ConfigError) as info:
        greedy(recipe, [f"quant.mode={other}", f"model.checkpoint={out}", f"dtype={dtype}"])
    assert "quant.mode" in str(info.value) and mode in str(info.value)


def test_gguf_refuses_a_mixture_of_experts(home):
    # Any GGUF file will do: the refusal comes before the file's tensors are matched to the spec.
    with pytest.raises(ConfigError, match="quant.mode gguf does not run mixtures of experts"):
        greedy(recipe_path("moe"), quant_overrides("gguf", home, "dense"))


def test_serve_runs_gguf_blocks_as_the_pipeline_does(home, serve, monkeypatch):
    """`runner serve` on a GGUF's blocks (quant.mode gguf): two requests at once share the slots'
    batches and each answers the pipeline's greedy text."""
    import httpx

    from runner import generate as generating
    from runner.text import TextStream
    from tests.matrix.conftest import build

    recipe, tokens = recipe_path("dense"), 16
    overrides = quant_overrides("gguf", home, "dense") + ["dtype=float32"]
    prompts = ["one two three", "The little cat sat on the mat and"]
    expected = []
    for prompt in prompts:
        built = build(recipe, overrides, prompt=prompt, tokens=tokens)
        ids, _ = generating.generate(built, generating.encode_prompt(built, recipe))
        stream = TextStream(built.tokenizer)
        expected.append("".join(stream.push(token) for token in ids) + stream.flush())
    # The server finds runner's kernels where this run built them (see conftest.kernels_loaded).
    if AMBIENT_HOME is None:
        monkeypatch.delenv("RUNNER_HOME")
    else:
        monkeypatch.setenv("RUNNER_HOME", AMBIENT_HOME)
    server = serve(recipe, *overrides, "--slots", "2", "--cache-len", "128")

    def ask(prompt: str) -> str:
        body = {"model": "tiny-random", "prompt": prompt, "max_tokens": tokens, "temperature": 0}
        return httpx.post(server.v1 + "/completions", json=body, timeout=60).json()["choices"][0]["text"]

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(ask, prompts)) == expected
