"""runner.kernels.coverage names what runner's kernels leave to torch: the names agree with what
KernelOps does on a decode step, for every family's drawn spec, and `runner` says them once."""
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from runner import kernels
from runner.config.resolve import load_spec
from runner.config.schema import Kernels
from runner.kernels import coverage
from runner.model import functional as fn
from runner.transforms.runner_ops import use_runner_ops
from tests.properties.families import family_specs
from tests.properties.strategies import model_specs, moe_specs
from tests.quant.helpers import float_model


@pytest.fixture(scope="module", autouse=True)
def built():
    return kernels.load()


def test_each_tiny_familys_line_names_its_fallbacks_and_llama_has_none():
    assert coverage.note(load_spec("tiny-llama")) is None
    assert coverage.fallbacks(load_spec("tiny-moe")) == ["fused decode step off (mixture of experts)"]
    assert coverage.fallbacks(load_spec("tiny-qwen2")) == ["fused decode step off (q/k/v biases)"]
    assert coverage.fallbacks(load_spec("tiny-qwen3")) == ["fused decode step off (q/k norms)"]
    assert coverage.note(load_spec("tiny-gemma2")) == (
        "kernels: attention on torch (query_pre_attn_scalar, soft-capping), feed-forward gate on torch (gelu_tanh), "
        "fused decode step off (windows per layer, sandwich norms)")
    assert coverage.fallbacks(load_spec("tiny-gemma3")) == [
        "feed-forward gate on torch (gelu_tanh)",
        "fused decode step off (q/k norms, local RoPE base, windows per layer, sandwich norms)"]
    assert coverage.fallbacks(load_spec("tiny-phi3")) == ["attention on torch (partial rotary)", "fused decode step off"]


@settings(max_examples=50, deadline=None)
@given(spec=family_specs() | model_specs() | moe_specs(), seed=st.integers(0, 2**16))
@torch.no_grad()
def test_the_named_fallbacks_are_what_a_decode_step_on_the_kernels_does(spec, seed):
    model = float_model(spec, seed)
    ops = kernels.KernelOps()
    model.use_ops(ops)
    model.setup_cache(1, 8)
    model(torch.tensor([[1, 2, 3]]), torch.arange(3))
    token, pos = torch.tensor([[4]]), torch.tensor([3])
    fused = ops.decode_layers(model, model.embed(token), model.rope(pos), pos, None) is not None
    # The layers one by one, with torch's attention counted where KernelOps falls back to it.
    with mock.patch.object(fn, "attend", wraps=fn.attend) as on_torch, \
            mock.patch.object(ops, "decode_layers", lambda *args: None):
        model(token, pos)
    named = " ".join(coverage.fallbacks(spec))
    assert ("attention on torch" in named) == on_torch.called
    assert ("fused decode step off" in named) == (not fused)
    assert ("feed-forward gate on torch" in named) == (not spec.moe and spec.activation != "silu")


def test_runner_says_the_line_once_per_model_and_nothing_for_llama():
    said = []
    for name in ("tiny-gemma2", "tiny-llama"):
        model = float_model(load_spec(name), 0)
        assert use_runner_ops(model, Kernels.runner, torch.device("cpu"), "r.yaml", said.append) == kernels.load()
    assert said == [coverage.note(load_spec("tiny-gemma2"))]
