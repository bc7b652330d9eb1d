"""CUDA twins of the CPU tests: the int4 CUDA packing and kernel against the float64 reference,
compiled decode, and greedy speculative decoding. Every test here is marked `cuda`, which
tests/conftest.py skips where torch sees no CUDA device.
"""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from runner import generate as generating
from runner.decoders.plain import PlainDecoder
from runner.decoders.proposers import DraftModelProposer, NGramProposer
from runner.decoders.sampling import Sampling
from runner.decoders.speculative import SpeculativeDecoder
from runner.quant.linear import Int4Linear
from tests.compile.test_compile import run as run_recipe
from tests.decoders.tiny import tiny
from tests.quant.strategies import weights
from tests.quant.test_kernels import activations, int4_reference, int4_weights, linear, one_hot_cases, tolerance

pytestmark = pytest.mark.cuda

CUDA = torch.device("cuda")
GREEDY = Sampling(temperature=0)


# Checked at import, where the cuda marker alone would not keep get_device_capability from running.
needs_sm80 = pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)),
                                reason="torch's CUDA int4 kernel needs compute capability >= 8.0")


# --- int4: packing and kernel ------------------------------------------------------------------


@needs_sm80
@settings(max_examples=50, deadline=None)
@given(one_hot_cases(rows=8, groupsizes=(32, 64, 128, 256)),
       st.sampled_from([torch.bfloat16, torch.float32, torch.float16]))
