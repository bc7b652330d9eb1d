"""Batched decoding over slots: several sequences decoded together, each joining and leaving
between steps (iteration-level, "continuous" batching).

The model holds one static KV cache with a row per slot. A request takes a free slot and is
prefilled there while the other rows keep their caches, at once or a chunk at a time between
steps (chunked prefill: a long prompt does not stall the running rows); every step then decodes
one token for each slot done prefilling, in one forward over all rows, each at its own position.

A slot's cache rows outlive its request: the decoder remembers which tokens they hold, and a new
prompt takes the free slot that already holds the longest prefix of it, prefilling only the rest
(prefix caching: a chat client that resends the conversation each turn prefills only the new turn).

Sampling is per row: temperature, top-k, top-p, min-p, penalties, biases and a seed of its own,
so a row draws the same tokens alone or batched.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from runner.decoders.base import Token, common_prefix
from runner.decoders.sampling import Sampling, adjust, next_token


@dataclass
class _Row:
    sampling: Sampling
    generator: torch.Generator | None
    logprobs: int  # -1: none; 0: the chosen token's; k: and the k most likely
    position: int  # where its next token goes in the cache (a prompt token while it prefills)
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)


class BatchDecoder:
    """A SlotDecoder (runner.decoders.base): `slots` rows of `cache_len` positions each over one model.

    start() prefills a prompt into a free slot and returns its first token (admit() then
    prefill() in chunks does the same between steps); step() decodes one token for every slot done
    prefilling; finish() frees a slot at once. The caller (a scheduler) owns
    stopping: EOS, stop strings, max_tokens, cancellation.
    """

    def __init__(self, model: torch.nn.Module, slots: int, cache_len: int, forward=None, prefix_cache: bool = True):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        if cache_len > model.spec.max_seq_len:
            raise ValueError(f"cache_len {cache_len} exceeds the model's max_seq_len {model.spec.max_seq_len}")
        self.model, self.forward = model, forward or model
        self.slots, self.cache_len = slots, cache_len
        self.device = next(model.parameters()).device
        self.rows: dict[int, _Row] = {}
        self.prefix_cache = prefix_cache
        # Per slot, the tokens its cache rows hold at positions 0, 1, ... (busy or free), and when
        # it was last taken: a prompt that matches no slot's tokens takes the least recently used.
        self.held: dict[int, list[int]] = {s: [] for s in range(slots)}
        self.taken: dict[int, int] = {s: -1 for s in range(slots)}
        self.starts = 0
        self.reused = 0  # prompt tokens the last start() found in its slot's cache
        model.setup_cache(slots, cache_len)

    def free(self) -> list[int]:
        """Slots no sequence holds."""
        return [s for s in range(self.slots) if s not in self.rows]

    def busy(self) -> list[int]:
        return sorted(self.rows)

    def start(self, prompt: list[int], sampling: Sampling, seed: int | None = None,
              logprobs: int = -1) -> tuple[int, Token]:
        """Prefill `prompt` into a free slot at once; (the slot, its first token). See admit()."""
        slot = self.admit(prompt, sampling, seed, logprobs)
        _, token = self.prefill(slot, len(prompt))
        return slot, token

    def admit(self, prompt: list[int], sampling: Sampling, seed: int | None = None, logprobs: int = -1) -> int:
        """Take a free slot for `prompt` and return it; prefill() then runs the prompt into it, in
        one call or in chunks, while step() goes on decoding the other slots. ValueError when no
        slot is free or the prompt leaves no room in the cache for a new token. logprobs: -1
        computes none (a log-softmax over the vocabulary a row and step); 0 the chosen token's; k
        also the k most likely."""
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) >= self.cache_len:
            raise ValueError(f"the prompt ({len(prompt)} tokens) leaves no room in the cache of {self.cache_len}")
        free = self.free()
        if not free:
            raise ValueError(f"all {self.slots} slots are busy")
        # The free slot holding the longest prefix of the prompt (at least its last token runs, for
        # its logits), else the one least recently taken.
        shared = {s: common_prefix(self.held[s], prompt) if self.prefix_cache else 0 for s in free}
        slot = max(free, key=lambda s: (min(shared[s], len(prompt) - 1), -self.taken[s]))
        reused = min(shared[slot], len(prompt) - 1)
        self.starts += 1
        self.taken[slot], self.reused = self.starts, reused
        generator = None if seed is None else torch.Generator(self.device).manual_seed(seed)
        self.held[slot] = self.held[slot][:reused]  # the cache holds these; prefill() writes the rest
        self.rows[slot] = _Row(sampling, generator, logprobs, reused, list(prompt))
        return slot

    def prefill(self, slot: int, limit: int) -> tuple[int, Token | None]:
        """Run at most `limit` more prompt tokens of `slot`'s admitted prompt: (how many ran, its
        first token once the whole prompt has run, else None)."""
        row = self.rows[slot]
        if row.tokens:
            raise ValueError(f"slot {slot} has run its whole prompt")
        end = min(len(row.prompt), row.position + max(limit, 1))
        with torch.inference_mode():
            tokens = torch.tensor([row.prompt[row.position:end]], device=self.device)  # [1, T]
            positions = torch.arange(row.position, end, device=self.device)[None]  # [1, T]
            logits = self.model(tokens, positions, last_only=True, row=slot)  # [1, 1, V]
            ran, row.position = end - row.position, end
            self.held[slot] = row.prompt[:end]
            if end < len(row.prompt):
                return ran, None
            return ran, self._pick(row, logits[0, -1])

    def step(self) -> dict[int, Token]:
        """One new token for every busy slot (a slot whose cache is full is left out: finish it)."""
        # A slot still prefilling has no token to decode: it rides along like a free one.
        ready = [s for s in self.busy() if self.rows[s].tokens and self.rows[s].position < self.cache_len]
        if not ready:
            return {}
        # Compiled steps run every slot (free ones just past their cached tokens, their output unused):
        # one shape for every step, so they never recompile as requests come and go. Eager ones run
        # the slots up to the last busy one only.
        rows = self.slots if self.forward is not self.model else ready[-1] + 1
        tokens = torch.zeros(rows, 1, dtype=torch.long)
        positions = torch.zeros(rows, 1, dtype=torch.long)
        for s in range(rows):
            if s in ready:
                row = self.rows[s]
                tokens[s, 0], positions[s, 0] = row.tokens[-1], row.position
            else:  # a row along for the shape: it writes just past the tokens its cache holds
                positions[s, 0] = min(len(self.held[s]), self.cache_len - 1)
                del self.held[s][positions[s, 0]:]
        with torch.inference_mode():
            tokens, positions = tokens.to(self.device), positions.to(self.device)
            if rows == self.slots:
                logits = self.forward(tokens, positions)  # [B, 1, V]
            else:
                logits = self.model(tokens, positions, row=slice(0, rows))  # [rows, 1, V]
            out = {}
            for s in ready:
                row = self.rows[s]
                self.held[s].append(row.tokens[-1])
                row.position += 1
                out[s] = self._pick(row, logits[s, -1])
        return out

    def finish(self, slot: int) -> None:
        """Free `slot` for the next request (its cache rows are overwritten by the next prefill)."""
        self.rows.pop(slot, None)

    def _pick(self, row: _Row, logits: torch.Tensor) -> Token:
        if row.sampling.adjusts:
            logits = adjust(logits, row.sampling, row.prompt, row.tokens)
        token = int(next_token(logits, row.sampling, row.generator))
        row.tokens.append(token)
        if row.logprobs < 0:
            return Token(token, None)
        logp = torch.log_softmax(logits.float(), dim=-1)
        top = ()
        if row.logprobs:
            values, ids = logp.topk(row.logprobs)
            top = tuple(zip(ids.tolist(), values.tolist()))
        return Token(token, float(logp[token]), top)
