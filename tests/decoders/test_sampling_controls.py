"""The sampling controls clients send (min_p, repetition, presence and frequency penalties,
logit biases) against HF transformers' logits processors, OpenAI's stated formula where HF has
none, and through the decoders: greedy decoding with a repetition penalty equals HF's generate
with the same penalty, and a batch row equals the same row decoded alone."""
from __future__ import annotations

import collections

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from transformers.generation import logits_process as hf

from runner.config.errors import ConfigError
from runner.config.resolve import resolve
from runner.config.schema import ModelSpec
from runner.decoders.batched import BatchDecoder
from runner.decoders.plain import PlainDecoder
from runner.decoders.sampling import Sampling, adjust, logits_to_probs, next_token
from tests.properties.strategies import build_twins, logits_bound, model_cases

VOCAB = 97
logits_of = st.integers(0, 2**31 - 1).map(lambda seed: torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed)) * 4)
histories = st.lists(st.integers(0, VOCAB - 1), max_size=40)


@given(logits=logits_of, prompt=histories, generated=histories, penalty=st.floats(0.2, 5.0))
def test_repetition_penalty_is_hfs(logits, prompt, generated, penalty):
    ours = adjust(logits, Sampling(repetition_penalty=penalty), prompt, generated)
    if not prompt + generated:
        assert torch.equal(ours, logits)
        return
    theirs = hf.RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([prompt + generated]), logits[None].clone())[0]
    assert torch.equal(ours, theirs)


