"""torch.compile as a step transform: same tokens as eager, no recompiles per token, clear failures.

Compiling is slow on two cores, so these few tests run in tox's `compile` factor only.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from runner import pipeline
from runner import generate as generating
from runner.config.errors import ConfigError
from runner.recipes import load as resolve

pytestmark = pytest.mark.compile

RECIPE = str(Path(__file__).resolve().parents[2] / "recipes" / "tiny-random.yaml")
MOE = str(Path(__file__).resolve().parents[2] / "recipes" / "tiny-moe.yaml")  # 4 experts, top 2, a 32-token window
GREEDY = ["generate.temperature=0", "generate.max_new_tokens=20", "threads=1"]


@pytest.fixture(autouse=True)
def home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("RUNNER_HOME", str(tmp_path_factory.getbasetemp() / "home"))
    torch._dynamo.reset()


def run(overrides, recipe_file=RECIPE):
    recipe = resolve(recipe_file, GREEDY + overrides, check_files=True)
    built = pipeline.build(recipe, recipe_file)
    prompt = generating.encode_prompt(built, recipe_file)
    compile_seconds = generating.warm_up(built, prompt)
    tokens, _ = generating.generate(built, prompt)
    return built, prompt, tokens, compile_seconds


@pytest.mark.parametrize("steps", [["compile.decode=true"], ["compile.decode=true", "compile.prefill=true"],
                                   ["compile.decode=true", "kernels=torch"],
                                   ["compile.decode=true", "compile.prefill=true", "quant.kv_cache=int8"],
                                   ["compile.decode=true", "kernels=torch", "quant.kv_cache=int8"]],
                         ids=["decode", "decode+prefill", "torch-ops", "int8-cache", "torch-ops-int8-cache"])
def test_compiled_greedy_tokens_equal_eager_and_no_step_recompiles(steps):
    _, _, eager, _ = run([s for s in steps if not s.startswith("compile.")])
    from torch._dynamo.utils import counters

    counters.clear()
    # After the warm-up compiled each step, a recompile (a new graph per token) would be an error.
    built, prompt, _, compile_seconds = run(steps)
    assert compile_seconds > 0
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        tokens, _ = generating.generate(built, prompt)
        tokens_again, _ = generating.generate(built, prompt)
    assert counters["stats"]["unique_graphs"] == graphs
    assert tokens == eager == tokens_again


@pytest.mark.parametrize("quant", [[], ["quant.mode=int8"], ["quant.mode=int4", "quant.groupsize=32"]],
                         ids=["float", "int8", "int4"])
def test_compiled_mixture_of_experts_equals_eager_with_no_recompiles(quant):
    """Routing, the experts (gathered per token on runner's kernels) and the sliding window all
    trace into one graph per step: fullgraph, and no new graph for any token past the window.
    fp32: this random model's top two logits are often less than a bf16 step apart, where eager and
    inductor's bf16 roundings may pick either."""
    longer = ["generate.max_new_tokens=40"]
    _, _, eager, _ = run(quant + longer, MOE)
    from torch._dynamo.utils import counters

    counters.clear()
    steps = ["compile.decode=true", "compile.prefill=true", "compile.fullgraph=true"]
    built, prompt, _, _ = run(quant + longer + steps, MOE)
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        tokens, _ = generating.generate(built, prompt)
    assert counters["stats"]["unique_graphs"] == graphs
    assert len(prompt) + len(tokens) > 32  # decoding crossed the window
    assert tokens == eager


def test_compiled_logits_match_eager():
    built, prompt, _, _ = run(["compile.decode=true"])
    model = built.model
    with torch.inference_mode():
        model.setup_cache(1, built.decoder.cache_len)
        model(torch.tensor([prompt[:-1]]), torch.arange(len(prompt) - 1))
        position = torch.tensor([len(prompt) - 1])
        eager = model(torch.tensor([[prompt[-1]]]), position)
        compiled = built.forward(torch.tensor([[prompt[-1]]]), position)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4 * eager.abs().max().item())


