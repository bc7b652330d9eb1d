"""Our mixture-of-experts Transformer against HF's MixtralForCausalLM: same weights, same logits through
every cache path (torch's ops and runner's kernels), the same greedy tokens, both checkpoint layouts,
and HF's routing to the bit: its tie-breaking and its renormalisation of the chosen experts' weights."""
import dataclasses
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

from runner import kernels
from runner.loaders.hf_layout import PER_EXPERT, from_hf, to_hf
from runner.model import functional as fn
from runner.model.llama import Transformer
from tests.properties.strategies import MAX_SEQ_LEN, logits_bound, model_cases, moe_specs, twins
from tests.properties.test_greedy_vs_hf import assert_greedy_matches_hf
from tests.properties.test_model_vs_hf import assert_logits_match, run_chunks

PROPERTY = settings(max_examples=50, deadline=None)
seeds = st.integers(0, 2**32 - 1)


@pytest.fixture(scope="module")
def kernel_ops():
    kernels.load()
    return kernels.KernelOps


@PROPERTY
@given(case=model_cases(specs=moe_specs()), spare=st.integers(0, 8))
@torch.no_grad()
def test_prefill_matches_hf(case, spare):
    spec, seed, tokens = case
    hf, ours = twins(spec, seed)
    assert_logits_match(run_chunks(ours, tokens, [], tokens.shape[1] + spare), hf(tokens).logits)


@PROPERTY
@given(case=model_cases(specs=moe_specs()), spare=st.integers(0, 8))
@torch.no_grad()
def test_token_by_token_decode_matches_hf(case, spare):
    spec, seed, tokens = case
    hf, ours = twins(spec, seed)
    length = tokens.shape[1]
    assert_logits_match(run_chunks(ours, tokens, list(range(1, length)), length + spare), hf(tokens).logits)


@PROPERTY
@given(case=model_cases(min_len=2, specs=moe_specs()), data=st.data())
@torch.no_grad()
def test_split_prefill_matches_hf(case, data):
    spec, seed, tokens = case
    hf, ours = twins(spec, seed)
    split = data.draw(st.integers(1, tokens.shape[1] - 1), label="first chunk")
    assert_logits_match(run_chunks(ours, tokens, [split], tokens.shape[1]), hf(tokens).logits)


@PROPERTY
@given(case=model_cases(max_batch=1, specs=moe_specs()), data=st.data())
@torch.no_grad()
def test_kernels_match_hf(case, data, kernel_ops):
    """Prefill (grouped experts past 16 rows), token by token (the expert_linear and attend kernels)
    and a split prefill, all through runner's kernels."""
    spec, seed, tokens = case
    hf, ours = twins(spec, seed)
    ours.use_ops(kernel_ops())
    reference, length = hf(tokens).logits, tokens.shape[1]
    split = data.draw(st.integers(0, length - 1), label="first chunk")  # 0: one chunk
    for splits in ([], list(range(1, length)), [split] if split else []):
        assert_logits_match(run_chunks(ours, tokens, splits, length), reference)


@PROPERTY
@given(case=model_cases(max_batch=1, specs=moe_specs(windows=st.none() | st.integers(2, MAX_SEQ_LEN))),
       n=st.integers(1, 8))
def test_greedy_matches_hf_generate(case, n):
    """Windows of 2 or more: HF's DynamicSlidingWindowLayer keeps `[-sliding_window + 1:]` of the
    keys, all of them for a window of 1, so HF's cached decode there disagrees with its own forward."""
    spec, seed, tokens = case
    assert_greedy_matches_hf(*twins(spec, seed), tokens, n)


@PROPERTY
@given(spec=moe_specs(), seed=seeds, layout=st.sampled_from(["fused", "per-expert"]))
def test_hf_layout_round_trips_exactly(spec, seed, layout):
    hf, ours = twins(spec, seed)
    hf_state, our_state = hf.state_dict(), ours.state_dict()
    for original, back in ((our_state, from_hf(to_hf(our_state, spec, experts=layout), spec)),
                           (hf_state, to_hf(from_hf(hf_state, spec), spec, experts="fused"))):
        assert back.keys() == original.keys()
        for key, tensor in original.items():
            assert torch.equal(back[key], tensor), key
    # Mixtral's hub checkpoints: w1 the gate, w3 the up projection, w2 the down projection.
    per_expert = to_hf(our_state, spec, experts="per-expert")
    for i in range(spec.n_layers):
        mlp, moe = f"model.layers.{i}.mlp.", f"model.layers.{i}.{PER_EXPERT}"
        gate_up, down = hf_state[f"{mlp}experts.gate_up_proj"], hf_state[f"{mlp}experts.down_proj"]
        assert torch.equal(per_expert[f"{moe}gate.weight"], hf_state[f"{mlp}gate.weight"])
        for j in range(spec.n_experts):
            assert torch.equal(per_expert[f"{moe}experts.{j}.w1.weight"], gate_up[j, :spec.intermediate_size])
            assert torch.equal(per_expert[f"{moe}experts.{j}.w3.weight"], gate_up[j, spec.intermediate_size:])
            assert torch.equal(per_expert[f"{moe}experts.{j}.w2.weight"], down[j])


@PROPERTY
@given(n_experts=st.integers(1, 8), data=st.data(), rows=st.integers(1, 40), dim=st.integers(1, 64),
       scale=st.sampled_from([0.1, 1.0, 10.0, 100.0]), seed=seeds)
