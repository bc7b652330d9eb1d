"""Batched decoding over slots: several sequences decoded together, each joining and leaving
between steps (iteration-level, "continuous" batching).

The model holds one static KV cache with a row per slot. A request takes a free slot and is
prefilled there while the other rows keep their caches, at once or a chunk at a time between
steps (chunked prefill: a long prompt does not stall the running rows); every step then decodes
one token for each slot done prefilling, in one forward over all rows, each at its own position.

A slot's cache rows outlive its request: the decoder remembers which tokens they hold, and a new
prompt takes the free slot that already holds the longest prefix of it, prefilling only the rest
(prefix caching: a chat client that resends the conversation each turn prefills only the new turn).

Sampling is per row: temperature, top-k, top-p, min-p, penalties, biases, a structured-output
grammar and a seed of its own, so a row draws the same tokens alone or batched.

With n-gram drafts (prompt lookup), a step also feeds each row the tokens that followed the latest
earlier match of its context's last n-gram, and keeps them as long as the row's own draws agree:
the row draws at each position in turn, exactly as plain decoding would (the same logits, the same
generator), and stops at the first draw that differs from the draft. So each row's tokens are its
plain decoding's, greedy or sampled, and a step gives a row one token or up to k + 1.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from runner.decoders.base import Constraint, Token, common_prefix
from runner.decoders.proposers import NGramProposer
from runner.decoders.sampling import Sampling, adjust, next_token
from runner.kernels import MAX_ROWS
from runner.model.llama import Part


@dataclass
class _Row:
    sampling: Sampling
    generator: torch.Generator | None
    logprobs: int  # -1: none; 0: the chosen token's; k: and the k most likely
    position: int  # where its next token goes in the cache (a prompt token while it prefills)
    prompt: list[int]
    constraint: Constraint | None = None  # structured output: the ids its grammar allows next
    tokens: list[int] = field(default_factory=list)


class BatchDecoder:
    """A SlotDecoder (runner.decoders.base): `slots` rows of `cache_len` positions each over one model.

    start() prefills a prompt into a free slot and returns its first token (admit() then
    prefill() in chunks does the same between steps); step() decodes the next tokens of every slot
    done prefilling; finish() frees a slot at once. The caller (a scheduler) owns
    stopping: EOS, stop strings, max_tokens, cancellation. drafts: an n-gram proposer and
    speculate_k (tokens drafted per row and step), or None.
    """

    def __init__(self, model: torch.nn.Module, slots: int, cache_len: int, forward=None, prefix_cache: bool = True,
                 drafts: tuple[NGramProposer, int] | None = None):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.drafts = drafts
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

    def start(self, prompt: list[int], sampling: Sampling, seed: int | None = None, logprobs: int = -1,
              constraint: Constraint | None = None) -> tuple[int, Token]:
        """Prefill `prompt` into a free slot at once; (the slot, its first token). See admit()."""
        slot = self.admit(prompt, sampling, seed, logprobs, constraint)
        _, token = self.prefill(slot, len(prompt))
        return slot, token

    def admit(self, prompt: list[int], sampling: Sampling, seed: int | None = None, logprobs: int = -1,
              constraint: Constraint | None = None) -> int:
        """Take a free slot for `prompt` and return it; prefill() then runs the prompt into it, in
        one call or in chunks, while step() goes on decoding the other slots. ValueError when no
        slot is free or the prompt leaves no room in the cache for a new token. logprobs: -1
        computes none (a log-softmax over the vocabulary a row and step); 0 the chosen token's; k
        also the k most likely. constraint: the row's own structured-output matcher, if any."""
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
        self.rows[slot] = _Row(sampling, generator, logprobs, reused, list(prompt), constraint)
        return slot

    def prefill(self, slot: int, limit: int) -> tuple[int, Token | None]:
        """Run at most `limit` more prompt tokens of `slot`'s admitted prompt, alone: (how many
        ran, its first token once the whole prompt has run, else None). step(chunks=...) runs
        chunks along with a decode step instead."""
        tokens, positions, ran = self._chunk(slot, limit)
        with torch.inference_mode():
            logits = self.model(tokens, positions, last_only=True, row=slot)  # [1, 1, V]
            return ran, self._prefilled(slot, ran, logits[0, -1])

    def step(self, chunks: dict[int, int] | None = None) -> dict[int, list[Token]]:
        """The next tokens of every slot done prefilling (a slot whose cache is full is left out:
        finish it): one each, or up to speculate_k + 1 with drafts. chunks {slot: n}: the next n
        prompt tokens of those prefilling slots run in the same forward, through each linear with
        the decode rows (each weight read once for all); a slot whose prompt is then done gets its
        first token too."""
        chunks = dict(chunks or {})
        # A slot still prefilling has no token to decode: it rides along like a free one.
        ready = [s for s in self.busy() if self.rows[s].tokens and self.rows[s].position < self.cache_len]
        if not (ready or chunks):
            return {}
        rows = ready[-1] + 1 if ready else 0
        drafted = self._drafted(ready, MAX_ROWS - rows - sum(chunks.values()))
        with torch.inference_mode():
            if chunks or drafted:  # eager: a mixed forward has a shape of its own each time
                parts = [Part(*self._step_inputs(rows, ready), slice(0, rows))] if ready else []
                for slot, tokens in drafted.items():  # each at the positions after its step token
                    start = self.rows[slot].position + 1
                    parts.append(Part(torch.tensor([tokens], device=self.device),
                                      torch.arange(start, start + len(tokens), device=self.device)[None], slot))
                ran = {}
                for slot, limit in chunks.items():
                    tokens, positions, ran[slot] = self._chunk(slot, limit)
                    parts.append(Part(tokens, positions, slot, last_only=True))
                # The step's part comes first: its rows along for the shape write where a draft or
                # a chunk then writes its real tokens.
                logits = self.model.forward_parts(parts)
                step_logits, logits = (logits[0], logits[1:]) if ready else (None, logits)
                draft_logits = dict(zip(drafted, logits[:len(drafted)]))
                chunk_logits = logits[len(drafted):]
            else:
                # Compiled steps run every slot (free ones just past their cached tokens, their output
                # unused): one shape for every step, so they never recompile as requests come and go.
                # Eager ones run the slots up to the last busy one only.
                rows = self.slots if self.forward is not self.model else ready[-1] + 1
                tokens, positions = self._step_inputs(rows, ready)
                if rows == self.slots:
                    step_logits = self.forward(tokens, positions)  # [B, 1, V]
                else:
                    step_logits = self.model(tokens, positions, row=slice(0, rows))  # [rows, 1, V]
            out = {}
            for s in ready:
                out[s] = self._decoded(s, step_logits[s, -1], drafted.get(s, []),
                                       draft_logits[s][0] if s in drafted else None)
            if chunks:
                for slot, logits in zip(chunks, chunk_logits):
                    token = self._prefilled(slot, ran[slot], logits[0, -1])
                    if token is not None:
                        out[slot] = [token]
        return out

    def _drafted(self, ready: list[int], budget: int) -> dict[int, list[int]]:
        """Each ready row's n-gram drafts, where its context has a match and its cache has room:
        `budget` in all, each row's cut to the same length at most so that they fit (a forward of
        more rows than runner's GEMV kernels take would go to torch's slower matmuls)."""
        if self.drafts is None or budget <= 0:
            return {}
        proposer, k = self.drafts
        out = {}
        for s in ready:
            row = self.rows[s]
            tokens = proposer.draft(row.prompt + row.tokens, min(k, self.cache_len - 1 - row.position))
            if tokens:
                out[s] = tokens
        longest = max(map(len, out.values()), default=0)
        while sum(min(len(t), longest) for t in out.values()) > budget:
            longest -= 1
        return {s: t[:longest] for s, t in out.items() if longest > 0}

    def _decoded(self, slot: int, logits: torch.Tensor, drafted: list[int], draft_logits: torch.Tensor | None) -> list[Token]:
        """A ready row's new tokens: its draw after its pending token (logits [V]), then, while
        each draw equals the draft at its place, the draw after that draft (draft_logits [n, V])."""
        row = self.rows[slot]
        self.held[slot].append(row.tokens[-1])
        row.position += 1
        out = [self._pick(row, logits)]
        for i, token in enumerate(drafted):
            if out[-1].id != token:
                break
            self.held[slot].append(token)  # the draft's cache entry is the sequence's now
            row.position += 1
            out.append(self._pick(row, draft_logits[i]))
        return out

    def _step_inputs(self, rows: int, ready: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A step's tokens and positions [rows, 1]: each ready slot's last token at its position;
        every other row along for the shape, writing just past the tokens its cache holds."""
        tokens = torch.zeros(rows, 1, dtype=torch.long)
        positions = torch.zeros(rows, 1, dtype=torch.long)
        for s in range(rows):
            if s in ready:
                row = self.rows[s]
                tokens[s, 0], positions[s, 0] = row.tokens[-1], row.position
            else:
                positions[s, 0] = min(len(self.held[s]), self.cache_len - 1)
                del self.held[s][positions[s, 0]:]
        return tokens.to(self.device), positions.to(self.device)

    def _chunk(self, slot: int, limit: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The next chunk of at most `limit` tokens of a prefilling slot's prompt: tokens and
        positions [1, T], and T."""
        row = self.rows.get(slot)
        if row is None or row.tokens:
            raise ValueError(f"slot {slot} has no prompt left to prefill")
        end = min(len(row.prompt), row.position + max(limit, 1))
        tokens = torch.tensor([row.prompt[row.position:end]], device=self.device)
        positions = torch.arange(row.position, end, device=self.device)[None]
        return tokens, positions, end - row.position

    def _prefilled(self, slot: int, ran: int, logits: torch.Tensor) -> Token | None:
        """After a chunk of `ran` tokens of the slot's prompt has run (logits [V]: its last one's):
        the slot's first token once the whole prompt has."""
        row = self.rows[slot]
        row.position += ran
        self.held[slot] = row.prompt[:row.position]
        return self._pick(row, logits) if row.position == len(row.prompt) else None

    def finish(self, slot: int) -> None:
        """Free `slot` for the next request (its cache rows are overwritten by the next prefill)."""
        self.rows.pop(slot, None)

    def _pick(self, row: _Row, logits: torch.Tensor) -> Token:
        if row.sampling.adjusts:
            logits = adjust(logits, row.sampling, row.prompt, row.tokens)
        # The grammar's mask: after penalties and biases, before temperature and top-k/p. Log-
        # probabilities are the unmasked distribution's, as vLLM reports them.
        drawn = logits if row.constraint is None else row.constraint.mask(logits)
        token = int(next_token(drawn, row.sampling, row.generator))
        if row.constraint is not None:
            row.constraint.accept(token)
        row.tokens.append(token)
        if row.logprobs < 0:
            return Token(token, None)
        logp = torch.log_softmax(logits.float(), dim=-1)
        top = ()
        if row.logprobs:
            values, ids = logp.topk(row.logprobs)
            top = tuple(zip(ids.tolist(), values.tolist()))
        return Token(token, float(logp[token]), top)
