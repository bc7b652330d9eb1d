"""Batched decoding (runner/decoders/batched.py) against single-sequence decoding.

Rows of different prompt lengths, joining at different steps, each at its own cache positions:
- on runner's kernels a row's logits do not depend on which rows share the batch, bit for bit
  (batch invariance: every kernel computes each row on its own);
- on torch's ops they agree within 1e-5 x max(1, |logits|), and greedy tokens agree wherever the
  single-sequence run's top two logits are not a near-tie;
- a seeded sampled row draws the same tokens alone and batched;
- mixture-of-experts rows route each to their own experts.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from runner import kernels
from runner.checkpoint import random_state_dict
from runner.config.schema import ModelSpec
from runner.decoders.batched import BatchDecoder
from runner.decoders.sampling import Sampling
from runner.model.llama import Transformer

CACHE = 64
STEPS = 12


def model_for(moe: bool, ops: str, dtype=torch.float32) -> Transformer:
    spec = ModelSpec(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=160, intermediate_size=96,
                     max_seq_len=128, n_experts=4 if moe else None, sliding_window=12 if moe else None)
    # Unit-variance weights: N(0, 0.02) would leave every logit near a tie.
    state = {k: v if v.ndim == 1 else v * 40 * v.shape[-1] ** -0.5 for k, v in random_state_dict(spec, 0).items()}
    model = Transformer(spec)
    model.load_state_dict(state)
    model = model.to(dtype).eval()
    if ops == "kernels":
        kernels.load()
        model.use_ops(kernels.KernelOps())
    return model


MODELS = {(moe, ops): model_for(moe, ops) for moe in (False, True) for ops in ("torch", "kernels")}
INT8_CACHE = model_for(False, "kernels")
INT8_CACHE.int8_cache = True  # quant.kv_cache: int8, rows of one cache with their own scales


@st.composite
def schedules(draw):
    """2-5 prompts of 1-20 tokens, each joining after some number of decode steps."""
    n = draw(st.integers(2, 5))
    prompts = [draw(st.lists(st.integers(0, 159), min_size=1, max_size=20)) for _ in range(n)]
    joins = sorted(draw(st.lists(st.integers(0, 6), min_size=n, max_size=n)))
    return prompts, joins


def logits_alone(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """Logits [len(tokens), V] of decoding `tokens` after `prompt`, one row in a one-slot cache, one token a step."""
    decoder = BatchDecoder(model, 1, CACHE)
    with torch.inference_mode():
        out = [model(torch.tensor([prompt]), torch.arange(len(prompt))[None], last_only=True, row=0)[0, -1]]
        for i, token in enumerate(tokens[:-1]):
            out.append(model(torch.tensor([[token]]), torch.tensor([[len(prompt) + i]]))[0, -1])
    del decoder
    return torch.stack(out)


def run_batched(model, prompts, joins, sampling=Sampling(), seeds=None, slots=5):
    """Each prompt's STEPS tokens and their logits, decoded together, prompt i joining before step joins[i]."""
    decoder = BatchDecoder(model, slots, CACHE)
    captured = {}
    # The last forward's logits (a step runs the slots up to the last busy one: row s is slot s).
    hook = model.register_forward_hook(lambda module, args, out: captured.update(logits=out))
    tokens, logits, slot_of = {}, {}, {}
    step = 0
    while len(tokens) < len(prompts) or any(len(t) < STEPS for t in tokens.values()):
        for i, (prompt, join) in enumerate(zip(prompts, joins)):
            if join == step and i not in tokens:
                slot, first = decoder.start(prompt, sampling, None if seeds is None else seeds[i])
                slot_of[slot], tokens[i], logits[i] = i, [first.id], []
        for slot, (token,) in decoder.step().items():
            i = slot_of[slot]
            if len(tokens[i]) < STEPS:
                tokens[i].append(token.id)
                logits[i].append(captured["logits"][slot, -1].clone())
            else:
                decoder.finish(slot)
        step += 1
    hook.remove()
    return tokens, logits


@settings(max_examples=30, deadline=None)
@given(schedules(), st.booleans())
def test_on_runner_kernels_a_rows_logits_do_not_depend_on_its_batch(schedule, moe):
    prompts, joins = schedule
    model = MODELS[(moe, "kernels")]
    tokens, logits = run_batched(model, prompts, joins)
    for i, prompt in enumerate(prompts):
        alone = logits_alone(model, prompt, tokens[i])[1:]  # the decode steps (the prefill is one row anyway)
        assert torch.equal(torch.stack(logits[i]), alone), i


