"""Chunked prefill (BatchDecoder.admit + prefill): a prompt run a chunk at a time, with another
row decoding between its chunks, gives the logits and tokens of a prompt prefilled whole, and the
row beside it decodes as it would alone."""
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


def chunked_run(decoder: BatchDecoder, prompt: list[int], chunks: list[int], beside: int | None):
    """admit(prompt), prefill it in `chunks` (the last repeated until the prompt has run), the row
    in slot `beside` stepping between chunks; then STEPS steps. (the prompt's tokens and logits,
    the tokens the row beside drew meanwhile)"""
    captured = []
    hook = decoder.model.register_forward_hook(lambda module, args, out: captured.append(out))
    beside_tokens = []
    try:
        slot = decoder.admit(prompt, Sampling())
        ran, token, i = 0, None, 0
        while token is None:
            n, token = decoder.prefill(slot, chunks[min(i, len(chunks) - 1)])
            assert n == min(chunks[min(i, len(chunks) - 1)], len(prompt) - ran) and n > 0
            ran, i = ran + n, i + 1
            if token is None and beside is not None:
                out = decoder.step()
                assert slot not in out  # a row still prefilling draws no token
                beside_tokens.append(out[beside].id)
        assert ran == len(prompt)
        logits, tokens = [captured[-1][0, -1].clone()], [token.id]
        for _ in range(STEPS):
            out = decoder.step()
            tokens.append(out[slot].id)
            logits.append(captured[-1][slot, -1].clone())
            if beside is not None:
                beside_tokens.append(out[beside].id)
    finally:
        hook.remove()
    return tokens, torch.stack(logits), beside_tokens


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 159), min_size=1, max_size=40), st.lists(st.integers(1, 20), min_size=1, max_size=4),
       st.sampled_from(["kernels", "torch", "int8 cache"]), st.booleans())
def test_a_prompt_prefilled_in_chunks_between_steps_decodes_as_one_prefilled_whole(prompt, chunks, ops, busy):
    model = model_of(ops)
    decoder = BatchDecoder(model, 3, CACHE)
    beside = decoder.start([7, 8, 9], Sampling())[0] if busy else None
    tokens, logits, beside_tokens = chunked_run(decoder, prompt, chunks, beside)
    whole = BatchDecoder(model, 1, CACHE)
    _, whole_tokens, whole_logits = greedy_run(whole, prompt, STEPS)
    # Within 1e-5 x max(1, |logits|): the prompt's chunks run on other kernel paths than one
    # prefill (as a prefix-cached prompt's do); greedy tokens part only at a near-tie.
    same = next((i for i, (a, b) in enumerate(zip(tokens, whole_tokens)) if a != b), len(tokens))
    bound = 1e-5 * whole_logits[:same + 1].abs().amax(-1, keepdim=True).clamp(min=1)
    assert ((logits[:same + 1] - whole_logits[:same + 1]).abs() <= bound).all()
    if same < len(tokens):
        top2 = whole_logits[same].topk(2).values
        assert top2[0] - top2[1] <= 2 * bound[same]
    if busy:  # the row beside drew what it draws alone, step for step
        alone = BatchDecoder(model, 3, CACHE)
        _, alone_tokens, _ = greedy_run(alone, [7, 8, 9], len(beside_tokens))
        assert beside_tokens == alone_tokens[1:]


def test_prefill_runs_only_what_is_left_and_refuses_a_prompt_that_has_run():
    decoder = BatchDecoder(MODELS[False, "kernels"], 2, CACHE)
    slot = decoder.admit(list(range(10)), Sampling())
    assert decoder.prefill(slot, 4)[0] == 4 and decoder.step() == {}  # nothing to decode yet
    ran, token = decoder.prefill(slot, 100)
    assert ran == 6 and token is not None
    with pytest.raises(ValueError, match="has run its whole prompt"):
        decoder.prefill(slot, 1)
    assert set(decoder.step()) == {slot}


def test_a_row_finished_while_prefilling_leaves_its_prefix_for_the_next_prompt():
    decoder = BatchDecoder(MODELS[False, "kernels"], 1, CACHE)
    slot = decoder.admit(list(range(20)), Sampling())
    decoder.prefill(slot, 8)
    decoder.finish(slot)
    decoder.start(list(range(12)), Sampling())
    assert decoder.reused == 8  # the chunk that ran is reused; what never ran is not
