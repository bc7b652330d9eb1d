"""N-gram drafts in batched decoding (BatchDecoder(drafts=...), what `runner serve` runs for a
recipe with draft.kind: ngram): rows keep different numbers of drafts a step, and each row's tokens
are the ones it draws without drafts: greedy, sampled with a seed, with penalties."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.decoders.batched import BatchDecoder
from runner.decoders.proposers import NGramProposer
from runner.decoders.sampling import Sampling
from runner.kernels import MAX_ROWS
from tests.decoders.test_batched import CACHE, MODELS, logits_alone

STEPS = 16
SAMPLINGS = [Sampling(), Sampling(temperature=0.8, top_k=20), Sampling(temperature=0.7, repetition_penalty=1.3),
             Sampling(frequency_penalty=0.5)]


def decode(decoder: BatchDecoder, prompts, joins, samplings, seeds) -> tuple[dict[int, list[int]], list[int]]:
    """Each prompt started at its join step, then decoded until it has STEPS + 1 tokens: (tokens
    per prompt, how many tokens each step gave each row)."""
    tokens, slot_of, counts, step = {}, {}, [], 0
    while len(tokens) < len(prompts) or slot_of:
        for i, (prompt, join) in enumerate(zip(prompts, joins)):
            if join <= step and i not in tokens:
                slot, first = decoder.start(prompt, samplings[i], seeds[i])
                slot_of[slot], tokens[i] = i, [first.id]
        for slot, new in decoder.step().items():
            i = slot_of[slot]
            counts.append(len(new))
            tokens[i] += [t.id for t in new]
            if len(tokens[i]) > STEPS:
                decoder.finish(slot)
                del slot_of[slot]
        step += 1
    return {i: t[:STEPS + 1] for i, t in tokens.items()}, counts


@st.composite
def batches(draw):
    """2-4 rows: prompts that repeat a pattern (so the n-gram lookup finds matches), joining at
    different steps, each with its sampling and seed."""
    n = draw(st.integers(2, 4))
    prompts = []
    for _ in range(n):
        pattern = draw(st.lists(st.integers(0, 159), min_size=1, max_size=5))
        prompts.append((pattern * draw(st.integers(1, 4)) + draw(st.lists(st.integers(0, 159), max_size=3)))[:20])
    joins = sorted(draw(st.lists(st.integers(0, 4), min_size=n, max_size=n)))
    samplings = [draw(st.sampled_from(SAMPLINGS)) for _ in range(n)]
    seeds = [draw(st.integers(0, 2**31)) for _ in range(n)]
    return prompts, joins, samplings, seeds


@settings(max_examples=12, deadline=None)
@given(batches(), st.integers(1, 6), st.sampled_from([(3, 1), (2, 2), (1, 1)]), st.sampled_from(["kernels", "torch"]))
def test_each_row_with_drafts_draws_what_it_draws_without(batch, k, ngram, ops):
    # The draft part runs on other kernel paths than one-token steps (within 1e-5, not bit for
    # bit), so a greedy row may part from its plain run only where the plain logits are a near-tie.
    prompts, joins, samplings, seeds = batch
    model = MODELS[False, ops]
    plain, _ = decode(BatchDecoder(model, 4, CACHE), prompts, joins, samplings, seeds)
    proposer = NGramProposer(model.spec.vocab_size, *ngram)
    drafted, _ = decode(BatchDecoder(model, 4, CACHE, drafts=(proposer, k)), prompts, joins, samplings, seeds)
    for i, prompt in enumerate(prompts):
        same = next((j for j, (a, b) in enumerate(zip(drafted[i], plain[i])) if a != b), None)
        if same is None:
            continue
        assert samplings[i] == Sampling() and same > 0, (i, drafted[i], plain[i])
        logits = logits_alone(model, prompt, plain[i][:same])[-1]
        top2 = logits.topk(2).values
        assert top2[0] - top2[1] <= 2e-5 * logits.abs().max().clamp(min=1)


def test_drafts_are_kept_several_a_step_and_rows_keep_different_numbers():
    # A prompt that repeats itself: greedy decoding of the tiny model goes on repeating, so its
    # drafts are kept; the row beside with no match gets one token a step.
    model = MODELS[False, "kernels"]
    prompts = [[3, 9, 27, 81] * 5, [150]]
    samplings, seeds = [Sampling(), Sampling()], [None, None]
    plain, plain_counts = decode(BatchDecoder(model, 2, CACHE), prompts, [0, 0], samplings, seeds)
    proposer = NGramProposer(model.spec.vocab_size, 3, 1)
    drafted, counts = decode(BatchDecoder(model, 2, CACHE, drafts=(proposer, 4)), prompts, [0, 0], samplings, seeds)
    assert drafted == plain
    assert set(plain_counts) == {1} and max(counts) > 1 and min(counts) == 1
    assert len(counts) < len(plain_counts)  # fewer forwards for the same tokens


def test_drafts_stop_at_the_end_of_the_cache():
    model = MODELS[False, "kernels"]
    decoder = BatchDecoder(model, 1, 12, drafts=(NGramProposer(model.spec.vocab_size), 8))
    slot, first = decoder.start([5, 6, 5, 6, 5, 6, 5], Sampling())
    tokens = [first.id]
    while out := decoder.step():
        tokens += [t.id for t in out[slot]]
    assert len(tokens) == 12 - 7 + 1  # positions 7..11 hold the fed tokens, the last is drawn after
    assert decoder.rows[slot].position == 12
    with torch.inference_mode():
        assert decoder.held[slot] == [5, 6, 5, 6, 5, 6, 5] + tokens[:-1]


def test_a_steps_drafts_keep_its_forward_within_the_kernels_rows():
    # Four rows drafting 8 each would make a forward of 4 + 32 rows, past what runner's GEMV
    # kernels take: the drafts are cut to one length so that the forward fits MAX_ROWS.
    model = MODELS[False, "kernels"]
    decoder = BatchDecoder(model, 4, CACHE, drafts=(NGramProposer(model.spec.vocab_size), 8))
    for i in range(4):
        slot, _ = decoder.start(list(range(10 * i, 10 * i + 10)) * 2, Sampling())
        decoder.rows[slot].tokens = [10 * i]  # its context ends with a trigram seen before: 8 drafts follow
    assert {s: len(t) for s, t in decoder._drafted(decoder.busy(), 100).items()} == {0: 8, 1: 8, 2: 8, 3: 8}
    assert [len(t) for t in decoder._drafted(decoder.busy(), MAX_ROWS - 4).values()] == [3, 3, 3, 3]
    sizes = []
    whole = model.forward_parts
    model.forward_parts = lambda parts: sizes.append(sum(p.tokens.numel() for p in parts)) or whole(parts)
    try:
        decoder.step()
    finally:
        del model.forward_parts
    assert sizes == [4 + 12]
