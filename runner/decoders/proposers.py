"""Proposers for speculative decoding: a draft model, or n-gram lookup in the context."""
from __future__ import annotations

import torch

from runner.decoders.sampling import Sampling, logits_to_probs, sample


class DraftModelProposer:
    """A smaller (or quantized) model with its own KV cache drafts tokens by sampling.

    The cache is kept in step with the sequence: tokens it already holds (the longest common
    prefix with the new sequence) are not fed again, and entries past that prefix are overwritten.
    """

    def __init__(self, model: torch.nn.Module, sampling: Sampling, forward=None):
        self.model = model
        self.forward = forward or model  # the model, or its compiled steps
        self.sampling = sampling
        self.device = next(model.parameters()).device
        self.cached: list[int] = []

    def reset(self, cache_len: int) -> None:
        if self.model.cache_len != cache_len:
            self.model.setup_cache(1, cache_len)
        self.cached = []

    def propose(self, sequence: list[int], k: int, generator: torch.Generator | None) -> tuple[list[int], torch.Tensor]:
        valid = 0
        for a, b in zip(self.cached, sequence):
            if a != b:
                break
            valid += 1
        valid = min(valid, len(sequence) - 1)  # feed at least the last token to get its logits
        drafted, qs = [], []
        feed = sequence[valid:]
        position = valid
        for _ in range(k):
            tokens = torch.tensor([feed], device=self.device)
            logits = self.forward(tokens, torch.arange(position, position + len(feed), device=self.device), last_only=True)
            q = logits_to_probs(logits[0, -1], self.sampling)  # [V]
            token = int(sample(q, generator))
            drafted.append(token)
            qs.append(q)
            position += len(feed)
            feed = [token]
        self.cached = sequence + drafted[:-1]  # the last draft was never fed
        return drafted, torch.stack(qs)


class NGramProposer:
    """Prompt lookup: copy what followed the most recent earlier occurrence of the context's last n-gram.

    Deterministic, so q is one-hot; with no match it proposes nothing and the round is a plain step.
    """

    def __init__(self, vocab_size: int, max_n: int = 3, min_n: int = 1):
        self.vocab_size, self.max_n, self.min_n = vocab_size, max_n, min_n

    def reset(self, cache_len: int) -> None:
        pass

    def draft(self, sequence: list[int], k: int) -> list[int]:
        """Up to k tokens continuing `sequence` (none without a match)."""
        return _lookup(sequence, k, self.max_n, self.min_n) if k > 0 else []

    def propose(self, sequence: list[int], k: int, generator: torch.Generator | None) -> tuple[list[int], torch.Tensor]:
        drafted = self.draft(sequence, k)
        q = torch.zeros(len(drafted), self.vocab_size)
        q[torch.arange(len(drafted)), torch.tensor(drafted, dtype=torch.long)] = 1.0
        return drafted, q


def _lookup(sequence: list[int], k: int, max_n: int, min_n: int) -> list[int]:
    """Up to k tokens following the latest earlier match of the longest suffix n-gram (max_n..min_n)."""
    for n in range(min(max_n, len(sequence) - 1), min_n - 1, -1):
        suffix = sequence[-n:]
        for start in range(len(sequence) - n - 1, -1, -1):
            if sequence[start:start + n] == suffix:
                return sequence[start + n:start + n + k]
    return []
