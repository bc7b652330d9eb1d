"""Each family's tiny random recipe (recipes/tiny-FAMILY.yaml) through the axes beside the matrix's
quant x draft rows: quantized layers within their bounds, an int8 KV cache and runner's kernels
within theirs, an int4 self-draft and n-gram drafts giving plain greedy's tokens, prompts decoded
together as each alone; and once each, as they are slow, GPTQ, `runner serve`, `runner eval` and a
compiled decode step across LongRoPE's switch to its long factors.

RUNNER_MATRIX_MODEL (tox's model-FAMILY factors) narrows the families; dense and moe name none.
"""
from __future__ import annotations

import json
import math
import os

import httpx
import pytest
import torch

from runner import generate as generating
from runner import quant
from runner.config.schema import FAMILIES as ALL_FAMILIES, tp_problems
from runner.kernels import coverage
from runner.quant import int4, int8
from runner.quant.linear import Int4Linear, Int8Linear
from runner.text import TextStream
from tests.decoders.test_batched import logits_alone, run_batched
from tests.matrix.conftest import PROMPT, RECIPES, build, greedy, quant_overrides, recipe_path, selected
from tests.properties.strategies import logits_bound
from tests.properties.test_model_vs_hf import run_chunks
from tests.quant.bounds import within_half_step
from tests.quant.helpers import logits, prompts
from tests.serve.conftest import serve  # noqa: F401  (the fixture: a real server per module)

FAMILIES = [family for family in ALL_FAMILIES if family != "llama"]
CHOSEN = [model for model in selected("RUNNER_MATRIX_MODEL", list(RECIPES)) if model in FAMILIES]
AMBIENT_HOME = os.environ.get("RUNNER_HOME")  # where runner's kernels are built (see conftest.kernels_loaded)
FP32 = ["dtype=float32"]


def once_on(family: str):
    """A slow test that runs on `family` only, and only where RUNNER_MATRIX_MODEL chooses it."""
    return pytest.mark.skipif(family not in CHOSEN, reason=f"RUNNER_MATRIX_MODEL leaves out {family}")


