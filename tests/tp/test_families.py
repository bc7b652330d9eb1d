"""Tensor parallelism for the families beyond LLaMA (Qwen2, Qwen3, Gemma 2, Gemma 3, Phi-3), and
kv heads replicated where there are fewer of them than ranks.

On 2 gloo ranks (tests/tp/pool.py), each family's tiny random model sharded computes what it
computes unsharded, within test_sharded's bound: Qwen2's qkv bias follows wqkv's rows, q/k norms
and sandwich norms stay whole, and one kv head is copied to both ranks. Wider splits (4 ranks over
1 or 2 kv heads) are checked in this process, without ranks: the ranks' partial attention outputs,
summed as the all-reduce would, equal the unsharded attention's, over prefill and cached decode.
"""
import copy
import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from runner import sharders
from runner.config.schema import ModelSpec, tp_problems
from runner.parallel import Rank
from tests.properties.families import FAMILIES, family_specs
from tests.tp.pool import RankPool, build, run_job
from tests.tp.test_sharded import assert_same, reference_of

pytestmark = pytest.mark.tp


@pytest.fixture(scope="module")
def pool():
    started = RankPool(2)
    yield started
    started.close()


@st.composite
def split_specs(draw, family: str, world_size: int, kv: int | None = None) -> ModelSpec:
    """A tiny `family` spec (families.family_specs) whose heads split over `world_size` ranks:
    world_size or 2 x world_size query heads, and `kv` kv heads or kv heads drawn that divide the
    world size or are divided by it (one kv head included)."""
    spec = draw(family_specs((family,)))
    heads = world_size * draw(st.sampled_from([1, 2]))
    if kv is None:
        kv = draw(st.sampled_from([k for k in (1, 2, 4, 8) if heads % k == 0 and (k % world_size == 0 or world_size % k == 0)]))
    spec = dataclasses.replace(spec, n_heads=heads, n_kv_heads=kv, dim=heads * (spec.dim // spec.n_heads),
                               intermediate_size=world_size * max(spec.intermediate_size // world_size, 1))
    assert spec.problems() == [] and tp_problems(spec, world_size) == []
    return spec


@st.composite
def jobs(draw, spec: ModelSpec) -> dict:
    n = draw(st.integers(1, 24))
    tokens = torch.tensor(draw(st.lists(st.integers(0, spec.vocab_size - 1), min_size=n, max_size=n)))
    return dict(spec=spec, seed=draw(st.integers(0, 2**31)), tokens=tokens, greedy=8,
                chunks=draw(st.lists(st.integers(1, 8), min_size=1, max_size=3)))


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=4, deadline=None)
@given(data=st.data())
def test_each_family_sharded_over_2_ranks_equals_the_unsharded_model(pool, family, data):
    job = data.draw(jobs(data.draw(split_specs(family, 2))))
    # Sandwich norms normalise each all-reduced sum at once, so the sum's rounding grows by
    # 1 / rms(sum), large where a tiny model's (4 wide, in one example) partial sums nearly cancel:
    # 3.2e-5 against a row maximum of 2.8 there.
    assert_same(pool.run(job), reference_of(job), 1e-4 if job["spec"].sandwich_norms else 1e-5)


# Gemma 3 270M's attention (4 query heads, 1 kv head) in miniature: q/k norms, sandwich norms,
# GeGLU, local layers with their own RoPE base beside a global one.
GEMMA3_MQA = ModelSpec(dim=64, n_layers=2, n_heads=4, n_kv_heads=1, head_dim=16, vocab_size=97, intermediate_size=48,
                       max_seq_len=64, tie_embeddings=True, family="gemma3", sliding_window=5, global_every=2,
                       qk_norm=True, norm_offset=1.0, scale_embeddings=True, activation="gelu_tanh",
                       sandwich_norms=True, query_pre_attn_scalar=16, rope_theta=1e6, rope_local_theta=1e4)
QWEN2_MQA = ModelSpec(dim=64, n_layers=2, n_heads=4, n_kv_heads=1, head_dim=16, vocab_size=97, intermediate_size=48,
                      max_seq_len=64, family="qwen2", qkv_bias=True)


@pytest.mark.parametrize("spec", [GEMMA3_MQA, QWEN2_MQA], ids=["gemma3", "qwen2"])
def test_one_kv_head_is_copied_to_both_ranks(pool, spec):
    """Each rank keeps 2 query heads and the one kv head, so its KV cache holds one head."""
    job = dict(spec=spec, seed=7, tokens=torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]), greedy=16, chunks=[5, 3])
    assert_same(pool.run(job), reference_of(job))
    plan = sharders.plan(spec, 2)
    assert (plan.heads, plan.kv_heads) == (2, 1)


def test_one_kv_head_on_runner_kernels_is_copied_to_both_ranks(pool):
    """LLaMA's plain attention over one kv head, through runner's fused decode step on each rank."""
    spec = ModelSpec(dim=64, n_layers=2, n_heads=4, n_kv_heads=1, vocab_size=97, intermediate_size=64, max_seq_len=64)
    job = dict(spec=spec, seed=11, tokens=torch.arange(1, 10), greedy=8, chunks=[4], kernels=True)
    assert_same(pool.run(job), reference_of(job))