def test_route_is_hf_router_to_the_bit(n_experts, data, rows, dim, scale, seed):
    """route() on the router's logits gives HF's MixtralTopKRouter's weights and ids exactly: with
    duplicated router rows (ties, exact or an ulp apart, which the softmax may round to equal
    probabilities) and with softmaxes sharp enough to underflow."""
    k = data.draw(st.integers(1, min(2, n_experts)), label="top k")
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n_experts, dim, generator=gen) * scale
    copies = data.draw(st.lists(st.tuples(st.integers(0, n_experts - 1), st.integers(0, n_experts - 1)),
                                max_size=3), label="router rows copied (from, to)")
    for src, dst in copies:
        weight[dst] = weight[src]
    x = torch.randn(rows, dim, generator=gen)
    router = MixtralTopKRouter(SimpleNamespace(num_experts_per_tok=k, num_local_experts=n_experts, hidden_size=dim))
    with torch.no_grad():
        router.weight.copy_(weight)
        _, hf_weights, hf_ids = router(x)
    weights, ids = fn.route(F.linear(x, weight), k)
    assert torch.equal(ids, hf_ids)
    assert weights.dtype == torch.float32 and torch.equal(weights, hf_weights)


def swap_experts(ours: Transformer, a: int, b: int) -> Transformer:
    """A copy of ours with experts a and b's feed-forwards swapped (their router rows kept)."""
    state = {key: value.clone() for key, value in ours.state_dict().items()}
    for key, value in state.items():
        if ".experts." in key:
            value[[a, b]] = value[[b, a]]
    swapped = Transformer(ours.spec)
    swapped.load_state_dict(state)
    return swapped.eval()


@PROPERTY
@given(spec=moe_specs(), data=st.data(), seed=seeds)
@torch.no_grad()
def test_exact_router_ties_match_hf(spec, data, seed, kernel_ops):
    """Two experts with identical router rows tie exactly on every token; which of them a token
    gets (the top-k's tie-break) must be HF's, in a prompt and in every decode step, through
    torch's ops and runner's kernels. Experts k + 1 to k + 2, so the tie often decides.

    The shared row is one-hot: a dense one does not tie exactly, since a matmul may sum the
    outputs of two equal weight rows in different orders (torch's one-row F.linear gives them
    logits an ulp apart, in HF's cached decode as in ours); a single product sums the same in any.
    """
    k = spec.n_experts_per_token
    spec = dataclasses.replace(spec, n_experts=data.draw(st.integers(k + 1, k + 2), label="experts"))
    a, b = data.draw(st.permutations(range(spec.n_experts)), label="experts order")[:2]
    column = data.draw(st.integers(0, spec.dim - 1), label="one-hot column")
    value = data.draw(st.floats(0.5, 4.0), label="one-hot value")
    length = data.draw(st.integers(1, 24), label="length")
    tokens = torch.tensor([data.draw(st.lists(st.integers(0, spec.vocab_size - 1), min_size=length,
                                              max_size=length), label="tokens")])
    hf, _ = twins(spec, seed)
    for layer in hf.model.layers:
        layer.mlp.gate.weight[[a, b]] = 0.0
        layer.mlp.gate.weight[[a, b], column] = value
    ours = Transformer(spec).eval()
    ours.load_state_dict(from_hf(hf.state_dict(), spec))
    reference = hf(tokens).logits
    # Only examples where the tie decided something: the other tie-break gives other logits.
    swapped = run_chunks(swap_experts(ours, a, b), tokens, [], length)
    assume((swapped - reference).abs().max().item() > 10 * logits_bound(reference))

    assert_logits_match(run_chunks(ours, tokens, [], length), reference)
    assert_logits_match(run_chunks(ours, tokens, list(range(1, length)), length), reference)
    ours.use_ops(kernel_ops())
    assert_logits_match(run_chunks(ours, tokens, list(range(1, length)), length), reference)


@PROPERTY
@given(spec=moe_specs(), seed=seeds, tokens=st.integers(1, 24))
@torch.no_grad()
def test_top1_block_is_its_expert_as_in_hf(spec, seed, tokens):
    """With one expert per token the renormalised weight is exactly 1: the block's output is the
    chosen expert's output (HF's too), not that output times its softmax probability p_max."""
    spec = dataclasses.replace(spec, n_experts_per_token=1)
    hf, ours = twins(spec, seed)
    x = torch.randn(1, tokens, spec.dim, generator=torch.Generator().manual_seed(seed))
    ours_block, hf_block = ours.layers[0].feed_forward, hf.model.layers[0].mlp
    expected = hf_block(x)

    got = ours_block(x)

    bound = 1e-5 * max(1.0, expected.abs().max().item())
    assert (got - expected).abs().max().item() <= bound
    ids = fn.route(ours_block.gate(x[0]), 1)[1][:, 0]
    w13, w2 = ours_block.experts.w13.weight[ids], ours_block.experts.w2.weight[ids]  # [T, 2I, D], [T, D, I]
    alone = torch.einsum("tdi,ti->td", w2, fn.swiglu(torch.einsum("tid,td->ti", w13, x[0])))
    assert (got[0] - alone).abs().max().item() <= bound
    # Unrenormalised, the block would differ from its expert by (1 - p_max) of it: far past the bound.
    p_max = torch.softmax(ours_block.gate(x[0]), dim=-1).max(dim=-1).values  # [T]
    assume(((1 - p_max)[:, None] * alone).abs().max().item() > 10 * bound)
