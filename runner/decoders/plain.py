"""Plain autoregressive decoding: prefill the prompt, then one token per forward."""
from __future__ import annotations

import time

import torch

from runner.decoders.base import Constraint, Decoder, Forward, OnToken
from runner.decoders.grammar import Grammar
from runner.decoders.sampling import Sampling, adjust, next_token
from runner.decoders.stats import Stats, peak_memory


class PlainDecoder(Decoder):
    """Greedy or sampled decoding of one sequence over the model's static KV cache; with a
    grammar, each call's tokens are a document it accepts (a new matcher per call)."""

    reuses_cache = True

    def __init__(self, model: torch.nn.Module, sampling: Sampling, cache_len: int | None = None,
                 forward: Forward | None = None, grammar: Grammar | None = None):
        self.model = model
        self.grammar = grammar
        self.forward = forward or model
        self.sampling = sampling
        self.cache_len = cache_len
        self.device = next(model.parameters()).device

    def generate(
        self,
        prompt: list[int],
        max_new_tokens: int,
        eos_ids: frozenset[int] = frozenset(),
        generator: torch.Generator | None = None,
        on_token: OnToken | None = None,
        cached: int = 0,
    ) -> tuple[list[int], Stats]:
        """New tokens (ending with the EOS token if one was drawn) and timing statistics.

        cached: how many leading prompt tokens the KV cache already holds (at their positions,
        from an earlier call with the same cache size): only the rest is prefilled.
        """
        cache_len = self._cache_for(len(prompt), max_new_tokens)
        if self.model.cache_len != cache_len:
            self.model.setup_cache(1, cache_len)
            cached = 0
        cached = max(0, min(cached, len(prompt) - 1))  # at least the last prompt token runs: its logits

        out: list[int] = []
        constraint = None if self.grammar is None else self.grammar.matcher()
        start = time.perf_counter()
        with torch.inference_mode():
            tokens = torch.tensor([prompt[cached:]], device=self.device)  # [1, T]
            logits = self.forward(tokens, torch.arange(cached, len(prompt), device=self.device), last_only=True)  # [1, 1, V]
            token = self._next(logits[0, -1], prompt, out, generator, constraint)
            first = time.perf_counter()
            pos = torch.tensor([len(prompt)], device=self.device)
            while True:
                out.append(int(token))  # the one host sync per token; streaming needs it anyway
                stop = on_token is not None and bool(on_token(out[-1]))  # True: the caller has what it wanted
                if stop or out[-1] in eos_ids or len(out) == max_new_tokens:
                    break
                logits = self.forward(token.view(1, 1), pos)  # [1, 1, V]
                token = self._next(logits[0, -1], prompt, out, generator, constraint)
                pos += 1
        end = time.perf_counter()
        stats = Stats(
            prompt_tokens=len(prompt), new_tokens=len(out), time_to_first_token=first - start,
            decode_seconds=end - first, peak_memory_bytes=peak_memory(self.device),
        )
        return out, stats

    def _next(self, logits: torch.Tensor, prompt: list[int], out: list[int], generator: torch.Generator | None,
              constraint: Constraint | None) -> torch.Tensor:
        if self.sampling.adjusts:
            logits = adjust(logits, self.sampling, prompt, out)
        if constraint is None:
            return next_token(logits, self.sampling, generator)
        token = next_token(constraint.mask(logits), self.sampling, generator)  # after penalties, before top-k/p
        constraint.accept(int(token))
        return token