@given(logits=logits_of, prompt=histories, generated=histories, presence=st.floats(-2, 2), frequency=st.floats(-2, 2))
def test_presence_and_frequency_penalties_follow_openais_formula(logits, prompt, generated, presence, frequency):
    # OpenAI: mu[j] - c[j] * frequency_penalty - (c[j] > 0) * presence_penalty, c counting the
    # generated tokens only (the prompt is not penalised).
    ours = adjust(logits, Sampling(presence_penalty=presence, frequency_penalty=frequency), prompt, generated)
    counts = collections.Counter(generated)
    expected = [float(mu) - counts[j] * frequency - (counts[j] > 0) * presence for j, mu in enumerate(logits.tolist())]
    assert torch.allclose(ours.double(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-5)
    if not generated:
        assert torch.equal(ours, logits)


@given(logits=logits_of, biases=st.dictionaries(st.integers(0, VOCAB - 1), st.floats(-100, 100), max_size=8))
def test_logit_bias_is_hfs_sequence_bias_of_single_tokens(logits, biases):
    ours = adjust(logits, Sampling(logit_bias=tuple(sorted(biases.items()))), [1, 2], [3])
    if not biases:
        assert torch.equal(ours, logits)
        return
    processor = hf.SequenceBiasLogitsProcessor([[[token], bias] for token, bias in biases.items()])
    theirs = processor(torch.tensor([[1, 2, 3]]), logits[None].clone())[0]
    assert torch.equal(ours, theirs)


@given(logits=logits_of, min_p=st.floats(0.0, 1.0), temperature=st.floats(0.3, 2.0),
       top_k=st.none() | st.integers(1, VOCAB + 5), top_p=st.floats(0.05, 1.0))
def test_min_p_after_temperature_top_k_and_top_p_is_hfs(logits, min_p, temperature, top_k, top_p):
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    ours = logits_to_probs(logits, sampling)
    scores, ids = logits[None].clone(), torch.zeros(1, 1, dtype=torch.long)
    warpers = [hf.TemperatureLogitsWarper(temperature)] + ([hf.TopKLogitsWarper(top_k)] if top_k else []) + \
        ([hf.TopPLogitsWarper(top_p)] if top_p < 1 else []) + ([hf.MinPLogitsWarper(min_p)] if min_p > 0 else [])
    for warper in warpers:
        scores = warper(ids, scores)
    theirs = torch.softmax(scores, -1)[0]
    # The same tokens kept (up to a probability at top-p's or min-p's edge, within rounding) and
    # the same distribution over them.
    edge = (ours > 0) != (theirs > 0)
    assert edge.sum() <= 1 and (theirs[edge].sum() + ours[edge].sum()) <= 1e-3
    assert torch.allclose(ours, theirs, atol=1e-3 if edge.any() else 1e-6, rtol=0)


def test_min_p_leaves_at_least_the_likeliest_token():
    logits = torch.tensor([2.0, 1.0, 0.5, -3.0])
    probs = logits_to_probs(logits, Sampling(temperature=1.0, min_p=1.0))
    assert torch.equal(probs, torch.tensor([1.0, 0.0, 0.0, 0.0]))
    generator = torch.Generator().manual_seed(0)
    draws = {int(next_token(logits, Sampling(temperature=1.0, min_p=0.5), generator)) for _ in range(200)}
    # p = softmax: 0.63, 0.23, 0.14, 0.003; min_p 0.5 keeps tokens above 0.32, the first only.
    assert draws == {0}


@settings(max_examples=25, deadline=None)
@given(case=model_cases(max_batch=1, min_len=2, max_len=12), penalty=st.sampled_from([0.7, 1.3, 2.0]))
@torch.no_grad()
def test_greedy_with_a_repetition_penalty_equals_hfs_generate(case, penalty):
    spec, seed, tokens = case
    hf_model, ours = build_twins(spec, seed)
    new = 12
    out = hf_model.generate(tokens, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                            repetition_penalty=penalty, output_scores=True, return_dict_in_generate=True)
    for step in out.scores:  # the penalised scores: a near-tie there lets correct twins part ways
        top2 = step[0].topk(2).values
        assume(top2[0] - top2[1] >= logits_bound(step))
    prompt = tokens[0].tolist()
    new_ids, _ = PlainDecoder(ours, Sampling(repetition_penalty=penalty)).generate(prompt, new)
    assert new_ids == out.sequences[0, len(prompt):].tolist()


@torch.no_grad()
def test_a_batch_row_with_controls_decodes_as_it_does_alone():
    spec = ModelSpec(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, intermediate_size=96, max_seq_len=64)
    _, model = build_twins(spec, 3)
    controls = [Sampling(), Sampling(repetition_penalty=1.8), Sampling(presence_penalty=1.5, frequency_penalty=0.5),
                Sampling(logit_bias=((5, 3.0), (6, -100.0))),
                Sampling(temperature=0.9, min_p=0.2, frequency_penalty=1.0)]
    prompts = [[1 + i, 2, 3, 4 + i] for i in range(len(controls))]
    alone = []
    for prompt, sampling in zip(prompts, controls):
        decoder = BatchDecoder(model, 1, 32)
        slot, first = decoder.start(prompt, sampling, seed=11)
        alone.append([first.id] + [decoder.step()[slot][0].id for _ in range(9)])
    batch = BatchDecoder(model, len(controls), 32)
    slots = [batch.start(prompt, sampling, seed=11) for prompt, sampling in zip(prompts, controls)]
    together = {slot: [first.id] for slot, first in slots}
    for _ in range(9):
        for slot, (token,) in batch.step().items():
            together[slot].append(token.id)
    assert [together[slot] for slot, _ in slots] == alone
    assert alone[0] != alone[1] and alone[0] != alone[2]  # the controls change greedy decoding here


def test_recipe_keys_are_checked_by_name(tmp_path):
    base = "recipes/tiny-random.yaml"
    recipe = resolve(base, ["generate.repetition_penalty=1.2", "generate.logit_bias.5=-100", "generate.min_p=0.1"])
    assert recipe.generate.logit_bias == {5: -100.0} and recipe.generate.min_p == 0.1
    for override, key in (("generate.min_p=2", "generate.min_p"), ("generate.repetition_penalty=0", "generate.repetition_penalty"),
                          ("generate.presence_penalty=3", "generate.presence_penalty"),
                          ("generate.logit_bias.5=500", "generate.logit_bias"),
                          ("generate.logit_bias.100000=1", "generate.logit_bias")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            resolve(base, [override])
    with pytest.raises(ConfigError, match=r"generate\.frequency_penalty: depends on the text so far"):
        resolve(base, ["draft.kind=ngram", "generate.frequency_penalty=1"])
