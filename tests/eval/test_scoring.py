"""Scoring against our own model's logits, one sequence at a time: loglikelihood is the sum of
log-softmax at the continuation's positions (split at token boundaries as lm-eval's TemplateLM
does), is_greedy is the argmax, and rolling log-likelihood is the sum over lm-eval's windows."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.eval.conftest import logits_of, request

pytest.importorskip("lm_eval", reason="the eval extra (lm-eval) is part of the test extra")

WORDS = st.sampled_from(["the", "cat", "sat", "on", "a", "mat", "once", "upon", "time", "dog", "ran", "x", "42", "!"])
TEXT = st.lists(WORDS, min_size=1, max_size=12).map(" ".join)


def reference(lm, context: str, continuation: str) -> tuple[float, bool, float]:
    """(log-likelihood, is_greedy, smallest argmax margin) the slow way: lm-eval's split written
    out (a context's trailing spaces move to the continuation; the whole text is encoded and cut
    where the context's own tokens end), one unpadded forward."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    tok = lm.runner_tokenizer
    whole = tok.encode(context + continuation)
    cont = whole[len(tok.encode(context)):]
    whole = whole[-(lm.max_length + 1):]  # too long: the oldest tokens go, as in HFLM
    logp = logits_of(lm.model, whole[:-1])[-len(cont):]  # [len(cont), V]: position j predicts whole[j + 1]
    picked = logp.gather(1, logp.new_tensor(cont, dtype=int)[:, None])[:, 0]
    top2 = logp.topk(2, dim=-1).values
    return picked.sum().item(), bool((logp.argmax(-1) == logp.new_tensor(cont, dtype=int)).all()), \
        (top2[:, 0] - top2[:, 1]).min().item()


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(TEXT, TEXT, st.sampled_from(["", " "])), min_size=1, max_size=6))
def test_loglikelihood_is_the_sum_of_our_log_softmax_at_the_continuation(tiny_lm, pairs):
    # Contexts of many lengths in one call: padded batches, a chunk boundary, several batch shapes.
    requests = [(ctx + space, (" " if not space else "") + cont) for ctx, cont, space in pairs]
    got = tiny_lm.loglikelihood([request("loglikelihood", c, t) for c, t in requests])
    for (context, continuation), (logprob, greedy) in zip(requests, got):
        expected, expected_greedy, margin = reference(tiny_lm, context, continuation)
        assert logprob == pytest.approx(expected, abs=1e-4, rel=1e-5), (context, continuation)
        if margin > 1e-4:  # a near tie may round either way between batch shapes
            assert greedy == expected_greedy, (context, continuation)


def test_a_continuation_starting_with_a_space_is_split_at_the_token_boundary(tiny_lm):
    tok = tiny_lm.runner_tokenizer
    (a, _), (b, _) = tiny_lm.loglikelihood([request("loglikelihood", "Once upon a", " time"),
                                            request("loglikelihood", "Once upon a ", "time")])
    assert a == pytest.approx(b, abs=1e-6)  # the context's trailing space belongs to the continuation
    # " time" is its own token(s), scored after the context's last token, not glued to it.
    context, continuation = tiny_lm._encode_pair("Once upon a", " time")
    assert context == tok.encode("Once upon a") and continuation == tok.encode("Once upon a time")[len(context):]
    assert a == pytest.approx(reference(tiny_lm, "Once upon a", " time")[0], abs=1e-4)


def test_an_empty_context_is_the_prefix_token(tiny_lm):
    [(got, _)] = tiny_lm.loglikelihood([request("loglikelihood", "", "the cat sat")])
    ids = tiny_lm.runner_tokenizer.encode("the cat sat")
    if ids[0] == tiny_lm.prefix_token_id:  # the tokenizer writes BOS itself: it is the context
        ids = ids[1:]
    logp = logits_of(tiny_lm.model, [tiny_lm.prefix_token_id] + ids[:-1])
    assert got == pytest.approx(sum(logp[j, t].item() for j, t in enumerate(ids)), abs=1e-4)


def windowed_sum(lm, text: str) -> float:
    """lm-eval's disjoint rolling windows written out: window k predicts tokens [kL, (k+1)L) of
    [prefix] + tokens from the L tokens before each one's end."""
    length = lm.max_length
    tokens = lm.runner_tokenizer.encode(text)
    seq = [lm.prefix_token_id] + tokens  # seq[i + 1] = tokens[i]
    total = 0.0
    for start in range(0, len(tokens), length):
        end = min(start + length, len(tokens))  # predict tokens[start:end] = seq[start + 1:end + 1]
        first = max(0, end - length)
        logp = logits_of(lm.model, seq[first:end])  # position j predicts seq[first + j + 1]
        for i in range(start, end):
            total += logp[i - first, seq[i + 1]].item()
    return total


@settings(max_examples=8, deadline=None)
@given(st.lists(WORDS, min_size=60, max_size=150).map(" ".join), TEXT)
def test_rolling_loglikelihood_is_the_sum_over_windows(tiny_lm, long, short):
    assert len(tiny_lm.runner_tokenizer.encode(long)) > tiny_lm.max_length
    got = tiny_lm.loglikelihood_rolling([request("loglikelihood_rolling", long), request("loglikelihood_rolling", short)])
    assert got[0] == pytest.approx(windowed_sum(tiny_lm, long), abs=1e-3, rel=1e-5)
    assert got[1] == pytest.approx(windowed_sum(tiny_lm, short), abs=1e-4, rel=1e-5)
