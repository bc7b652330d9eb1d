"""What decoders offer their callers: the CLI, chat, eval and the server use only these protocols."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from runner.decoders.sampling import Sampling
from runner.decoders.stats import Stats

OnToken = Callable[[int], "bool | None"]  # sees each new token; True ends generation there


def common_prefix(held: list[int], prompt: list[int]) -> int:
    """How many leading tokens of `prompt` a cache holding `held` (from position 0) already has:
    prefix caching's measure, in runner chat and in the server's slots alike."""
    n = min(len(held), len(prompt))
    return next((i for i in range(n) if held[i] != prompt[i]), n)


class Constraint(Protocol):
    """Structured output's state for one sequence (runner.decoders.grammar.Matcher): which ids
    its grammar allows next."""

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` [V] with the ids the grammar forbids at -inf."""
        ...

    def accept(self, token: int) -> None:
        """Advance past `token`."""
        ...

    def rollback(self, n: int) -> None:
        """Undo the last `n` accepted tokens."""
        ...


class Forward(Protocol):
    """One step of a model: the model itself, or its compiled steps (runner.transforms.compile)."""

    def __call__(self, tokens: torch.Tensor, input_pos: torch.Tensor, last_only: bool = False,
                 row: int | slice | None = None) -> torch.Tensor:
        ...


class Decoder(Protocol):
    """Generates one sequence at a time over the model's static KV cache.

    lookahead: positions a call may write past the last accepted token (a speculative round's
    drafts), so a caller sizing a cache asks positions() rather than adding it up itself.
    reuses_cache: whether generate(cached=n) really skips the n prompt tokens the cache holds.
    """

    model: torch.nn.Module
    device: torch.device
    lookahead: int = 0
    reuses_cache: bool = False
    cache_len: int | None = None  # fixed by reserve(); None: each call sizes the cache for itself

    def generate(self, prompt: list[int], max_new_tokens: int, eos_ids: frozenset[int] = frozenset(),
                 generator: torch.Generator | None = None, on_token: OnToken | None = None,
                 cached: int = 0) -> tuple[list[int], Stats]:
        """New tokens (ending with an EOS id if one was drawn) and statistics. cached: how many
        leading prompt tokens the cache already holds from an earlier call (used where
        reuses_cache)."""
        ...

    def positions(self, prompt_tokens: int, new_tokens: int) -> int:
        """Cache positions one call with this prompt and budget writes."""
        return prompt_tokens + new_tokens + self.lookahead

    def reserve(self, positions: int) -> None:
        """Fix the cache at `positions` for every later call, allocated now for one sequence:
        compiled steps then see one shape, and a cache kept across calls stays valid."""
        self.cache_len = positions
        self.model.setup_cache(1, positions)

    def _cache_for(self, prompt_tokens: int, max_new_tokens: int) -> int:
        """The cache size for a call: the reserved one (checked), or just enough, up to max_seq_len."""
        cache_len = self.cache_len or min(self.positions(prompt_tokens, max_new_tokens), self.model.spec.max_seq_len)
        if prompt_tokens + max_new_tokens > cache_len:
            raise ValueError(f"prompt ({prompt_tokens}) + max_new_tokens ({max_new_tokens}) exceed the cache "
                             f"({cache_len})")
        return cache_len


@dataclass(frozen=True)
class Token:
    id: int
    logprob: float | None  # of `id` under the model's distribution (before sampling's reshaping); None: not asked
    top: tuple[tuple[int, float], ...] = ()  # the `logprobs` most likely ids and their log-probabilities


class SlotDecoder(Protocol):
    """Several sequences decoded together, each in a slot (a row of the KV cache) it holds from
    start() to finish(); what the server's scheduler drives (runner.decoders.batched.BatchDecoder)."""

    slots: int
    cache_len: int
    reused: int  # prompt tokens the last start() or admit() found in its slot's cache (prefix caching)

    def start(self, prompt: list[int], sampling: Sampling, seed: int | None = None, logprobs: int = -1,
              constraint: Constraint | None = None) -> tuple[int, Token]:
        """Prefill `prompt` into a free slot: (the slot, its first token)."""
        ...

    def admit(self, prompt: list[int], sampling: Sampling, seed: int | None = None, logprobs: int = -1,
              constraint: Constraint | None = None) -> int:
        """Take a free slot for `prompt`, to be prefilled by step(chunks=...); `constraint` masks its draws."""
        ...

    def step(self, chunks: dict[int, int] | None = None) -> dict[int, list[Token]]:
        """The next tokens of every slot done prefilling (one each, or more where drafts were
        kept); chunks {slot: n}: the next n tokens of those slots' prompts run in the same
        forward, and a slot whose prompt is then done gets its first token too."""
        ...

    def finish(self, slot: int) -> None:
        """Free `slot` for the next sequence."""
        ...