@torch.no_grad()
def _partial_attention(spec: ModelSpec, world_size: int, seed: int, tokens: torch.Tensor) -> None:
    """Every layer's attention, unsharded and summed over `world_size` ranks' shares (each rank's wo
    without its all-reduce), on the same input: prefill of tokens[:-3], then 3 cached decode steps."""
    whole = build(dict(spec=spec, seed=seed))
    ranks = []
    for r in range(world_size):  # no process group: shard() then only keeps the rank's share
        model = sharders.shard(copy.deepcopy(whole), sharders.plan(spec, world_size), Rank(r, world_size, world_size))
        for layer in model.layers:
            layer.attention.wo = layer.attention.wo.inner  # the rank's partial output: the test sums them
        model.setup_cache(1, spec.max_seq_len)
        ranks.append(model)
    n = len(tokens)
    steps = [torch.arange(n - 3)] + [torch.tensor([i]) for i in range(n - 3, n)]
    for pos in steps:
        x = whole.embed(tokens[None, pos])
        for i, (cos_sin, mask) in enumerate(whole.layer_inputs(pos, spec.max_seq_len)):
            attend = [m.layers[i] for m in [whole, *ranks]]
            h = attend[0].attention_norm(x)
            ref = attend[0].attention(h, cos_sin, mask, pos)
            summed = sum(layer.attention(h, cos_sin, mask, pos) for layer in attend[1:])
            assert ((summed - ref).abs() <= 1e-5 * ref.abs().amax().clamp(min=1)).all(), (i, pos)


@pytest.mark.parametrize("kv", [1, 2])
@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=3, deadline=None)
@given(data=st.data())
def test_4_ranks_over_fewer_kv_heads_sum_to_the_unsharded_attention(family, kv, data):
    """2 ranks per kv head (kv=2) or all 4 on one (kv=1, Gemma 3 270M's shape), each family's attention."""
    spec = data.draw(split_specs(family, 4, kv))
    _partial_attention(spec, 4, seed=data.draw(st.integers(0, 2**31)), tokens=torch.arange(1, 14) % spec.vocab_size)


@pytest.mark.parametrize("world_size, kv_heads", [(2, 1), (4, 1), (4, 2), (8, 2)])
def test_a_rank_keeps_the_kv_head_its_query_heads_read(world_size, kv_heads):
    heads, hd = 8, 4
    spec = ModelSpec(dim=32, n_layers=1, n_heads=heads, n_kv_heads=kv_heads, head_dim=hd, vocab_size=10,
                     intermediate_size=8 * world_size, qkv_bias=True)
    plan = sharders.plan(spec, world_size)
    q_per = heads // world_size
    assert (plan.heads, plan.kv_heads) == (q_per, 1)
    qkv = plan.linears["attention.wqkv"]
    assert plan.biases == {"attention.qkv_bias": qkv}  # the bias follows wqkv's rows exactly
    for r, rows in enumerate(qkv.blocks):
        kv = r * q_per // (heads // kv_heads)  # the kv head of the rank's first query head (all of them share it)
        expected = [*range(r * q_per, (r + 1) * q_per), heads + kv, heads + kv_heads + kv]
        assert torch.equal(rows // hd, torch.tensor(expected).repeat_interleave(hd))


def test_the_qkv_bias_shard_is_the_rows_of_wqkv_it_is_added_to():
    spec = dataclasses.replace(QWEN2_MQA, n_layers=1)
    whole = build(dict(spec=spec, seed=3))
    x = torch.randn(1, 3, spec.dim)
    full = whole.layers[0].attention.wqkv(x) + whole.layers[0].attention.qkv_bias
    plan = sharders.plan(spec, 2)
    for r in range(2):
        attention = sharders.shard(copy.deepcopy(whole), plan, Rank(r, 2, 2)).layers[0].attention
        rows = plan.linears["attention.wqkv"].blocks[r]
        assert torch.allclose(attention.wqkv(x) + attention.qkv_bias, full[..., rows], atol=1e-6)


def test_heads_that_do_not_split_are_still_a_recipe_error():
    """Kv heads may be shared by whole groups of ranks, but every rank needs whole query heads, and
    a kv head cannot serve ranks that straddle it."""
    def spec(heads: int, kv: int) -> ModelSpec:
        return ModelSpec(dim=16 * heads, n_layers=1, n_heads=heads, n_kv_heads=kv, vocab_size=10, intermediate_size=96)

    assert tp_problems(spec(4, 1), 2) == tp_problems(spec(4, 1), 4) == tp_problems(spec(4, 2), 4) == []
    [(key, value, why)] = tp_problems(spec(6, 2), 4)  # 6 query heads: no whole share for 4 ranks
    assert (key, value) == ("world_size", 4)
    assert "n_heads=6, n_kv_heads=2" in why and why.endswith("world sizes that work: 1, 2, 6")
    [(_, _, why)] = tp_problems(spec(6, 3), 2)  # 3 kv heads neither split over 2 ranks nor are shared by them
    assert why.endswith("world sizes that work: 1, 3, 6")
    with pytest.raises(ValueError, match="world sizes that work: 1, 2, 6"):
        sharders.plan(spec(6, 2), 4)
