"""Chunked prefill (BatchDecoder.admit, then prefill() or step(chunks=...)): a prompt run a chunk
at a time, with another row decoding between its chunks or in the same forward, gives the logits
and tokens of a prompt prefilled whole, and the row beside it decodes as it would alone."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.decoders.batched import BatchDecoder
from runner.decoders.sampling import Sampling
from tests.decoders.test_batched import CACHE, INT8_CACHE, MODELS, greedy_run

STEPS = 5


def model_of(ops: str):
    return INT8_CACHE if ops == "int8 cache" else MODELS[False, "torch" if ops == "torch" else "kernels"]


def chunked_run(decoder: BatchDecoder, prompt: list[int], chunks: list[int], beside: int | None, mixed: bool):
    """admit(prompt), prefill it in `chunks` (the last repeated until the prompt has run), the row
    in slot `beside` stepping between chunks (mixed: each chunk runs inside that step, through
    step(chunks=...)); then STEPS steps. (the prompt's tokens and logits, the row beside's tokens
    and logits meanwhile)"""
    captured = []
    hook = decoder.model.register_forward_hook(lambda module, args, out: captured.append(out))
    whole = decoder.model.forward_parts
    decoder.model.forward_parts = lambda parts: captured.append(whole(parts)) or captured[-1]
    beside_tokens, beside_logits = [], []
    try:
        slot = decoder.admit(prompt, Sampling())
        ran, token, i = decoder.reused, None, 0  # a finished slot's cache may hold the prompt's start
        while token is None:
            size = chunks[min(i, len(chunks) - 1)]
            if mixed:
                out = decoder.step({slot: size})
                n = decoder.rows[slot].position - ran
                token = out.pop(slot, [None])[0]
                if beside is not None:
                    beside_tokens.append(out[beside][0].id)
                    beside_logits.append(captured[-1][0][beside, -1].clone())
            else:
                n, token = decoder.prefill(slot, size)
                if token is None and beside is not None:
                    out = decoder.step()
                    assert slot not in out  # a row still prefilling draws no token
                    beside_tokens.append(out[beside][0].id)
                    beside_logits.append(captured[-1][beside, -1].clone())
            assert n == min(size, len(prompt) - ran) and n > 0
            ran, i = ran + n, i + 1
        assert ran == len(prompt)
        last = captured[-1][-1] if mixed else captured[-1]  # a mixed forward's parts: the chunk's is last
        logits, tokens = [last[0, -1].clone()], [token.id]
        for _ in range(STEPS):
            out = decoder.step()
            tokens.append(out[slot][0].id)
            logits.append(captured[-1][slot, -1].clone())
            if beside is not None:
                beside_tokens.append(out[beside][0].id)
                beside_logits.append(captured[-1][beside, -1].clone())
    finally:
        hook.remove()
        del decoder.model.forward_parts
    return tokens, torch.stack(logits), beside_tokens, beside_logits


def agree(tokens, logits, reference_tokens, reference_logits) -> None:
    """Logits within 1e-5 x max(1, |logits|) up to where the greedy tokens part, and they part
    only at a near-tie of the reference."""
    same = next((i for i, (a, b) in enumerate(zip(tokens, reference_tokens)) if a != b), len(tokens))
    bound = 1e-5 * reference_logits[:same + 1].abs().amax(-1, keepdim=True).clamp(min=1)
    assert ((logits[:same + 1] - reference_logits[:same + 1]).abs() <= bound).all()
    if same < len(tokens):
        top2 = reference_logits[same].topk(2).values
        assert top2[0] - top2[1] <= 2 * bound[same]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 159), min_size=1, max_size=40), st.lists(st.integers(1, 20), min_size=1, max_size=4),
       st.sampled_from(["kernels", "torch", "int8 cache"]), st.booleans(), st.booleans())
def test_a_prompt_prefilled_in_chunks_between_steps_decodes_as_one_prefilled_whole(prompt, chunks, ops, busy, mixed):
    # The chunks run on other kernel paths than one prefill (as a prefix-cached prompt's do), and
    # inside a step the decode rows go through the linears with the chunk's tokens: agreement
    # within 1e-5, not bit for bit.
    model = model_of(ops)
    decoder = BatchDecoder(model, 3, CACHE)
    beside = None
    if busy:  # the row beside in the last slot: the prefilling slot below it rides along in its steps
        slots = [decoder.start(p, Sampling())[0] for p in ([1, 2], [3, 4], [7, 8, 9])]
        beside = slots[-1]
        for slot in slots[:-1]:
            decoder.finish(slot)
    tokens, logits, beside_tokens, beside_logits = chunked_run(decoder, prompt, chunks, beside, mixed)
    _, whole_tokens, whole_logits = greedy_run(BatchDecoder(model, 1, CACHE), prompt, STEPS)
    agree(tokens, logits, whole_tokens, whole_logits)
    if busy:  # the row beside draws what it draws alone, step for step
        _, alone_tokens, alone_logits = greedy_run(BatchDecoder(model, 1, CACHE), [7, 8, 9], len(beside_tokens))
        agree(beside_tokens, torch.stack(beside_logits), alone_tokens[1:], alone_logits[1:])


def test_several_prompts_chunk_in_one_step_with_the_rows_decoding():
    model = model_of("kernels")
    decoder = BatchDecoder(model, 4, CACHE)
    beside = decoder.start([7, 8, 9], Sampling())[0]
    a, b = decoder.admit(list(range(30)), Sampling()), decoder.admit(list(range(40, 45)), Sampling())
    out = decoder.step({a: 16, b: 16})
    assert set(out) == {beside, b}  # b's prompt is done, a's is not
    assert decoder.rows[a].position == 16 and decoder.held[a] == list(range(16))
    out = decoder.step({a: 16})
    assert set(out) == {beside, a, b}


def test_prefill_runs_only_what_is_left_and_refuses_a_prompt_that_has_run():
    decoder = BatchDecoder(MODELS[False, "kernels"], 2, CACHE)
    slot = decoder.admit(list(range(10)), Sampling())
    assert decoder.prefill(slot, 4)[0] == 4 and decoder.step() == {}  # nothing to decode yet
    ran, token = decoder.prefill(slot, 100)
    assert ran == 6 and token is not None
    with pytest.raises(ValueError, match="has no prompt left to prefill"):
        decoder.prefill(slot, 1)
    assert set(decoder.step()) == {slot}


def test_a_row_finished_while_prefilling_leaves_its_prefix_for_the_next_prompt():
    decoder = BatchDecoder(MODELS[False, "kernels"], 1, CACHE)
    slot = decoder.admit(list(range(20)), Sampling())
    decoder.prefill(slot, 8)
    decoder.finish(slot)
    decoder.start(list(range(12)), Sampling())
    assert decoder.reused == 8  # the chunk that ran is reused; what never ran is not
