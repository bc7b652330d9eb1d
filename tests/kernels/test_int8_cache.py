"""An int8 KV cache (quant.kv_cache: int8) against independent references: float64 attention over
the cache's dequantized keys and values, with the queries on int8's grid, as the reference
(runner.model.functional) defines it; the model through it against itself with a float cache;
the recipe key reaching every cache it sets up."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from runner import kernels, pipeline
from runner import generate as generating
from runner.config.errors import ConfigError
from runner.config.schema import ModelSpec
from runner.model import functional as fn
from runner.model.llama import KVCache, Transformer
from runner.recipes import load as resolve
from tests.kernels.test_kernels import DTYPES, attention_cases, prompt_attention_cases, randn, seeds, ulp

PROPERTY = settings(max_examples=50, deadline=None)
TINY = str(Path(__file__).resolve().parents[2] / "recipes" / "tiny-random.yaml")


@pytest.fixture(scope="module", autouse=True)
def built():
    return kernels.load()


@given(rows=st.integers(1, 5), dim=st.integers(1, 200), scale=st.floats(1e-6, 1e4), seed=seeds)
def test_quantize_rows_is_symmetric_int8_per_row(rows, dim, scale, seed):
    x = scale * randn(rows, dim, seed=seed)
    x[0] = 0  # an all-zero row: scale 0, values 0
    q, d = fn.quantize_rows(x)
    assert q.dtype == torch.int8 and d.dtype == torch.float32 and d.shape == (rows,)
    assert (q.abs() <= 127).all() and d[0] == 0 and (q[0] == 0).all()
    amax = x.abs().amax(dim=-1)
    assert torch.allclose(d.double(), amax.double() / 127, rtol=1e-6)
    # Each value is the nearest multiple of its row's scale; the largest is +-127 of them.
    error = (q.double() * d[:, None].double() - x.double()).abs()
    assert (error <= d[:, None].double() * (0.5 + 1e-5)).all()
    assert (q[1:].abs().amax(dim=-1) == 127).all()


def int8_cache(n_kv_heads, cache_len, head_dim, dtype, seed):
    """A cache whose earlier positions hold random int8 keys and values with random scales."""
    cache = KVCache(1, n_kv_heads, cache_len, head_dim, dtype, "cpu", int8=True)
    g = torch.Generator().manual_seed(seed)
    for values, scales in ((cache.k, cache.k_scales), (cache.v, cache.v_scales)):
        values.copy_(torch.randint(-127, 128, values.shape, generator=g, dtype=torch.int8))
        scales.copy_(torch.rand(scales.shape, generator=g) * 0.05)
    return cache


def no_rotation(count: int, head_dim: int) -> torch.Tensor:
    """cos 1, sin 0: RoPE leaves every head as it is (exactly, whether or not it fuses a multiply-add),
    so the int8 rounding of keys and queries is checked exactly; RoPE itself is checked with float caches."""
    return torch.stack([torch.ones(count, head_dim), torch.zeros(count, head_dim)], dim=1)


def reference_attention(q, cache, positions, window, dtype):
    """float64 attention of q [1, H, T, D] (put on int8's grid) over the cache, each read as `dtype`."""
    q = fn.dequantize_rows(*fn.quantize_rows(q), dtype).double()
    k = fn.dequantize_rows(cache.k, cache.k_scales, dtype).double()
    v = fn.dequantize_rows(cache.v, cache.v_scales, dtype).double()
    mask = fn.causal_mask(positions, cache.k.shape[2], window)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
    return y.transpose(1, 2).reshape(1, len(positions), -1), v.abs().max()


@PROPERTY
@given(case=attention_cases())
def test_attend_over_an_int8_cache_is_float64_attention_over_its_values(case):
    n_heads, n_kv_heads, head_dim, cache_len, start, count, window, dtype, seed = case
    qkv = randn(1, count, (n_heads + 2 * n_kv_heads) * head_dim, seed=seed, dtype=dtype)
    cache = int8_cache(n_kv_heads, cache_len, head_dim, dtype, seed + 1)
    before = {name: getattr(cache, name).clone() for name in ("k", "v", "k_scales", "v_scales")}
    input_pos = torch.arange(start, start + count)
    ours = torch.ops.runner.attend(qkv, no_rotation(count, head_dim), cache.k, cache.v, input_pos, n_heads, n_kv_heads,
                                   window or 0, cache.k_scales, cache.v_scales)
    # The new keys and values are written as quantize_rows writes them, and nothing else moves.
    q, k, v = qkv.split([n_heads * head_dim, n_kv_heads * head_dim, n_kv_heads * head_dim], dim=-1)
    for name, x in (("k", k), ("v", v)):
        expected_q, expected_d = fn.quantize_rows(x.view(count, n_kv_heads, head_dim).transpose(0, 1))
        before[name][0, :, start:start + count] = expected_q
        before[f"{name}_scales"][0, :, start:start + count] = expected_d
    for name, expected in before.items():
        assert torch.equal(getattr(cache, name), expected), name
    # Decoding takes integer dot products of the int8 queries and keys: nothing is rounded to dtype before them.
    reference, v_max = reference_attention(q.view(1, count, n_heads, head_dim).transpose(1, 2), cache, input_pos,
                                           window, torch.float64)
    # The values' weights are int16 (off by 1/65534 of the largest, which is at most 1 of the
    # normaliser), 64 positions a chunk; the rest is fp32 sums and the output's rounding.
    bound = (64 / 65534 + 1e-5) * v_max + (ulp(dtype) * reference.abs() if dtype == torch.bfloat16 else 0)
    assert ours.shape == reference.shape and ((ours.double() - reference).abs() <= bound).all()


@settings(max_examples=40, deadline=None)
@given(case=prompt_attention_cases())
def test_a_prompts_attention_over_an_int8_cache_is_float64_attention_over_its_values(case):
    n_heads, n_kv_heads, head_dim, cache_len, positions, window, dtype, seed = case
    count = len(positions)
    q = randn(1, n_heads, count, head_dim, seed=seed, dtype=dtype)
    cache = int8_cache(n_kv_heads, cache_len, head_dim, dtype, seed + 1)
    ours = torch.ops.runner.causal_attention(q, cache.k, cache.v, positions, window or 0, cache.k_scales,
                                             cache.v_scales)
    reference, v_max = reference_attention(q, cache, positions, window, dtype)  # a prompt reads the cache as dtype
    error = (ours.double() - reference).abs()
    if dtype == torch.float32:
        assert error.max() <= 1e-5 * (1 + v_max)
    else:  # as the float cache's test: the output's rounding and bf16 softmax weights
        assert (error <= ulp(dtype) * (reference.abs() + v_max)).all()


@PROPERTY
@given(case=attention_cases(), extra=st.integers(0, 40))
def test_a_prompts_cache_write_quantizes_each_key_and_value(case, extra):
    n_heads, n_kv_heads, head_dim, cache_len, start, count, window, dtype, seed = case
    cache_len += extra
    count = min(count + extra, cache_len - start)
    qkv = randn(1, count, (n_heads + 2 * n_kv_heads) * head_dim, seed=seed, dtype=dtype)
    cache = int8_cache(n_kv_heads, cache_len, head_dim, dtype, seed + 1)
    input_pos = torch.arange(start, start + count)
    torch.ops.runner.rope_write(qkv, no_rotation(count, head_dim), cache.k, cache.v, input_pos, n_heads, n_kv_heads,
                                cache.k_scales, cache.v_scales)
    _, k, v = qkv.split([n_heads * head_dim, n_kv_heads * head_dim, n_kv_heads * head_dim], dim=-1)
    for x, values, scales in ((k, cache.k, cache.k_scales), (v, cache.v, cache.v_scales)):
        expected_q, expected_d = fn.quantize_rows(x.view(count, n_kv_heads, head_dim).transpose(0, 1))
        assert torch.equal(values[0, :, start:start + count], expected_q)
        assert torch.equal(scales[0, :, start:start + count], expected_d)


def test_int8_cache_ops_refuse_bad_scales_by_name():
    cache = int8_cache(1, 4, 8, torch.float32, 0)
    qkv, cos_sin, pos = torch.ones(1, 1, 24), no_rotation(1, 8), torch.tensor([1])
    with pytest.raises(RuntimeError, match="come together"):
        torch.ops.runner.attend(qkv, cos_sin, cache.k, cache.v, pos, 1, 1, 0, cache.k_scales, None)
    with pytest.raises(RuntimeError, match="fp32"):
        torch.ops.runner.attend(qkv, cos_sin, cache.k, cache.v, pos, 1, 1, 0, cache.k_scales[..., :2], cache.v_scales)
    with pytest.raises(RuntimeError, match="scales come with int8 caches"):
        float_cache = KVCache(1, 1, 4, 8, torch.float32, "cpu")
        torch.ops.runner.attend(qkv, cos_sin, float_cache.k, float_cache.v, pos, 1, 1, 0, cache.k_scales, cache.v_scales)
    with pytest.raises(RuntimeError, match="int8 with scales"):  # an int8 cache without its scales
        torch.ops.runner.attend(qkv, cos_sin, cache.k, cache.v, pos, 1, 1)


SPEC = ModelSpec(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, intermediate_size=160, head_dim=64,
                 max_seq_len=256)


@settings(max_examples=10, deadline=None)
@given(dtype=DTYPES, seed=seeds)
@torch.no_grad()
def test_a_model_on_an_int8_cache_agrees_with_its_reference_and_stays_near_a_float_cache(dtype, seed):
    # runner's kernels (a prompt's GEMM path, then decode_layers) against the torch reference, both
    # over an int8 cache; and the int8 cache's logits near the float cache's.
    torch.manual_seed(seed)
    model = Transformer(SPEC)
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    model = model.to(dtype)
    tokens = torch.randint(0, SPEC.vocab_size, (1, 200), generator=torch.Generator().manual_seed(seed))
    logits = {}
    for name, ops, int8 in (("kernels", kernels.KernelOps(), True), ("torch", fn, True), ("float", fn, False)):
        model.use_ops(ops)
        model.int8_cache = int8
        model.setup_cache(1, 200)
        assert model.layers[0].attention.kv_cache.quantized == int8
        out = [model(tokens[:, :150], torch.arange(150))]
        out += [model(tokens[:, i:i + 1], torch.arange(i, i + 1)) for i in range(150, 200)]
        logits[name] = torch.cat(out, dim=1).double()
    scale = logits["float"].abs().max()
    # The paths' activations differ by float rounding (bf16's a lot more), and where a key, value or
    # query sits near a midpoint of its int8 grid that moves it by a whole step (1/127 of its row's largest).
    rounding = 2e-3 if dtype == torch.float32 else 3e-2
    assert (logits["kernels"] - logits["torch"]).abs().max() <= rounding * scale
    assert (logits["torch"] - logits["float"]).abs().max() <= 0.05 * scale


@settings(max_examples=10, deadline=None)
@given(dtype=DTYPES, lengths=st.lists(st.integers(1, 90), min_size=2, max_size=3), seed=seeds)
@torch.no_grad()
def test_batch_rows_at_their_own_positions_over_an_int8_cache_agree_with_the_reference(dtype, lengths, seed):
    # Rows of a batch, each prefilled alone to its own length, then decoded together at per-row
    # positions [B, 1]: runner's kernels against the torch reference, both over int8 caches.
    torch.manual_seed(seed)
    model = Transformer(SPEC)
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    model = model.to(dtype)
    model.int8_cache = True
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, SPEC.vocab_size, (1, n), generator=g) for n in lengths]
    steps = torch.randint(0, SPEC.vocab_size, (len(lengths), 6), generator=g)
    logits = {}
    for name, ops in (("kernels", kernels.KernelOps()), ("torch", fn)):
        model.use_ops(ops)
        model.setup_cache(len(lengths), 100)
        for row, prompt in enumerate(prompts):
            model(prompt, torch.arange(prompt.shape[1]), row=row)
        out = [model(steps[:, i:i + 1], torch.tensor(lengths)[:, None] + i) for i in range(steps.shape[1])]
        logits[name] = torch.cat(out, dim=1).double()
    rounding = 2e-3 if dtype == torch.float32 else 3e-2  # as above: a value moved by a whole int8 step
    assert (logits["kernels"] - logits["torch"]).abs().max() <= rounding * logits["torch"].abs().max()


