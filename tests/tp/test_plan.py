"""The shard plan, without any rank: every row or column of a split linear goes to exactly one
rank, in whole heads, and a spec that does not split is refused with tp_problems' reason."""
import pytest
import torch

from runner import sharders
from runner.config.schema import ModelSpec, tp_problems
from runner.model.llama import Transformer
from runner.parallel import Rank

DENSE = ModelSpec(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=10, intermediate_size=96)
MOE = ModelSpec(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=10, intermediate_size=96,
                n_experts=4, n_experts_per_token=2)


@pytest.mark.parametrize("world_size", [1, 2])
def test_each_row_and_column_goes_to_exactly_one_rank(world_size):
    plan = sharders.plan(DENSE, world_size)
    sizes = {"attention.wqkv": (4 + 2 * 2) * 16, "attention.wo": 4 * 16, "feed_forward.w13": 2 * 96, "feed_forward.w2": 96}
    assert set(plan.linears) == set(sizes)
    for name, split in plan.linears.items():
        kept = torch.cat(split.blocks)
        assert torch.equal(kept.sort().values, torch.arange(sizes[name])), name
        assert len({len(block) for block in split.blocks}) == 1, name  # an equal share each
    assert (plan.heads, plan.kv_heads) == (4 // world_size, 2 // world_size)


def test_a_rank_keeps_its_own_q_k_and_v_heads():
    qkv = sharders.plan(DENSE, 2).linears["attention.wqkv"].blocks[1]  # rows: q heads 0-3, k heads 4-5, v heads 6-7
    assert torch.equal(qkv // 16, torch.tensor([2] * 16 + [3] * 16 + [5] * 16 + [7] * 16))


def test_a_mixture_of_experts_splits_each_expert_and_sums_once_after_the_weighting():
    plan = sharders.plan(MOE, 2)
    assert {"feed_forward.experts.w13", "feed_forward.experts.w2"} <= set(plan.linears)
    assert plan.reduced == ("attention.wo", "feed_forward.experts")


def test_a_spec_that_does_not_split_is_refused_with_the_reason():
    [(_, _, why)] = tp_problems(DENSE, 3)
    with pytest.raises(ValueError) as info:
        sharders.plan(DENSE, 3)
    assert str(info.value) == why


def test_shard_refuses_a_plan_for_another_world_size():
    with torch.device("meta"):
        model = Transformer(DENSE)
    with pytest.raises(ValueError, match="plan is for 2 ranks"):
        sharders.shard(model, sharders.plan(DENSE, 2), Rank(0, 4, 4))


def test_one_rank_keeps_the_whole_model():
    with torch.device("meta"):
        model = Transformer(DENSE)
    before = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    sharders.shard(model, sharders.plan(DENSE, 1), Rank(0, 1, 1))
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == before


def test_a_rank_keeps_its_share_of_each_layer_and_sums_the_row_parallel_ones():
    with torch.device("meta"):
        model = Transformer(DENSE)
    sharders.shard(model, sharders.plan(DENSE, 2), Rank(1, 2, 2))
    layer = model.layers[0]
    assert tuple(layer.attention.wqkv.weight.shape) == ((2 + 2 * 1) * 16, 64)
    assert tuple(layer.feed_forward.w13.weight.shape) == (2 * 48, 64)
    assert isinstance(layer.attention.wo, sharders.AllReduce) and isinstance(layer.feed_forward.w2, sharders.AllReduce)
    assert tuple(layer.attention.wo.inner.weight.shape) == (64, 2 * 16)
    assert (layer.attention.n_heads, layer.attention.n_kv_heads) == (2, 1)
