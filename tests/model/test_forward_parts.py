"""Transformer.forward_parts (a decode step and prompt chunks in one forward, the linears shared)
against the same calls of forward() one after another, for every family's tiny spec: the same
logits (within 1e-5 x max(1, |logits|): the linears see other row counts) and the same caches."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from runner import kernels
from runner.checkpoint import random_state_dict
from runner.config.resolve import load_spec
from runner.model.llama import Part, Transformer

FAMILIES = ["tiny-llama", "tiny-moe", "tiny-gemma2", "tiny-gemma3", "tiny-qwen2", "tiny-qwen3", "tiny-phi3"]
CACHE = 48


def model_for(name: str, ops: str) -> Transformer:
    spec = load_spec(name)
    # Unit-variance weights: N(0, 0.02) would leave every logit near zero.
    state = {k: v if v.ndim == 1 else v * 40 * v.shape[-1] ** -0.5 for k, v in random_state_dict(spec, 0).items()}
    model = Transformer(spec)
    model.load_state_dict(state)
    model.eval()
    if ops == "kernels":
        kernels.load()
        model.use_ops(kernels.KernelOps())
    return model


MODELS = {(name, ops): model_for(name, ops) for name in FAMILIES for ops in ("torch", "kernels")}


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    bound = 1e-5 * b.abs().amax(-1, keepdim=True).clamp(min=1)
    assert ((a - b).abs() <= bound).all(), (a - b).abs().max()


@settings(max_examples=20, deadline=None)
@given(st.sampled_from(FAMILIES), st.sampled_from(["torch", "kernels"]), st.integers(0, 2**31),
       st.lists(st.integers(1, 20), min_size=1, max_size=2), st.integers(1, 12))
@torch.inference_mode()
def test_a_mixed_forward_is_its_parts_run_one_after_another(family, ops, seed, chunks, decoded):
    model = MODELS[family, ops]
    vocab = model.spec.vocab_size
    generator = torch.Generator().manual_seed(seed)
    model.setup_cache(1 + len(chunks), CACHE)
    # Row 0 holds `decoded` tokens and decodes one more; rows 1.. hold a prompt's first chunk of 3
    # and run their next chunk.
    model(torch.randint(vocab, (1, decoded), generator=generator), torch.arange(decoded)[None], row=0)
    for r in range(1, 1 + len(chunks)):
        model(torch.randint(vocab, (1, 3), generator=generator), torch.arange(3)[None], row=r)
    one = copy.deepcopy(model)
    step = Part(torch.randint(vocab, (1, 1), generator=generator), torch.tensor([[decoded]]), slice(0, 1))
    parts = [step] + [Part(torch.randint(vocab, (1, n), generator=generator), torch.arange(3, 3 + n)[None], r + 1,
                           last_only=True) for r, n in enumerate(chunks)]
    mixed = model.forward_parts(parts)
    alone = [one(part.tokens, part.input_pos, part.last_only, part.row) for part in parts]
    assert [m.shape for m in mixed] == [a.shape for a in alone]
    for m, a in zip(mixed, alone):
        close(m, a)
    for layer, other in zip(model.layers, one.layers):
        written = slice(0, 3 + max(chunks))
        for mine, theirs in ((layer.attention.kv_cache.k, other.attention.kv_cache.k),
                             (layer.attention.kv_cache.v, other.attention.kv_cache.v)):
            close(mine[..., written, :], theirs[..., written, :])


def test_parts_of_several_rows_keep_their_rows_apart():
    model = MODELS["tiny-llama", "torch"]
    model.setup_cache(2, CACHE)
    with torch.inference_mode():
        step = Part(torch.tensor([[5], [6]]), torch.tensor([[0], [0]]), slice(0, 2))
        a, = model.forward_parts([step])
        b = model(step.tokens, step.input_pos, row=slice(0, 2))
    close(a, b)
    assert not torch.equal(a[0], a[1])