def test_the_recipe_key_sets_up_int8_caches_for_the_model_and_its_draft(tmp_path, monkeypatch):
    # Speculative greedy decoding over int8 caches gives plain greedy decoding's tokens; the
    # draft's cache follows draft.quant.kv_cache, not the target's key.
    monkeypatch.setenv("RUNNER_HOME", str(tmp_path))
    greedy = ["quant.kv_cache=int8", "generate.max_new_tokens=12", "generate.temperature=0"]
    runs = {}
    for name, extra in (("plain", []), ("speculative", ["draft.kind=model", "draft.model=${model}"]),
                        ("int8 draft", ["draft.kind=model", "draft.model=${model}", "quant.kv_cache=float",
                                        "draft.quant.kv_cache=int8"])):
        built = pipeline.build(resolve(TINY, greedy + extra, check_files=True), TINY)
        tokens, _ = generating.generate(built, generating.encode_prompt(built, TINY))
        runs[name] = built, tokens
    assert runs["plain"][1] == runs["speculative"][1] and len(runs["plain"][1]) == 12
    cache_dtype = lambda model: model.layers[0].attention.kv_cache.k.dtype  # noqa: E731
    assert cache_dtype(runs["plain"][0].model) == torch.int8
    assert cache_dtype(runs["speculative"][0].decoder.proposer.model) != torch.int8
    assert cache_dtype(runs["int8 draft"][0].model) != torch.int8
    assert cache_dtype(runs["int8 draft"][0].decoder.proposer.model) == torch.int8
    with pytest.raises(ConfigError, match="kv_cache"):
        resolve(TINY, ["quant.kv_cache=int4"])