@settings(max_examples=10, deadline=None)
@given(schedules(), st.sampled_from([3, 6, 8]), st.booleans())
def test_gguf_blocks_on_runner_kernels_keep_a_rows_logits_independent_of_its_batch(schedule, qtype, int8_x):
    """quant.mode gguf's layers (Q4_1, Q5_0, Q8_0; float or int8 activations) compute each row alone."""
    from runner import quant
    from runner.config.schema import QuantActivations, QuantMode, QuantSection
    from tests.quant.helpers import as_gguf

    model = as_gguf(model_for(False, "kernels"), qtype)
    quant.pack_for(model, "cpu", "runner")
    activations = QuantActivations.int8 if int8_x else QuantActivations.float
    quant.use_activations(model, QuantSection(mode=QuantMode.gguf, activations=activations))
    prompts, joins = schedule
    tokens, logits = run_batched(model, prompts, joins)
    for i, prompt in enumerate(prompts):
        alone = logits_alone(model, prompt, tokens[i])[1:]
        assert torch.equal(torch.stack(logits[i]), alone), i


@settings(max_examples=10, deadline=None)
@given(schedules())
def test_over_an_int8_cache_a_rows_logits_do_not_depend_on_its_batch(schedule):
    prompts, joins = schedule
    tokens, logits = run_batched(INT8_CACHE, prompts, joins)
    assert INT8_CACHE.layers[0].attention.kv_cache.k.dtype == torch.int8
    for i, prompt in enumerate(prompts):
        alone = logits_alone(INT8_CACHE, prompt, tokens[i])[1:]
        assert torch.equal(torch.stack(logits[i]), alone), i


@settings(max_examples=30, deadline=None)
@given(schedules(), st.booleans())
def test_on_torch_ops_batched_rows_agree_with_single_rows(schedule, moe):
    prompts, joins = schedule
    model = MODELS[(moe, "torch")]
    tokens, logits = run_batched(model, prompts, joins)
    for i, prompt in enumerate(prompts):
        alone = logits_alone(model, prompt, tokens[i])
        batched = torch.cat([alone[:1], torch.stack(logits[i])])
        bound = 1e-5 * alone.abs().max().clamp(min=1)
        assert (batched - alone).abs().max() <= bound, i
        # Greedy: each token is the argmax of its own row's logits, and equals the single row's
        # choice unless that was a near-tie.
        top = alone.topk(2, dim=-1).values
        decided = (top[:, 0] - top[:, 1]) > 1e-4
        assert all(t == int(a) for t, a, d in zip(tokens[i], alone.argmax(-1), decided) if d), i


@pytest.mark.parametrize("ops", ["torch", "kernels"])
@pytest.mark.parametrize("moe", [False, True])
def test_a_row_joining_mid_batch_gets_its_tokens_alone(ops, moe):
    model = MODELS[(moe, ops)]
    prompts = [[5, 6, 7], list(range(30, 47)), [9] * 4]
    joins = [0, 3, 7]
    batched, _ = run_batched(model, prompts, joins)
    for i, prompt in enumerate(prompts):
        alone, _ = run_batched(model, [prompt], [0], slots=1)
        assert batched[i] == alone[0]


@pytest.mark.parametrize("ops", ["torch", "kernels"])
def test_seeded_rows_sample_the_same_tokens_alone_and_batched(ops):
    model = MODELS[(False, ops)]
    sampling = Sampling(temperature=1.0, top_k=40, top_p=0.9)
    prompts, seeds = [[1, 2, 3], [4] * 9, [7, 8]], [11, 22, 33]
    batched, _ = run_batched(model, prompts, [0, 1, 2], sampling, seeds)
    for i, prompt in enumerate(prompts):
        alone, _ = run_batched(model, [prompt], [0], sampling, [seeds[i]], slots=1)
        assert batched[i] == alone[0]
    other, _ = run_batched(model, prompts[:1], [0], sampling, [12], slots=1)
    assert other[0] != batched[0]  # the seed matters: another draws otherwise