def test_a_compile_failure_is_summarised_or_falls_back_when_asked(monkeypatch):
    _, _, eager, _ = run([])

    def broken(model, **options):
        def fail(*args):
            raise RuntimeError("InductorError: CppCompileError: C++ compile error\n" + "trace line\n" * 300)
        return fail

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(ConfigError) as info:
        run(["compile.decode=true"])
    message = str(info.value)
    assert "compile.decode" in message and "CppCompileError" in message and "compile.fallback: eager" in message
    assert message.count("trace line") <= 1
    _, _, tokens, _ = run(["compile.decode=true", "compile.fallback=eager"])
    assert tokens == eager


def test_an_unknown_compile_mode_lists_the_valid_ones():
    with pytest.raises(ConfigError) as info:
        resolve(RECIPE, ["compile.mode=fastest"])
    message = str(info.value)
    assert "compile.mode" in message and "fastest" in message
    assert all(mode in message for mode in ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))


@pytest.mark.parametrize("quant", [["quant.mode=int8"], ["quant.mode=int4", "quant.groupsize=32"]], ids=["int8", "int4"])
def test_compiled_quantized_decode_on_runner_kernels_equals_eager(quant):
    bf16 = ["dtype=bfloat16", *quant]
    eager_built, _, eager, _ = run(bf16)
    assert eager_built.model.layers[0].attention.wqkv.kernel == "runner"
    _, _, tokens, _ = run(bf16 + ["compile.decode=true"])
    assert tokens == eager


def test_a_new_cache_size_compiles_the_step_anew():
    # Dynamo's guards on the modules are filtered out (runner.transforms.compile), but not those on
    # the cache: a resized cache must get a new graph, not reach the old one.
    from torch._dynamo.utils import counters

    _, _, eager, _ = run([])
    built, prompt, tokens, _ = run(["compile.decode=true"])
    graphs = counters["stats"]["unique_graphs"]
    built.decoder.cache_len += 7
    resized, _ = generating.generate(built, prompt)
    assert built.model.cache_len == built.decoder.cache_len
    assert counters["stats"]["unique_graphs"] > graphs
    assert tokens == resized == eager


def test_bench_times_hf_with_a_static_cache_and_compile(tmp_path):
    import json

    from click.testing import CliRunner

    from runner.cli import cli

    out = tmp_path / "bench.json"
    result = CliRunner().invoke(cli, ["bench", RECIPE, "threads=1", "--runs", "2", "--tokens", "4",
                                      "--vs", "hf-compile", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["hf_compile_decode_tokens_per_s"] > 0
    assert data["vs_hf_compile_ratio"] == data["decode_tokens_per_s_median"] / data["hf_compile_decode_tokens_per_s"]
    assert "vs HF static+compile" in result.output


def test_the_draft_model_is_compiled_too_and_speculative_tokens_equal_plain():
    draft = ["draft.kind=model", "draft.model=${model}", "draft.quant.mode=int8", "draft.speculate_k=3"]
    _, _, plain, _ = run([])
    from torch._dynamo.utils import counters

    counters.clear()
    built, prompt, tokens, compile_seconds = run(draft + ["compile.decode=true"])
    assert built.draft_forward is not None and built.draft_forward.decode.compiled  # compiled in the warm-up
    assert compile_seconds > 0 and tokens == plain
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert generating.generate(built, prompt)[0] == plain
    assert counters["stats"]["unique_graphs"] == graphs


def test_batched_decoding_through_the_compiled_step_equals_eager_with_no_recompiles():
    """The compiled decode step takes every slot at once (rows at their own positions); requests
    joining and leaving never change its shape."""
    from torch._dynamo.utils import counters

    from runner.decoders.batched import BatchDecoder
    from runner.decoders.sampling import Sampling

    def decode(built, forward):
        decoder = BatchDecoder(built.model, 3, 64, forward)
        out = {}
        for i, prompt in enumerate(([1, 2, 3], [4] * 7, [5, 6])):
            slot, first = decoder.start(prompt, Sampling())
            out[slot] = [first.id]
            for s, (token,) in decoder.step().items():
                out[s].append(token.id)
            if i == 1:
                decoder.finish(0)  # a row leaves mid-batch
                out["left"] = out.pop(0)
        for _ in range(8):
            for s, (token,) in decoder.step().items():
                out[s].append(token.id)
        return out

    built, _, _, _ = run(["compile.decode=true", "compile.fullgraph=true"])
    eager = decode(built, built.model)
    decode(built, built.forward)  # compiles the batched step
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert decode(built, built.forward) == eager
    assert counters["stats"]["unique_graphs"] == 0