@torch.no_grad()
def steps(model, tokens: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits [B, T, vocab] (float64) of tokens [B, T]: the first `prefill` as a prompt, then one at a time."""
    return run_chunks(model, tokens, list(range(prefill, tokens.shape[1])), tokens.shape[1]).double()


def test_every_family_has_a_tiny_recipe_that_splits_over_two_ranks():
    for family in FAMILIES:
        built = build(recipe_path(family), ["kernels=torch"])
        spec = built.model.spec
        assert spec.family == family
        assert not tp_problems(spec, 2, 32)  # tests/tp shards them, int4 too
        assert spec.vocab_size == built.tokenizer.vocab_size


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("family", CHOSEN)
def test_quantized_layers_are_within_half_a_step_and_the_familys_own_weights_stay(family, mode, home):
    """Every linear of every layer quantized within half its step of the float weight (the bound
    of tests/quant), the family's biases and norms untouched, and int8 keeping the float model's
    top-1 as tests/quant/test_model asks."""
    recipe = recipe_path(family)
    reference = build(recipe, FP32 + ["kernels=torch"]).model
    quantized = build(recipe, FP32 + ["kernels=torch"] + quant_overrides(mode, home)).model
    layers = {name: layer for name, layer in quantized.named_modules() if isinstance(layer, (Int8Linear, Int4Linear))}
    assert {name for name in layers if name.startswith("layers.")} == {
        f"layers.{i}.{name}" for i in range(reference.spec.n_layers)
        for name in ("attention.wqkv", "attention.wo", "feed_forward.w13", "feed_forward.w2")}
    for name, layer in layers.items():
        w = reference.get_submodule(name).weight.detach()
        if mode == "int8":
            w_hat, step = int8.dequantize(layer.weight, layer.scales), layer.scales[:, None].expand_as(w)
        else:
            w_hat = int4.dequantize(int4.unpack(layer.weight), layer.scales, layer.zeros)
            step = layer.scales.repeat_interleave(layer.groupsize, dim=1)
        assert within_half_step(w, w_hat, step).all(), name
    floats = quantized.state_dict()
    for name, value in reference.state_dict().items():
        if name.endswith(("qkv_bias", "norm.weight")):
            assert torch.equal(floats[name], value), name
    if mode == "int8":
        tokens = prompts(reference.spec, 0)
        agree = (logits(quantized, tokens).argmax(-1) == logits(reference, tokens).argmax(-1)).float().mean()
        assert agree >= 0.9


@once_on("gemma3")
def test_gptq_fits_its_calibration_text_better_than_round_to_nearest(home):
    """tests/quant/test_model's GPTQ bound, through the pipeline, on the family with the most
    extras in its layers (q/k norms, sandwich norms, windows, two RoPE bases): calibration feeds
    each layer what the model's own forward would."""
    recipe = recipe_path("gemma3")
    reference = build(recipe, FP32 + ["kernels=torch"])
    gptq = build(recipe, FP32 + ["kernels=torch"] + quant_overrides("int4-gptq", home))
    rtn = build(recipe, FP32 + ["kernels=torch"] + quant_overrides("int4", home))
    text = (home / "calibration.txt").read_text()
    windows = quant.calibration_tokens(reference.tokenizer.encode(text, bos=False), gptq.recipe.quant, recipe)
    expected = logits(reference.model, windows)
    error = {name: (logits(built.model, windows) - expected).norm() for name, built in (("gptq", gptq), ("rtn", rtn))}
    assert error["gptq"] < 0.9 * error["rtn"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", CHOSEN)
def test_runner_kernels_give_torch_ops_logits_and_name_what_they_leave_to_torch(family, dtype):
    """Prefill and one-token steps past the window and LongRoPE's original length, on runner's
    kernels and on torch's ops, within tests/kernels' bounds: fp32's against HF, bf16's a rounding
    step per layer."""
    recipe = recipe_path(family)
    torch_ops = build(recipe, [f"dtype={dtype}", "kernels=torch"]).model
    notes = []
    on_kernels = build(recipe, [f"dtype={dtype}", "kernels=runner"], note=notes.append).model
    line = coverage.note(on_kernels.spec)
    assert [note for note in notes if note.startswith("kernels:")] == ([line] if line else [])
    tokens = prompts(torch_ops.spec, 1, batch=1, length=48)
    expected = steps(torch_ops, tokens, 5)
    bound = logits_bound(expected) if dtype == "float32" else 0.1 * max(1.0, expected.abs().max().item())
    assert (steps(on_kernels, tokens, 5) - expected).abs().max().item() <= bound


@pytest.mark.parametrize("family", CHOSEN)
def test_an_int8_kv_cache_stays_near_the_float_cache_on_either_ops(family):
    """tests/kernels/test_int8_cache's bounds: int8 within 5% of the float cache's logits, and
    runner's kernels within int8 rounding of torch's ops over the same int8 cache."""
    recipe = recipe_path(family)
    models = {(kernels, cache): build(recipe, FP32 + [f"kernels={kernels}", f"quant.kv_cache={cache}"]).model
              for kernels, cache in (("torch", "float"), ("torch", "int8"), ("runner", "int8"))}
    tokens = prompts(models["torch", "float"].spec, 2, batch=1, length=48)
    out = {key: steps(model, tokens, 30) for key, model in models.items()}
    scale = out["torch", "float"].abs().max()
    assert (out["torch", "int8"] - out["torch", "float"]).abs().max() <= 0.05 * scale
    assert (out["runner", "int8"] - out["torch", "int8"]).abs().max() <= 2e-3 * scale


@pytest.mark.parametrize("draft", ["ngram", "int4 self-draft"])
@pytest.mark.parametrize("family", CHOSEN)
def test_speculative_decoding_gives_plain_greedy_tokens(family, draft):
    recipe = recipe_path(family)
    overrides = (["draft.kind=ngram", "draft.speculate_k=4"] if draft == "ngram" else
                 ["draft.kind=model", "draft.model=${model}", "draft.quant.mode=int4", "draft.quant.groupsize=32",
                  "draft.speculate_k=3"])
    expected, _ = greedy(recipe, [])
    tokens, stats = greedy(recipe, overrides)
    assert tokens == expected
    assert stats.speculative.accepted > 0


@pytest.mark.parametrize("family", CHOSEN)
def test_prompts_decoded_together_are_each_decoded_alone(family):
    recipe = recipe_path(family)
    texts = ["Once upon a time", "The little cat sat on the mat and", PROMPT]
    built = build(recipe, [])
    together, _ = generating.generate_batch(built, [generating.encode_prompt(built, recipe, t, reserve=False)
                                                     for t in texts])
    assert together == [greedy(recipe, [], prompt=text)[0] for text in texts]


@pytest.mark.parametrize("ops", ["torch", "runner"])
@pytest.mark.parametrize("family", CHOSEN)
def test_a_rows_logits_decoded_in_a_batch_are_its_logits_alone(family, ops):
    """tests/decoders/test_batched's bound: a row's logits within 1e-5 of its logits alone, whichever
    rows share its batch (here one 12 steps past another, beyond a window and LongRoPE's switch)."""
    model = build(recipe_path(family), FP32 + [f"kernels={ops}"]).model
    rows = [[5, 6, 7], list(range(30, 58))]  # prompts of 3 and 28 tokens
    tokens, logits = run_batched(model, rows, [0, 0])
    for i, prompt in enumerate(rows):
        alone = logits_alone(model, prompt, tokens[i])
        batched = torch.cat([alone[:1], torch.stack(logits[i])])
        assert (batched - alone).abs().max() <= 1e-5 * alone.abs().max().clamp(min=1), i


@once_on("gemma3")
def test_serve_answers_a_completion_with_the_pipelines_greedy_text(serve, monkeypatch):
    """One family (Gemma 3: windows, two RoPE bases, one KV head) through `runner serve`'s slots."""
    recipe, tokens = recipe_path("gemma3"), 24
    built = build(recipe, FP32, tokens=tokens)
    ids, _ = generating.generate(built, generating.encode_prompt(built, recipe))
    stream = TextStream(built.tokenizer)
    expected = "".join(stream.push(token) for token in ids) + stream.flush()
    checkpoint = built.recipe.model.checkpoint  # written by build: the server only reads it
    # The server finds runner's kernels where this run built them.
    if AMBIENT_HOME is None:
        monkeypatch.delenv("RUNNER_HOME")
    else:
        monkeypatch.setenv("RUNNER_HOME", AMBIENT_HOME)
    server = serve(recipe, *FP32, f"model.checkpoint={checkpoint}", "--slots", "2", "--cache-len", "128")
    body = {"model": "tiny-gemma3", "prompt": PROMPT, "max_tokens": tokens, "temperature": 0}
    answer = httpx.post(server.v1 + "/completions", json=body, timeout=60).json()
    assert answer["choices"][0]["text"] == expected
    assert answer["usage"]["completion_tokens"] == tokens


@once_on("gemma2")
def test_runner_eval_scores_rolling_windows_as_the_model_computes_them(tmp_path, capsys):
    """`runner eval` on Gemma 2 (soft-capping, windows) with max_seq_len 48: its bits per byte are
    the log-likelihood of tests/eval's windowed sum over the model's own logits."""
    pytest.importorskip("lm_eval", reason="the eval extra (lm-eval) is part of the test extra")
    from runner.cli import main
    from runner.eval.adapter import RunnerLM
    from tests.eval.test_scoring import windowed_sum

    recipe, overrides = recipe_path("gemma2"), ["model.arch.max_seq_len=48"]
    docs = [" ".join(["one two three four five six seven eight nine ten"] * 6), "a short doc of a few words"]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs))
    (tmp_path / "mine.yaml").write_text("task: mine\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                        f"    test: {tmp_path / 'docs.jsonl'}\noutput_type: loglikelihood_rolling\n"
                                        "test_split: test\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n"
                                        "  - metric: bits_per_byte\n")
    out = tmp_path / "results.json"
    with pytest.raises(SystemExit) as exit_:
        main(["eval", recipe, *overrides, "--tasks", "mine", "--include-path", str(tmp_path), "--json", str(out)])
        raise SystemExit(0)
    assert exit_.value.code == 0, capsys.readouterr().err
    got = json.loads(out.read_text())["results"]["mine"]["bits_per_byte,none"]
    lm = RunnerLM(build(recipe, overrides + ["kernels=torch"]))
    assert len(lm.runner_tokenizer.encode(docs[0])) > lm.max_length  # scored in several windows
    total = sum(windowed_sum(lm, doc) for doc in docs)
    assert got == pytest.approx(-total / sum(len(doc.encode()) for doc in docs) / math.log(2), rel=1e-4)


@pytest.mark.compile
@once_on("phi3")
def test_a_compiled_decode_step_crosses_longropes_switch_as_eager_with_no_recompile():
    """Phi-3's LongRoPE reads its long factors once a step reaches past the original 32 positions:
    a tensor choice inside the one compiled graph, never a new graph per token."""
    recipe, tokens = recipe_path("phi3"), 30
    torch._dynamo.reset()
    eager, _ = greedy(recipe, ["threads=1"], tokens=tokens)
    from torch._dynamo.utils import counters

    counters.clear()
    built = build(recipe, ["threads=1", "compile.decode=true"], tokens=tokens)
    prompt = generating.encode_prompt(built, recipe)
    original = built.model.spec.rope_scaling.original_max_position_embeddings
    assert len(prompt) < original < len(prompt) + tokens
    assert generating.warm_up(built, prompt) > 0
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled, _ = generating.generate(built, prompt)
    assert counters["stats"]["unique_graphs"] == graphs
    assert compiled == eager
