"""runner's CPU kernels against independent references: float64 matmuls, the torch reference ops
(runner.model.functional) and, through the whole model, HF's LlamaForCausalLM."""
import copy
import dataclasses
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from runner import kernels
from runner.config.errors import ConfigError
from runner.config.schema import Kernels, ModelSpec, QuantActivations, QuantMode, QuantSection
from runner.model import functional as fn, rope
from runner.model.llama import KVCache, Transformer
from runner.quant.gguf_layers import GGUFLinear
from runner.quant.model import quantize as quantize_model, transform as quant_transform, use_activations
from runner.transforms.runner_ops import use_runner_ops
from tests.properties.strategies import build_twins, logits_bound, model_cases
from tests.properties.test_model_vs_hf import run_chunks
from tests.quant.helpers import as_gguf

PROPERTY = settings(max_examples=50, deadline=None)
DTYPES = st.sampled_from([torch.float32, torch.bfloat16])
seeds = st.integers(0, 2**32 - 1)


@pytest.fixture(scope="module", autouse=True)
def built():
    return kernels.load()


def randn(*shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def ulp(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


@PROPERTY
@given(rows=st.integers(1, kernels.MAX_ROWS), n=st.integers(1, 70), k=st.integers(1, 300), dtype=DTYPES, seed=seeds)
def test_linear_is_a_matmul(rows, n, k, dtype, seed):
    # Every N and K: whole blocks of four rows and the rest, whole vectors of K and a masked tail.
    x, w = randn(rows, k, seed=seed, dtype=dtype), randn(n, k, seed=seed + 1, dtype=dtype)
    exact = x.double() @ w.double().T
    # fp32 accumulation of exact products (gamma_K), then one rounding to the output dtype.
    bound = k * 2**-23 * (x.double().abs() @ w.double().abs().T) + ulp(dtype) * exact.abs()
    ours = torch.ops.runner.linear(x, w)
    assert ours.dtype == dtype and ours.shape == (rows, n)
    assert ((ours.double() - exact).abs() <= bound).all()


def test_linear_takes_any_leading_shape_and_strides():
    x, w = randn(2, 3, 40, seed=0), randn(24, 40, seed=1)
    torch.testing.assert_close(torch.ops.runner.linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    wt = randn(40, 24, seed=2).T  # a transposed view
    torch.testing.assert_close(torch.ops.runner.linear(x, wt), F.linear(x, wt), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_splits_rows_across_threads(dtype):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x, w = randn(1, 576, seed=3, dtype=dtype), randn(4099, 576, seed=4, dtype=dtype)
        ours = torch.ops.runner.linear(x, w)
    finally:
        torch.set_num_threads(before)
    exact = x.double() @ w.double().T
    bound = 576 * 2**-23 * (x.double().abs() @ w.double().abs().T) + ulp(dtype) * exact.abs()
    assert ((ours.double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("call, message", [
    (lambda: torch.ops.runner.linear(torch.ones(1, 8), torch.ones(4, 9)), "disagree"),
    (lambda: torch.ops.runner.linear(torch.ones(1, 8), torch.ones(4, 8, dtype=torch.bfloat16)), "dtypes differ"),
    (lambda: torch.ops.runner.linear(torch.ones(1, 8, dtype=torch.float16), torch.ones(4, 8, dtype=torch.float16)),
     "float32 or bfloat16"),
    (lambda: torch.ops.runner.rms_norm(torch.ones(2, 8), torch.ones(7), 1e-5), "weight must be"),
    # 96 divides K, but a bf16 step of 128 columns would straddle its groups: refused, not misread.
    (lambda: torch.ops.runner.int4_linear(torch.ones(1, 192), torch.ones(4, 96, dtype=torch.uint8),
                                          torch.ones(4, 2), torch.ones(4, 2), 96), "power of two"),
])
def test_bad_arguments_are_refused_by_name(call, message):
    with pytest.raises(RuntimeError, match=message):
        call()


def assert_as_reference(ours: torch.Tensor, reference: torch.Tensor) -> None:
    """bf16: within a rounding step of the reference; fp32: within the error of a differently
    ordered fp32 sum (the kernels sum in their own order)."""
    assert ours.dtype == reference.dtype and ours.shape == reference.shape
    rtol = 2 * ulp(torch.bfloat16) if reference.dtype == torch.bfloat16 else 1e-5
    scale = reference.abs().float() + 1e-6
    assert ((ours.float() - reference.float()).abs() <= rtol * scale).all()


@PROPERTY
@given(dim=st.integers(1, 100), rows=st.integers(1, 6), eps=st.sampled_from([1e-6, 1e-5]), dtype=DTYPES, seed=seeds)
def test_rms_norm_is_the_reference(dim, rows, eps, dtype, seed):
    x, w = randn(rows, 1, dim, seed=seed, dtype=dtype), randn(dim, seed=seed + 1, dtype=dtype)
    assert_as_reference(torch.ops.runner.rms_norm(x, w, eps), fn.rms_norm(x, w, eps))


@PROPERTY
@given(inner=st.integers(1, 100), rows=st.integers(1, 6), dtype=DTYPES, seed=seeds)
def test_swiglu_is_the_reference(inner, rows, dtype, seed):
    gate_up = 3 * randn(rows, 1, 2 * inner, seed=seed, dtype=dtype)
    assert_as_reference(torch.ops.runner.swiglu(gate_up), fn.swiglu(gate_up))


@st.composite
def attention_cases(draw):
    """One token (decode) or a few at consecutive positions (a speculative verify, a short prompt)."""
    n_kv_heads = draw(st.integers(1, 4))
    n_heads = n_kv_heads * draw(st.integers(1, 4))
    # Any even head_dim; multiples of 32 (most models' 64 and 128) take the bf16 pairs' path.
    head_dim = draw(st.sampled_from([32, 64, 128]) | st.integers(1, 40).map(lambda h: 2 * h))
    cache_len = draw(st.integers(1, 80) | st.integers(257, 700))  # one chunk of positions, or several
    count = draw(st.integers(1, min(cache_len, kernels.MAX_ROWS)))
    start = draw(st.integers(0, cache_len - count))
    window = draw(st.none() | st.integers(1, cache_len))  # a sliding window, or full causal attention
    return n_heads, n_kv_heads, head_dim, cache_len, start, count, window, draw(DTYPES), draw(seeds)


@PROPERTY
@given(case=attention_cases())
def test_attend_is_the_reference(case):
    n_heads, n_kv_heads, head_dim, cache_len, start, count, window, dtype, seed = case
    qkv = randn(1, count, (n_heads + 2 * n_kv_heads) * head_dim, seed=seed, dtype=dtype)
    history = randn(2, 1, n_kv_heads, cache_len, head_dim, seed=seed + 1, dtype=dtype)  # earlier positions
    caches = []
    for _ in range(2):
        cache = KVCache(1, n_kv_heads, cache_len, head_dim, dtype, "cpu")
        cache.k.copy_(history[0])
        cache.v.copy_(history[1])
        caches.append(cache)
    cos_sin = rope.table(rope.frequencies(head_dim, 10000.0)[0], cache_len)[start:start + count]
    input_pos = torch.arange(start, start + count)
    mask = fn.causal_mask(input_pos, cache_len, window)
    reference = fn.attend(qkv, cos_sin, caches[0], input_pos, mask, n_heads, n_kv_heads)
    ours = torch.ops.runner.attend(qkv, cos_sin, caches[1].k, caches[1].v, input_pos, n_heads, n_kv_heads, window or 0)
    # The new key and value land in the cache at pos, as the reference writes them; nothing else moves.
    # (RoPE's x cos + rot sin may be one fused multiply-add: near cancellation only an absolute bound holds.)
    k_error = (caches[1].k.float() - caches[0].k.float()).abs()
    assert (k_error <= 2 * ulp(dtype) * (caches[0].k.abs().float() + caches[0].k.abs().max().float())).all()
    assert torch.equal(caches[1].v, caches[0].v)
    # Softmax and the weighted sum round a few times more than one op does.
    tolerance = (8 * ulp(dtype) if dtype == torch.bfloat16 else 1e-5) * (reference.abs().float().max() + 1e-3)
    assert ours.shape == reference.shape and (ours.float() - reference.float()).abs().max() <= tolerance


def test_attend_refuses_a_position_outside_the_cache():
    cache = KVCache(1, 1, 4, 8, torch.float32, "cpu")
    qkv, cos_sin = torch.ones(1, 1, 24), torch.ones(1, 2, 8)
    with pytest.raises(RuntimeError, match="outside the cache"):
        torch.ops.runner.attend(qkv, cos_sin, cache.k, cache.v, torch.tensor([4]), 1, 1)


@PROPERTY
@given(case=model_cases(max_len=12, max_batch=1))
@torch.no_grad()
def test_model_on_kernels_matches_hf_token_by_token(case):
    spec, seed, tokens = case
    hf, ours = build_twins(spec, seed)
    ours.use_ops(kernels.KernelOps())
    length = tokens.shape[1]
    logits = run_chunks(ours, tokens, list(range(1, length)), length + 2)
    reference = hf(tokens).logits
    assert (logits - reference).abs().max().item() <= logits_bound(reference)


@PROPERTY
@given(case=model_cases(min_len=2, max_len=24, max_batch=1), data=st.data())
@torch.no_grad()
def test_model_on_kernels_matches_hf_in_chunks(case, data):
    # Chunks of up to MAX_ROWS tokens (a speculative verify, a short prompt) take the kernels;
    # longer ones torch's GEMM and attention.
    spec, seed, tokens = case
    hf, ours = build_twins(spec, seed)
    ours.use_ops(kernels.KernelOps())
    split = data.draw(st.integers(1, tokens.shape[1] - 1), label="first chunk")
    logits = run_chunks(ours, tokens, [split], tokens.shape[1] + 3)
    reference = hf(tokens).logits
    assert (logits - reference).abs().max().item() <= logits_bound(reference)


@PROPERTY
@given(case=model_cases(min_len=2, max_len=12, max_batch=1))
@torch.no_grad()
def test_model_on_kernels_in_bf16_stays_with_the_reference_ops(case):
    spec, seed, tokens = case
    _, ours = build_twins(spec, seed)
    length = tokens.shape[1]
    exact = run_chunks(ours, tokens, list(range(1, length)), length)  # fp32: the math both approximate
    ours = ours.to(torch.bfloat16)
    reference = run_chunks(ours, tokens, list(range(1, length)), length).float()
    ours.use_ops(kernels.KernelOps())
    logits = run_chunks(ours, tokens, list(range(1, length)), length).float()
    # Both round to bf16, at different places (the kernels keep fp32 inside a fused op), so neither
    # is the other's reference: the kernels' error against fp32 stays within a small multiple of
    # torch's ops' own. A fixed share of the logits' size failed on tiny widths (dim 5), where a
    # norm's bf16 rounding alone moves the logits by 10%.
    ops_error = (reference - exact).abs().max().item()
    scale = max(1.0, exact.abs().max().item())
    assert (logits - exact).abs().max().item() <= 2 * ops_error + 0.02 * scale


SMALL = ModelSpec(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, intermediate_size=40, max_seq_len=64)


def test_transform_switches_ops_and_torch_keeps_the_reference():
    _, model = build_twins(SMALL, 0)
    assert use_runner_ops(model, Kernels.torch, torch.device("cpu"), "r.yaml") is None
    assert model.layers[0].attention.ops is fn
    # runner: whatever the target; auto: only a vectorised build (tested below)
    assert use_runner_ops(model, Kernels.runner, torch.device("cpu"), "r.yaml") == kernels.load()
    ops = model.ops
    assert isinstance(ops, kernels.KernelOps)
    assert all(m.ops is ops for m in model.modules() if hasattr(type(m), "ops"))


def test_a_failed_build_is_an_error_for_runner_and_a_note_for_auto(monkeypatch, tmp_path):
    # A real failed build: the compiler is handed a flag it does not know.
    monkeypatch.setenv("RUNNER_HOME", str(tmp_path))
    monkeypatch.setattr(kernels, "FLAGS", [*kernels.FLAGS, "-fno-such-flag"])
    monkeypatch.setattr(kernels, "_loaded", None)
    _, model = build_twins(SMALL, 0)
    with pytest.raises(ConfigError) as error:
        use_runner_ops(model, Kernels.runner, torch.device("cpu"), "r.yaml")
    assert "kernels" in str(error.value) and "cannot be built" in str(error.value) and "no-such-flag" in str(error.value)
    notes = []
    assert use_runner_ops(model, Kernels.auto, torch.device("cpu"), "r.yaml", notes.append) is None
    assert model.layers[0].attention.ops is fn
    assert any("cannot be built" in n and "torch's ops" in n for n in notes)


@PROPERTY
@given(case=model_cases(min_len=3, max_len=20, max_batch=1), dtype=DTYPES, data=st.data())
@torch.no_grad()
def test_a_verify_forward_on_kernels_equals_one_token_steps_bit_for_bit(case, dtype, data):
    # Each token's row takes the same path through the kernels whether it comes alone or with up
    # to MAX_ROWS - 1 others, so speculative verification agrees exactly with plain decoding.
    spec, seed, tokens = case
    _, ours = build_twins(spec, seed)
    ours = ours.to(dtype)
    ours.use_ops(kernels.KernelOps())
    length = tokens.shape[1]
    start = data.draw(st.integers(1, length - 1), label="tokens before the verify")
    count = min(length - start, kernels.MAX_ROWS)
    batched = run_chunks(ours, tokens[:, :start + count], [start], length)[:, start:]
    stepped = run_chunks(ours, tokens[:, :start + count], list(range(start, start + count)), length)[:, start:]
    assert torch.equal(batched, stepped)


# --- targets: the library is built for what the CPU has, and never loaded where it cannot run -------

V3 = kernels._V3  # an AVX2 CPU (x86-64-v3)
V4 = kernels._V4


def test_the_target_is_the_best_the_cpu_has(monkeypatch):
    monkeypatch.delenv(kernels.TARGET_VARIABLE, raising=False)
    names = [t.name for t in kernels.TARGETS]
    if "avx2" not in names:
        pytest.skip("x86-64 targets only")  # not reached on CI's x86-64 host
    assert kernels.choose_target(V4 | {"avx512_bf16", "avx512_vnni", "sse2"}).name == "avx512-bf16"
    assert kernels.choose_target(V4 | {"avx512_bf16"}).name == "avx512"  # its int8 dot products need VNNI too
    assert kernels.choose_target(V4).name == "avx512"
    assert kernels.choose_target(V3 | {"avx512_bf16"}).name == "avx2"  # bf16 alone is not AVX-512
    assert kernels.choose_target(V3 - {"fma"}).name == "generic"
    assert kernels.choose_target(frozenset()).name == "generic"


def test_the_loaded_library_is_the_target_asked_for():
    # CI runs this file once per target (RUNNER_KERNELS_TARGET): it must be that build that ran.
    assert torch.ops.runner.isa() == kernels.choose_target().name == kernels.load()


@pytest.fixture
def fresh_load(monkeypatch, tmp_path):
    """kernels.load() as in a new process on a CPU with only AVX2, in an empty RUNNER_HOME; the
    library loader is replaced by a recorder, so nothing is loaded into this process."""
    monkeypatch.setenv("RUNNER_HOME", str(tmp_path))
    monkeypatch.delenv(kernels.TARGET_VARIABLE, raising=False)
    monkeypatch.setattr(kernels, "_loaded", None)
    monkeypatch.setattr(kernels, "cpu_features", lambda: V3)
    loads = []

    def record(name, sources, build_directory, **kwargs):
        loads.append(build_directory)
        raise RuntimeError("error: not loading in a test")

    from torch.utils import cpp_extension
    monkeypatch.setattr(cpp_extension, "load", record)
    return loads


def test_a_cache_copied_from_an_avx512_machine_is_not_what_an_avx2_cpu_loads(fresh_load, tmp_path):
    bigger = kernels.build_dir(kernels.TARGETS[0])  # what an AVX512-BF16 machine left in the cache
    bigger.mkdir(parents=True)
    (bigger / "runner_kernels.so").write_bytes(b"")
    with pytest.raises(kernels.KernelsUnavailable):
        kernels.load()
    assert fresh_load == [str(kernels.build_dir(next(t for t in kernels.TARGETS if t.name == "avx2")))]


def test_a_library_recorded_for_features_the_cpu_lacks_is_refused_before_loading(fresh_load):
    avx2 = next(t for t in kernels.TARGETS if t.name == "avx2")
    where = kernels.build_dir(avx2)
    where.mkdir(parents=True)  # a mislabelled copy: the record says what it really needs
    (where / "target.json").write_text('{"name": "avx512-bf16", "needs": ["avx2", "avx512f", "avx512_bf16"]}')
    with pytest.raises(kernels.KernelsUnavailable, match="avx512_bf16, avx512f"):
        kernels.load()
    assert fresh_load == []  # refused before anything was loaded


def test_a_target_the_cpu_lacks_is_a_note_for_auto_and_an_error_for_runner(fresh_load, monkeypatch):
    # The host has AVX512-BF16; the simulated CPU does not, so asking for that build must be refused.
    monkeypatch.setenv(kernels.TARGET_VARIABLE, "avx512-bf16")
    _, model = build_twins(SMALL, 0)
    notes = []
    assert use_runner_ops(model, Kernels.auto, torch.device("cpu"), "r.yaml", notes.append) is None
    assert model.layers[0].attention.ops is fn
    assert any("lacks: avx512_bf16" in n and "torch's ops" in n for n in notes), notes
    with pytest.raises(ConfigError, match="lacks: avx512_bf16"):
        use_runner_ops(model, Kernels.runner, torch.device("cpu"), "r.yaml")
    assert fresh_load == []


def test_auto_keeps_torch_ops_where_the_kernels_have_no_vector_path(monkeypatch):
    generic = next(t for t in kernels.TARGETS if t.name == "generic")
    monkeypatch.setattr(kernels, "_loaded", generic)
    _, model = build_twins(SMALL, 0)
    notes = []
    assert use_runner_ops(model, Kernels.auto, torch.device("cpu"), "r.yaml", notes.append) is None
    assert model.layers[0].attention.ops is fn
    assert any("no vector path" in n for n in notes), notes
    assert use_runner_ops(model, Kernels.runner, torch.device("cpu"), "r.yaml") == "generic"
    assert isinstance(model.layers[0].attention.ops, kernels.KernelOps)


@PROPERTY
@given(case=attention_cases(), extra=st.integers(0, 40))
def test_rope_write_is_the_reference_rope_and_cache_write(case, extra):
    # A prompt's RoPE and cache write (any number of tokens), checked like attend's.
    n_heads, n_kv_heads, head_dim, cache_len, start, count, window, dtype, seed = case
    cache_len += extra
    count = min(count + extra, cache_len - start)
    qkv = randn(1, count, (n_heads + 2 * n_kv_heads) * head_dim, seed=seed, dtype=dtype)
    caches = [KVCache(1, n_kv_heads, cache_len, head_dim, dtype, "cpu") for _ in range(2)]
    cos_sin = rope.table(rope.frequencies(head_dim, 10000.0)[0], cache_len)[start:start + count]
    input_pos = torch.arange(start, start + count)
    q, k, v = qkv.split([n_heads * head_dim, n_kv_heads * head_dim, n_kv_heads * head_dim], dim=-1)
    q_ref = fn.apply_rope(q.view(1, count, n_heads, head_dim).transpose(1, 2), cos_sin)
    k_ref = fn.apply_rope(k.view(1, count, n_kv_heads, head_dim).transpose(1, 2), cos_sin)
    caches[0].update(input_pos, k_ref, v.view(1, count, n_kv_heads, head_dim).transpose(1, 2))
    ours = torch.ops.runner.rope_write(qkv, cos_sin, caches[1].k, caches[1].v, input_pos, n_heads, n_kv_heads)
    # RoPE's x cos + rot sin may be one fused multiply-add: near cancellation only an absolute bound holds.
    for a, b in ((ours, q_ref), (caches[1].k, caches[0].k)):
        assert a.shape == b.shape
        assert ((a.float() - b.float()).abs() <= 2 * ulp(dtype) * (b.abs().float() + b.abs().max().float())).all()
    assert torch.equal(caches[1].v, caches[0].v)


@st.composite
def prompt_attention_cases(draw):
    """A prompt's queries over the cache: at consecutive positions after earlier turns, or at any
    positions (each sees the cache up to its own), long enough to span several key blocks."""
    n_kv_heads = draw(st.integers(1, 3))
    n_heads = n_kv_heads * draw(st.integers(1, 3))
    # Multiples of 16 take bf16's paired path on AVX512-BF16; the others its fp32 one.
    head_dim = draw(st.sampled_from([16, 64, 128]) | st.integers(1, 40).map(lambda h: 2 * h))
    cache_len = draw(st.integers(1, 300))
    count = draw(st.integers(1, min(cache_len, 160)))
    if draw(st.booleans()):
        start = draw(st.integers(0, cache_len - count))
        positions = torch.arange(start, start + count)
    else:
        positions = torch.tensor(draw(st.lists(st.integers(0, cache_len - 1), min_size=count, max_size=count)))
    window = draw(st.none() | st.integers(1, cache_len))
    return n_heads, n_kv_heads, head_dim, cache_len, positions, window, draw(DTYPES), draw(seeds)


@settings(max_examples=80, deadline=None)
@given(case=prompt_attention_cases())
def test_causal_attention_is_float64_attention_under_the_causal_mask(case):
    n_heads, n_kv_heads, head_dim, cache_len, positions, window, dtype, seed = case
    count = len(positions)
    q = randn(1, n_heads, count, head_dim, seed=seed, dtype=dtype)
    k = randn(1, n_kv_heads, cache_len, head_dim, seed=seed + 1, dtype=dtype)
    v = randn(1, n_kv_heads, cache_len, head_dim, seed=seed + 2, dtype=dtype)
    mask = fn.causal_mask(positions, cache_len, window)
    reference = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask,
                                               enable_gqa=n_heads != n_kv_heads)
    reference = reference.transpose(1, 2).reshape(1, count, n_heads * head_dim)
    ours = torch.ops.runner.causal_attention(q, k, v, positions, window or 0)
    assert ours.shape == reference.shape and ours.dtype == dtype
    # fp32: a few roundings of sums of products. bf16: the output's rounding, plus the softmax
    # weights rounded to bf16 for the values' sum (as torch's bf16 flash attention rounds them).
    error = (ours.double() - reference).abs()
    if dtype == torch.float32:
        assert error.max() <= 1e-5 * (1 + v.abs().max())
    else:
        assert (error <= ulp(dtype) * (reference.abs() + v.abs().max().double())).all()


def test_causal_attention_refuses_bad_input_by_name():
    q, cache = torch.ones(1, 2, 3, 8), torch.ones(1, 1, 4, 8)
    with pytest.raises(RuntimeError, match="outside the cache"):
        torch.ops.runner.causal_attention(q, cache, cache, torch.tensor([0, 1, 4]))
    with pytest.raises(RuntimeError, match="multiple of n_kv_heads"):
        torch.ops.runner.causal_attention(torch.ones(1, 3, 3, 8), torch.ones(1, 2, 4, 8), torch.ones(1, 2, 4, 8),
                                          torch.arange(3))
    with pytest.raises(RuntimeError, match="window must be >= 0"):
        torch.ops.runner.causal_attention(q, cache, cache, torch.arange(3), -1)


@settings(max_examples=15, deadline=None)
@given(case=model_cases(min_len=70, max_len=200, max_batch=1), data=st.data())
@torch.no_grad()
def test_a_long_prompt_on_kernels_matches_hf(case, data):
    # Prompts of several key blocks, in one chunk or after an earlier turn (the second chunk's
    # queries then see the first's keys in the cache).
    spec, seed, tokens = case
    spec = dataclasses.replace(spec, max_seq_len=256)
    hf, ours = build_twins(spec, seed)
    ours.use_ops(kernels.KernelOps())
    splits = data.draw(st.just([]) | st.integers(kernels.MAX_ROWS + 1, tokens.shape[1] - 1).map(lambda s: [s]))
    logits = run_chunks(ours, tokens, splits, tokens.shape[1] + 5)
    reference = hf(tokens).logits
    assert (logits - reference).abs().max().item() <= logits_bound(reference)


class OneByOne(kernels.KernelOps):
    """runner's kernels, each layer's called one by one (no decode_layers)."""
    decode_layers = staticmethod(fn.decode_layers)


# GGUF layers of one type, or of two or three (each linear's rows in parts, as a file that stores
# q and k in one type and v in another); legacy types, which the gguf package quantizes.
GGUF_TYPES = st.sampled_from([(2,), (3,), (6,), (7,), (8,), (3, 8), (6, 8, 6)])


@settings(max_examples=40, deadline=None)
@given(mode=st.sampled_from([QuantMode.none, QuantMode.int8, QuantMode.int4, "int4, int8 activations", QuantMode.gguf]),
       dtype=DTYPES, window=st.none() | st.integers(1, 12), batch=st.integers(1, 2), int8_cache=st.booleans(),
       seed=seeds, data=st.data())
@torch.no_grad()
def test_the_layers_in_one_decode_layers_call_equal_their_calls_one_by_one(mode, dtype, window, batch, int8_cache, seed,
                                                                           data):
    # decode_layers runs the kernels the modules would call, in their order: bit for bit the same
    # logits and caches, for decode steps, a verify's few tokens, batch rows and one row of a batch,
    # over a float or an int8 KV cache; GGUF blocks with float or int8 activations too.
    spec = ModelSpec(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, intermediate_size=96,
                     max_seq_len=64, sliding_window=window, tie_embeddings=data.draw(st.booleans()))
    torch.manual_seed(seed)
    one_call = Transformer(spec).to(dtype)
    for p in one_call.parameters():
        p.data.normal_(0, 0.3)
    if mode is QuantMode.gguf:
        as_gguf(one_call, data.draw(GGUF_TYPES, label="types"))
        activations = data.draw(st.sampled_from(QuantActivations), label="activations")
        use_activations(one_call, QuantSection(mode=QuantMode.gguf, activations=activations))
        assert all(isinstance(m, GGUFLinear) for m in (one_call.layers[0].attention.wqkv, one_call.layers[0].feed_forward.w2))
    elif mode is not QuantMode.none:
        int8_x = isinstance(mode, str)
        section = QuantSection(mode=QuantMode.int4 if int8_x else mode, groupsize=32,
                               activations=QuantActivations.int8 if int8_x else QuantActivations.float)
        quantize_model(one_call, section)
        use_activations(one_call, section)
        assert any(getattr(m, "int8_x", False) for m in one_call.modules()) == int8_x
    use_runner_ops(one_call, Kernels.runner, torch.device("cpu"), "r.yaml")
    one_by_one = copy.deepcopy(one_call)
    one_by_one.use_ops(OneByOne())
    tokens = torch.randint(0, spec.vocab_size, (batch, 30), generator=torch.Generator().manual_seed(seed))
    prompt = data.draw(st.integers(1, kernels.MAX_ROWS // batch), label="prompt")
    steps = [(0, prompt)]
    while steps[-1][1] < tokens.shape[1]:
        start = steps[-1][1]
        steps.append((start, min(tokens.shape[1], start + data.draw(st.integers(1, 3), label="tokens"))))
    for model in (one_call, one_by_one):
        model.int8_cache = int8_cache
        model.setup_cache(batch, 40)
        assert model.layers[0].attention.kv_cache.k.dtype == (torch.int8 if int8_cache else dtype)
    assert one_call.ops.plan(one_call, dtype) is not None  # the fused step is taken, not skipped
    for start, end in steps:
        outs = [m(tokens[:, start:end], torch.arange(start, end)) for m in (one_call, one_by_one)]
        assert torch.equal(outs[0], outs[1])
    if batch == 2:  # one row of the batch, the other left as it is
        outs = [m(tokens[1:, :1], torch.arange(30, 31), row=1) for m in (one_call, one_by_one)]
        assert torch.equal(outs[0], outs[1])
    for a, b in zip(one_call.layers, one_by_one.layers):
        for name in ("k", "v") + (("k_scales", "v_scales") if int8_cache else ()):
            assert torch.equal(getattr(a.attention.kv_cache, name), getattr(b.attention.kv_cache, name))


def test_decode_layers_is_what_dense_layers_on_the_kernels_run():
    # It must actually be taken (a dense layer on runner's kernels), and not where a part needs its
    # own call: a layer on another kernel, or in another dtype.
    model = Transformer(SMALL)
    use_runner_ops(model, Kernels.runner, torch.device("cpu"), "r.yaml")
    assert model.layers[0].kernel_operands(torch.float32) is not None
    assert model.layers[0].kernel_operands(torch.bfloat16) is None
    quantize_model(model, QuantSection(mode=QuantMode.int8))
    assert model.layers[0].kernel_operands(torch.float32) is None  # the fallback kernel until packed
    use_runner_ops(model, Kernels.runner, torch.device("cpu"), "r.yaml")
    operands, groupsizes, int8_x = model.layers[0].kernel_operands(torch.float32)
    assert [len(o) for o in operands] == [2, 2, 2, 2] and groupsizes == [0, 0, 0, 0] and int8_x == [False] * 4


@torch.no_grad()
def test_quant_activations_int8_reaches_every_int4_linear_of_a_decode_step():
    # The recipe key's transform flags every int4 layer, decode_layers gets the flags, and its
    # logits are those of the int8 stand-ins of the activations, not of the activations themselves.
    spec = ModelSpec(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, intermediate_size=96, max_seq_len=16)
    torch.manual_seed(0)
    model = Transformer(spec)
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    as_float = copy.deepcopy(model)
    for m, activations in ((model, QuantActivations.int8), (as_float, QuantActivations.float)):
        quant_transform(m, QuantSection(mode=QuantMode.int4, groupsize=32, activations=activations))
        use_runner_ops(m, Kernels.runner, torch.device("cpu"), "r.yaml")
        m.setup_cache(1, 8)
    assert model.layers[0].kernel_operands(torch.float32)[2] == [True] * 4
    assert as_float.layers[0].kernel_operands(torch.float32)[2] == [False] * 4
    tokens, pos = torch.tensor([[3]]), torch.tensor([0])
    one_by_one = copy.deepcopy(model)
    one_by_one.use_ops(OneByOne())
    logits = model(tokens, pos)
    assert model.ops.plan(model, torch.float32).int8_x == [1] * 4 * spec.n_layers
    assert torch.equal(logits, one_by_one(tokens, pos))
    assert not torch.equal(logits, as_float(tokens, pos))
    # Switched off after a step (quant.activations: float): the gathered flags go with it.
    use_activations(model, QuantSection(mode=QuantMode.int4, groupsize=32))
    assert model.ops.plan(model, torch.float32).int8_x == [0] * 4 * spec.n_layers
    assert torch.equal(model(tokens, pos), as_float(tokens, pos))


@torch.no_grad()
def test_decode_layers_refuses_int8_activations_for_a_linear_that_is_not_int4():
    model = Transformer(SMALL)
    use_runner_ops(model, Kernels.runner, torch.device("cpu"), "r.yaml")
    model.setup_cache(1, 8)
    plan = model.ops.plan(model, torch.float32)
    x, pos = torch.randn(1, 1, SMALL.dim), torch.tensor([0])
    with pytest.raises(RuntimeError, match="int8_x set, which applies to int4 linears"):
        torch.ops.runner.decode_layers(x, plan.norms, plan.eps, plan.weights, plan.parts, plan.groupsizes,
                                       model.rope(pos), plan.k_caches, plan.v_caches, [], [], pos, plan.n_heads,
                                       plan.n_kv_heads, plan.window, [1] * len(plan.parts))


def small_model_on_kernels() -> Transformer:
    """SMALL with seeded weights, on runner's kernels (its decode steps take decode_layers)."""
    torch.manual_seed(0)
    model = Transformer(SMALL)
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    use_runner_ops(model, Kernels.runner, torch.device("cpu"), "r.yaml")
    return model


def test_the_layers_operands_are_gathered_once_and_again_after_any_change():
    # decode_layers' operands are gathered once per model and dtype, not per step; whatever
    # replaces the model's tensors tells the model (a new cache, a quantization, a cast, or by
    # hand model.operands_changed()), and they are gathered again.
    model = small_model_on_kernels()
    tokens = torch.randint(0, SMALL.vocab_size, (1, 8))

    def steps(m):  # a prompt token by token
        m.setup_cache(1, 16)
        return torch.cat([m(tokens[:, i:i + 1], torch.arange(i, i + 1)) for i in range(tokens.shape[1])], 1)

    def one_by_one():
        twin = copy.deepcopy(model)
        twin.use_ops(OneByOne())
        return steps(twin)

    first = steps(model)
    plan = model.ops.plan(model, torch.float32)
    model(tokens[:, :1], torch.arange(8, 9))
    assert model.ops.plan(model, torch.float32) is plan
    assert torch.equal(first, one_by_one())
    model.setup_cache(1, 16)
    assert model.ops.plan(model, torch.float32) is not plan
    plan = model.ops.plan(model, torch.float32)
    model.layers[1].attention.wo.weight = torch.nn.Parameter(torch.randn_like(model.layers[1].attention.wo.weight))
    model.operands_changed()
    assert model.ops.plan(model, torch.float32) is not plan
    assert torch.equal(steps(model), one_by_one())
    quantize_model(model, QuantSection(mode=QuantMode.int8))
    assert model.ops.plan(model, torch.float32) is None  # the fallback kernel until packed: each layer on its own
    use_runner_ops(model, Kernels.runner, torch.device("cpu"), "r.yaml")
    assert torch.equal(steps(model), one_by_one())
    model.to(torch.bfloat16)
    assert torch.equal(steps(model), one_by_one())
    assert model.ops.plan(model, torch.bfloat16) is not None  # int8 in bf16 still takes decode_layers


@torch.no_grad()
def test_an_eager_step_passes_the_held_operands_and_gets_the_listed_ops_result():
    # Eager whole-cache steps call decode_layers.held with one LayerOperands object made at the
    # first step and kept with the plan; its result and cache writes are the listed op's, bit for bit.
    model = small_model_on_kernels()
    model.setup_cache(1, 16)
    held = torch.ops.runner.decode_layers.held
    with mock.patch.object(torch.ops.runner.decode_layers, "held", wraps=held) as called:
        model(torch.tensor([[3]]), torch.arange(0, 1))
        model(torch.tensor([[4]]), torch.arange(1, 2))
    assert called.call_count == 2
    plan = model.ops.plan(model, torch.float32)
    assert plan.held is not None and called.call_args_list[0].args[1] is called.call_args_list[1].args[1] is plan.held
    x = torch.randn(1, 1, SMALL.dim)
    pos = torch.tensor([2])
    caches = [t.clone() for t in plan.k_caches + plan.v_caches]
    ours = held(x, plan.held, model.rope(pos), pos)
    written = [t.clone() for t in plan.k_caches + plan.v_caches]
    for t, c in zip(plan.k_caches + plan.v_caches, caches):
        t.copy_(c)
    norms, eps, weights, parts, groupsizes, k, v, ks, vs, heads, kv_heads, window, int8_x = plan.operands()
    listed = torch.ops.runner.decode_layers(x, norms, eps, weights, parts, groupsizes, model.rope(pos), k, v, ks, vs,
                                            pos, heads, kv_heads, window, int8_x)
    assert torch.equal(ours, listed)
    assert all(torch.equal(a, b) for a, b in zip(written, plan.k_caches + plan.v_caches))
    model.setup_cache(1, 16)  # new caches: a new plan, and a new held object at its first step
    model(torch.tensor([[3]]), torch.arange(0, 1))
    assert model.ops.plan(model, torch.float32).held is not plan.held


def test_an_unreadable_record_is_refused_before_loading(fresh_load):
    where = kernels.build_dir(next(t for t in kernels.TARGETS if t.name == "avx2"))
    where.mkdir(parents=True)
    (where / "target.json").write_text("{not json")
    with pytest.raises(kernels.KernelsUnavailable, match="unreadable"):
        kernels.load()
    assert fresh_load == []