def test_slots_prompts_and_cache_are_checked():
    model = MODELS[(False, "torch")]
    decoder = BatchDecoder(model, 2, 16)
    with pytest.raises(ValueError, match="leaves no room"):
        decoder.start(list(range(16)), Sampling())
    decoder.start([1], Sampling())
    decoder.start([2], Sampling())
    with pytest.raises(ValueError, match="all 2 slots are busy"):
        decoder.start([3], Sampling())
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len"):
        BatchDecoder(model, 1, 1000)


def test_a_full_row_is_not_stepped_past_its_cache():
    model = MODELS[(False, "torch")]
    decoder = BatchDecoder(model, 2, 8)
    slot, _ = decoder.start([1, 2, 3, 4, 5, 6, 7], Sampling())  # position 7: one more token fits
    other, _ = decoder.start([1], Sampling())
    assert set(decoder.step()) == {slot, other}
    assert set(decoder.step()) == {other}  # the first row's cache is full


@st.composite
def conversations(draw):
    """A first prompt, then a second that resends a prefix of the first prompt and its answer
    (a chat client's next turn) and adds tokens of its own."""
    first = draw(st.lists(st.integers(0, 159), min_size=1, max_size=20))
    kept = draw(st.integers(0, len(first) + 6))
    new = draw(st.lists(st.integers(0, 159), min_size=1, max_size=12))
    return first, kept, new


def greedy_run(decoder: BatchDecoder, prompt: list[int], steps: int, busy: int | None = None):
    """start(prompt) then `steps` steps: the slot, its tokens and the logits each came from."""
    captured = []
    hook = decoder.model.register_forward_hook(lambda module, args, out: captured.append(out))
    try:
        slot, token = decoder.start(prompt, Sampling())
        logits, tokens = [captured[-1][0, -1].clone()], [token.id]
        for _ in range(steps):
            tokens.append(decoder.step()[slot][0].id)
            logits.append(captured[-1][slot, -1].clone())
    finally:
        hook.remove()
    return slot, tokens, torch.stack(logits)


@settings(max_examples=25, deadline=None)
@given(conversations(), st.sampled_from(["kernels", "torch", "int8 cache"]), st.booleans())
def test_a_prompt_sharing_a_finished_slots_prefix_prefills_only_the_rest(conversation, ops, busy_beside):
    # Prefix caching: the second prompt takes the slot that holds its prefix and prefills the
    # rest only; its logits are a cold start's (within 1e-5 x max(1, |logits|): the prefill runs
    # in other chunks) and so its greedy tokens, up to a near-tie, with or without another row
    # decoding beside it (which runs the free slot along with the batch).
    first, kept, new = conversation
    model = INT8_CACHE if ops == "int8 cache" else MODELS[False, "torch" if ops == "torch" else "kernels"]
    decoder = BatchDecoder(model, 3, CACHE)
    slot, answer, _ = greedy_run(decoder, first, 5)
    decoder.finish(slot)
    if busy_beside:
        decoder.start([7, 8, 9], Sampling())
        for _ in range(3):
            decoder.step()
    second = (first + answer)[:kept] + new
    held = first + answer[:-1]  # the last answer token was never fed
    common = next((i for i, (a, b) in enumerate(zip(held, second)) if a != b), min(len(held), len(second)))
    again, tokens, logits = greedy_run(decoder, second, 6)
    assert decoder.reused == min(common, len(second) - 1) and (again == slot or decoder.reused == 0)
    cold = BatchDecoder(model, 1, CACHE)
    _, cold_tokens, cold_logits = greedy_run(cold, second, 6)
    assert cold.reused == 0
    same = next((i for i, (a, b) in enumerate(zip(tokens, cold_tokens)) if a != b), len(tokens))
    bound = 1e-5 * cold_logits[:same + 1].abs().amax(-1, keepdim=True).clamp(min=1)
    assert ((logits[:same + 1] - cold_logits[:same + 1]).abs() <= bound).all()
    if same < len(tokens):  # only a near-tie in the cold run's logits may part them
        top2 = cold_logits[same].topk(2).values
        assert top2[0] - top2[1] <= 2 * bound[same]


def test_without_prefix_caching_every_prompt_is_prefilled_whole():
    model = MODELS[False, "kernels"]
    decoder = BatchDecoder(model, 2, CACHE, prefix_cache=False)
    slot, _ = decoder.start([1, 2, 3, 4], Sampling())
    decoder.step()
    decoder.finish(slot)
    decoder.start([1, 2, 3, 4, 5], Sampling())
    assert decoder.reused == 0