def test_cuda_int4_returns_each_weight_exactly_for_one_hot_inputs(case, x_dtype):
    """Bytes laid out by the documented rule, moved to the GPU and packed there: bf16 inputs take the
    CUDA kernel (even column moved to the high nibble, tiled), fp32 and fp16 the fallback on the GPU.
    One output is one weight, exact in bf16, so any scale, zero or nibble slip shows."""
    q, scales, zeros = case
    out, n = q.shape
    layer = Int4Linear(n, out, n // scales.shape[1], torch.bfloat16)
    layer.weight = q[:, 0::2] | (q[:, 1::2] << 4)
    layer.scales, layer.zeros = scales.to(torch.bfloat16), zeros.to(torch.bfloat16)
    layer.to(CUDA)
    assert layer.pack_for(CUDA) == "cuda"
    y = layer(torch.eye(n, dtype=x_dtype, device=CUDA))  # [in, out]: row i reads column i
    assert y.dtype == x_dtype and y.device.type == "cuda"
    assert torch.equal(y.double().cpu(), int4_weights(q, scales, zeros).T)


@needs_sm80
@settings(max_examples=50, deadline=None)
@given(weights(max_groups=3, dtypes=(torch.bfloat16,)), st.integers(1, 17),
       st.integers(0, 2**32 - 1))
def test_cuda_int4_kernel_is_x_times_the_reference_weight(case, rows, seed):
    """Quantized random weights (outliers, zero and constant groups) within the rounding bound of
    tests/quant/test_kernels.py, against the float64 reference; rows are repeated up to a multiple
    of 8, which the kernel takes (every groupsize makes in a multiple of 32, as it also needs)."""
    w, groupsize = case
    w = w.repeat(8, 1)[: -(-w.shape[0] // 8) * 8]  # [out rounded up to 8, in]
    layer = Int4Linear.from_float(linear(w), groupsize).to(CUDA)
    assert layer.pack_for(CUDA) == "cuda"
    w_hat = int4_reference(layer)  # float64 [out, in], on the CPU
    x = activations(seed, rows, w_hat, torch.bfloat16)
    y = layer(x.to(CUDA)).cpu()
    err = (y.double() - x.double() @ w_hat.T).abs()
    assert (err <= tolerance(x, w_hat)).all(), f"max error {err.max():.3g}"


@needs_sm80
def test_layers_the_cuda_kernel_refuses_run_the_fallback_on_the_gpu():
    g = torch.Generator().manual_seed(0)
    odd_rows = Int4Linear.from_float(linear(torch.randn(12, 64, generator=g, dtype=torch.bfloat16)), 32).to(CUDA)
    assert odd_rows.pack_for(CUDA) == "fallback"  # 12 rows: not a multiple of 8
    with pytest.raises(ValueError, match="multiple of 8"):
        odd_rows.pack_for(CUDA, "cuda")
    fp32 = Int4Linear.from_float(linear(torch.randn(16, 64, generator=g)), 32).to(CUDA)
    assert fp32.pack_for(CUDA) == "fallback"  # the kernel takes bf16 only
    for layer in (odd_rows, fp32):
        w_hat = int4_reference(layer)
        x = activations(1, 3, w_hat, torch.float32)
        err = (layer(x.to(CUDA)).cpu().double() - x.double() @ w_hat.T).abs()
        assert (err <= tolerance(x, w_hat)).all(), f"max error {err.max():.3g}"


# --- compiled decode -------------------------------------------------------------------------


@pytest.fixture
def home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("RUNNER_HOME", str(tmp_path_factory.getbasetemp() / "home"))
    torch._dynamo.reset()


def run(overrides: list[str]):
    """The compile tests' run (tiny random recipe, 20 greedy tokens after the warm-up), on the GPU."""
    return run_recipe(["device=cuda", *overrides])


@pytest.mark.compile
@pytest.mark.parametrize("steps", [["compile.decode=true"], ["compile.decode=true", "compile.prefill=true"]],
                         ids=["decode", "decode+prefill"])
def test_compiled_greedy_tokens_on_cuda_equal_eager_and_no_step_recompiles(home, steps):
    from torch._dynamo.utils import counters

    eager_built, _, eager, _ = run([])
    assert eager_built.model.norm.weight.device.type == "cuda"
    counters.clear()
    built, prompt, _, compile_seconds = run(steps)
    assert compile_seconds > 0
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        tokens, _ = generating.generate(built, prompt)
    assert counters["stats"]["unique_graphs"] == graphs
    assert tokens == eager


@pytest.mark.compile
def test_compiled_logits_on_cuda_match_eager(home):
    built, prompt, _, _ = run(["compile.decode=true"])
    model = built.model
    with torch.inference_mode():
        model.setup_cache(1, built.decoder.cache_len)
        model(torch.tensor([prompt[:-1]], device=CUDA), torch.arange(len(prompt) - 1, device=CUDA))
        position = torch.tensor([len(prompt) - 1], device=CUDA)
        token = torch.tensor([[prompt[-1]]], device=CUDA)
        eager = model(token, position)
        compiled = built.forward(token, position)
    assert compiled.device.type == "cuda"
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4 * eager.abs().max().item())


# --- speculative decoding --------------------------------------------------------------------

V = 16
PROMPTS = [[1], [3, 7, 3, 7, 3], [0, 5, 9, 2], [4, 4, 4, 4], [11, 2, 8, 2, 8, 15, 6]]


def on_cuda(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model).to(CUDA)  # tiny() caches its CPU models: leave them as they are


def clear_argmaxes(model, prompt: list[int], out: list[int]) -> bool:
    """Whether every argmax along `out` wins by a margin that fp32 rounding in a k-token verify forward
    (other GEMM shapes than a one-token step) cannot overturn; `out` must be the argmax path."""
    tokens = prompt + out[:-1]
    model.setup_cache(1, len(tokens))
    with torch.inference_mode():
        logits = model(torch.tensor([tokens], device=CUDA), torch.arange(len(tokens), device=CUDA))[0].float()
    logits = logits[len(prompt) - 1:]  # [len(out), V]
    top2 = logits.topk(2, dim=-1).values
    if not ((top2[:, 0] - top2[:, 1]) >= 1e-4 * max(1.0, logits.abs().max().item())).all():
        return False
    assert logits.argmax(-1).tolist() == out
    return True


@pytest.mark.parametrize("draft", ["small", "noisy", "copy", "ngram"])
@pytest.mark.parametrize("k", [1, 4])
def test_greedy_speculative_on_cuda_equals_plain_greedy(draft, k):
    target = on_cuda(tiny("target", V, 0))
    proposer = (NGramProposer(V, max_n=3, min_n=1) if draft == "ngram" else DraftModelProposer(on_cuda(
        {"small": tiny("draft", V, 1), "noisy": tiny("target", V, 0, noise=0.15),
         "copy": tiny("target", V, 0, instance=1)}[draft]), GREEDY))
    compared, kept = 0, 0
    for prompt in PROMPTS:
        plain, _ = PlainDecoder(target, GREEDY).generate(prompt, 24)
        if not clear_argmaxes(target, prompt, plain):
            continue
        out, stats = SpeculativeDecoder(target, proposer, GREEDY, k).generate(prompt, 24)
        assert out == plain, prompt
        compared, kept = compared + 1, kept + stats.speculative.accepted
    assert compared >= len(PROMPTS) - 1  # near ties are rare with tiny()'s peaked distributions
    if draft == "copy":
        assert kept > 0  # the verify path ran, not only the bonus tokens


@pytest.mark.parametrize("draft", [["draft.kind=model", "draft.model=${model}", "draft.quant.mode=int8",
                                    "draft.speculate_k=3"], ["draft.kind=ngram", "draft.speculate_k=4"]],
                         ids=["model", "ngram"])
def test_the_pipeline_decodes_speculatively_on_cuda(home, draft):
    """The recipe route: device=cuda reaches the target, the draft and the decoders' generator."""
    built, prompt, plain, _ = run([])
    _, _, tokens, _ = run(draft)
    if clear_argmaxes(built.model, prompt, plain):
        assert tokens == plain
    else:
        assert len(tokens) == len(plain)
