"""Serving a tensor-parallel recipe: rank 0 runs the HTTP side and the scheduler; every other rank
repeats rank 0's decoder calls, so all ranks run the same forwards (and meet in the same all-reduces).

Rank 0's scheduler holds a Leader in place of its BatchDecoder: each decoder call is
broadcast (a small pickled tuple) before it runs. The other ranks sit in follow(), running each
call as it comes. Sampling agrees across ranks because every sampled row has a seed (the scheduler
draws one when a request names none) and greedy rows need none; a structured-output row's grammar
travels as its source, which every rank compiles to the same masks. While no request runs, the
leader sends a heartbeat now and then: a collective waits at most parallel.TIMEOUT.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from runner.decoders.batched import BatchDecoder
from runner.decoders.grammar import Grammar, Grammars
from runner.tokenizers.base import Tokenizer

HEARTBEAT_SECONDS = 10.0  # well inside parallel.TIMEOUT


def _broadcast(call: tuple | None) -> tuple:
    box = [call]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class Leader:
    """A BatchDecoder whose calls every other rank repeats (see follow)."""

    heartbeat_seconds = HEARTBEAT_SECONDS

    def __init__(self, decoder: BatchDecoder):
        self.decoder = decoder
        self.slots, self.cache_len = decoder.slots, decoder.cache_len

    @property
    def reused(self) -> int:
        return self.decoder.reused

    def start(self, prompt: list[int], sampling, seed: int | None = None, logprobs: int = 0):
        self._check(sampling, seed)
        _broadcast(("start", prompt, sampling, seed, logprobs))
        return self.decoder.start(prompt, sampling, seed, logprobs)

    @staticmethod
    def _check(sampling, seed: int | None) -> None:
        if seed is None and not sampling.greedy:
            raise ValueError("a sampled row needs a seed under tensor parallelism (every rank draws alike)")

    def admit(self, prompt: list[int], sampling, seed: int | None = None, logprobs: int = 0, constraint=None) -> int:
        self._check(sampling, seed)
        _broadcast(("admit", prompt, sampling, seed, logprobs, None if constraint is None else constraint.source))
        return self.decoder.admit(prompt, sampling, seed, logprobs, constraint)

    def step(self, chunks: dict[int, int] | None = None):
        _broadcast(("step", chunks))
        return self.decoder.step(chunks)

    def finish(self, slot: int) -> None:
        _broadcast(("finish", slot))
        self.decoder.finish(slot)

    def idle(self) -> None:
        """Nothing to run: tell the followers the leader is alive."""
        _broadcast(("idle",))

    def close(self) -> None:
        try:
            _broadcast(("close",))
        except RuntimeError:  # the followers are gone already (Ctrl-C reached every rank)
            pass


def follow(decoder: BatchDecoder, tokenizer: Tokenizer, vocab_size: int) -> None:
    """Run rank 0's decoder calls on this rank until it closes."""
    grammars = Grammars(tokenizer, vocab_size, keep=16)  # by source: rank 0 sent each one compiled
    while True:
        name, *args = _broadcast(None)
        if name == "close":
            return
        if name == "idle":
            continue
        if name == "admit":
            *args, source = args
            grammar = None if source is None else grammars.get(source, lambda tokens: Grammar(tokens, source))
            args.append(None if grammar is None else grammar.matcher())
        try:
            with torch.inference_mode():
                getattr(decoder, name)(*args)
        except ValueError:  # refused on rank 0 alike (a full cache, no free slot): it goes on
            pass
