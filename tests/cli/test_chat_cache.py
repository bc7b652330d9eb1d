"""`runner chat` keeps its KV cache across turns and prefills only what follows the longest prefix
the cache holds (Conversation.cached). After every turn of a conversation on tiny-random:
- each position the conversation says the cache holds was written there, with that token (the
  last token of an answer never is: it was drawn, not fed back);
- the next turn's first logits are those of a fresh prefill of the whole history: bit for bit on
  runner's kernels, whose calls of at most MAX_ROWS tokens compute each token on its own (batch
  invariance), so any chunking of the history gives the same cache; within rounding on torch's ops.
"""
from pathlib import Path

import pytest
import torch

from runner import chat, pipeline
from runner.config.resolve import resolve
from runner.kernels import MAX_ROWS

TINY = str(Path(__file__).resolve().parents[2] / "recipes" / "tiny-random.yaml")
# Short turns and answers: every prefill stays within MAX_ROWS tokens, and most turns find all the
# cache claimed reusable (where claiming one position too many would show in the logits).
TURNS = ["Once upon a time", "and then", "the end", "more words", "yes", "no"]
SETTINGS = ["generate.temperature=0", "generate.max_new_tokens=6"]


class Writes:
    """What a model's calls wrote to its cache (position -> token, since the cache was last set
    up) and each call's tokens, positions and logits."""

    def __init__(self, model: torch.nn.Module):
        self.at: dict[int, int] = {}
        self.calls: list[tuple[list[int], list[int], torch.Tensor]] = []
        model.register_forward_hook(self._record, with_kwargs=True)
        setup = model.setup_cache

        def fresh_cache(*args, **kwargs):
            self.at.clear()
            return setup(*args, **kwargs)

        model.setup_cache = fresh_cache

    def _record(self, model, args, kwargs, logits):
        tokens = (kwargs["tokens"] if "tokens" in kwargs else args[0]).reshape(-1).tolist()
        positions = (kwargs["input_pos"] if "input_pos" in kwargs else args[1]).reshape(-1).tolist()
        self.at.update(zip(positions, tokens))
        self.calls.append((tokens, positions, logits.detach().clone()))


def fresh_prefill(twin: pipeline.Pipeline, history: list[int], cache_len: int) -> torch.Tensor:
    """The last logits [V] of `history` prefilled on a fresh cache, MAX_ROWS tokens a call."""
    twin.model.setup_cache(1, cache_len)
    with torch.inference_mode():
        for start in range(0, len(history), MAX_ROWS):
            chunk = history[start:start + MAX_ROWS]
            logits = twin.forward(torch.tensor([chunk]), torch.arange(start, start + len(chunk)), last_only=True)
    return logits[0, -1]


@pytest.mark.parametrize("kernels", ["runner", "torch"])
def test_the_cache_holds_what_the_conversation_claims(kernels):
    recipe = resolve(TINY, [*SETTINGS, f"kernels={kernels}"])
    built, twin = pipeline.build(recipe, TINY), pipeline.build(recipe, TINY)  # the same weights (random:0)
    writes = Writes(built.model)
    talk = chat.Conversation(built, TINY, lambda note: None)
    claimed: list[int] = []  # talk.cached after the turn before
    all_reused = 0
    for turn, text in enumerate(TURNS):
        first = len(writes.calls)
        talk.say(text, lambda piece: None)
        tokens, positions, logits = writes.calls[first]  # the turn's prefill: after what the cache holds
        start = positions[0]
        assert start <= len(claimed) and positions == list(range(start, start + len(tokens)))
        all_reused += start == len(claimed) > 0

        expected = fresh_prefill(twin, claimed[:start] + tokens, built.model.cache_len)
        if kernels == "runner" and all(len(call[0]) <= MAX_ROWS for call in writes.calls):
            assert torch.equal(logits[0, -1], expected), f"turn {turn}: {(logits[0, -1] - expected).abs().max()}"
        else:
            atol = 1e-5 * max(1.0, expected.abs().max().item())
            torch.testing.assert_close(logits[0, -1], expected, rtol=0, atol=atol, msg=f"turn {turn}")

        claimed = list(talk.cached)
        unwritten = [i for i, token in enumerate(claimed) if writes.at.get(i) != token]
        assert not unwritten, (f"turn {turn}: the conversation says the cache holds {len(claimed)} positions; "
                               f"{unwritten} were not written with its tokens")
    assert all_reused >= 2  # the claim was put to use: those turns prefilled from its very end
