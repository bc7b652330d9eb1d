"""The scheduler: one thread owns the BatchDecoder and the model loop; requests come and go
between steps (continuous batching). It knows nothing of HTTP.

A request waits in a queue for a free slot and is admitted to it; its prompt runs inside the next
steps, at most `prefill_chunk` prompt tokens a step over all prompts (chunked prefill), so the
running requests keep getting tokens while a long prompt arrives; then it decodes with them.
Each new token goes through the request's TextStream and is handed to the request's `emit`
callback as a Piece; the last event is Finished (or Failed). A finished or
cancelled request frees its slot at once. Stopping (EOS, stop strings, max_tokens, a full cache,
cancellation) is decided here: the decoder only decodes.
"""
from __future__ import annotations

import json
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Protocol

from runner.config.errors import ConfigError
from runner.decoders.base import SlotDecoder, Token
from runner.decoders.grammar import Grammar, Grammars
from runner.decoders.sampling import Sampling
from runner.serve.metrics import Metrics
from runner.text import TextStream
from runner.tokenizers.base import Tokenizer
from runner.tokenizers.chat import render_messages


@dataclass(frozen=True)
class Job:
    """One sequence to generate."""

    prompt: list[int]
    sampling: Sampling
    max_tokens: int
    stop: tuple[str, ...] = ()
    seed: int | None = None  # None: a fresh random seed (sampling) - the row is still independent of its batch
    logprobs: int = -1  # -1: none; 0: the chosen token's; k: and the k most likely
    grammar: Grammar | None = None  # structured output (response_format): each row matches it on its own


@dataclass(frozen=True)
class TokenInfo:
    """A generated token with its log-probability, and the most likely alternatives."""

    id: int
    text: str
    bytes: bytes
    logprob: float
    top: tuple[tuple[str, bytes, float], ...] = ()


@dataclass(frozen=True)
class Piece:
    text: str  # may be "" (text held back: a partial character, or what may begin a stop string)
    token: TokenInfo | None = None  # with Job.logprobs >= 0 only


@dataclass(frozen=True)
class Finished:
    reason: str  # "stop" (EOS or a stop string), "length" (max_tokens or a full cache), "cancelled"
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    message: str  # the model loop raised: a server fault, not the request's


Event = Piece | Finished | Failed


class Busy(Exception):
    """Every slot and every queue place is taken."""


class Handle:
    """A submitted job: cancel() stops it (waiting or running) and frees its slot."""

    def __init__(self, job: Job, emit: Callable[[Event], None]):
        self.job, self.emit = job, emit
        self.cancelled = False
        self.submitted = time.perf_counter()

    def cancel(self) -> None:
        self.cancelled = True


class KeepAlive(Protocol):
    """A decoder that must hear from the scheduler while no request runs (runner.serve.ranks.Leader:
    the other ranks of a tensor-parallel group wait in a collective with a timeout)."""

    heartbeat_seconds: float  # how often an idle scheduler calls idle()

    def idle(self) -> None:
        """Nothing ran for heartbeat_seconds."""
        ...

    def close(self) -> None:
        """The scheduler is done with the decoder."""
        ...


@dataclass
class _Running:
    handle: Handle
    text: TextStream
    prefilled: int = 0  # prompt tokens in its slot's cache
    generated: int = 0
    last: float = 0.0  # when its latest token came
    ended: bool = field(default=False)


class Scheduler:
    """Runs jobs on `decoder`'s slots, at most `queue` more waiting for one; `keepalive` hears
    from the loop while it waits for work, and when it ends. prefill_chunk: prompt tokens run inside
    each decode step while some row decodes, at most (0: every admitted prompt whole). vocab_size: the model's
    logits per row (structured output masks them all), the tokenizer's by default."""

    GRAMMARS = 32  # compiled response formats kept for the next request that sends one again

    def __init__(self, decoder: SlotDecoder, tokenizer: Tokenizer, queue: int, metrics: Metrics | None = None,
                 keepalive: KeepAlive | None = None, prefill_chunk: int = 0, vocab_size: int | None = None):
        if prefill_chunk < 0:
            raise ValueError(f"prefill_chunk must be >= 0 (0: no chunks), got {prefill_chunk}")
        self.decoder, self.tokenizer, self.keepalive = decoder, tokenizer, keepalive
        self.slots, self.cache_len, self.queue = decoder.slots, decoder.cache_len, queue
        self.prefill_chunk = prefill_chunk
        self.vocab_size = vocab_size or tokenizer.vocab_size
        self._grammars = Grammars(tokenizer, self.vocab_size, self.GRAMMARS)  # by response format
        self.metrics = metrics or Metrics()
        self._cond = threading.Condition()
        self._waiting: deque[Handle] = deque()
        self._running: dict[int, _Running] = {}  # slot -> its request (prefilling or decoding)
        self._prefilling: deque[int] = deque()  # slots whose prompts have not all run, oldest first
        self._inflight = 0  # submitted and not finished: waiting + running
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="runner-scheduler", daemon=True)

    # ---- prompts (text -> ids, ids -> text: no tensors either)
    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, bos=True)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """ValueError when the model has no chat template or the template rejects the messages."""
        try:
            text = render_messages(self.tokenizer, messages, "request")
        except ConfigError as e:
            raise ValueError(e.problems[0].message) from None
        return self.tokenizer.encode(text, bos=False, allow_special=True)

    def grammar(self, response_format: object) -> Grammar | None:
        """OpenAI's response_format compiled for this model (None: plain text); ValueError naming
        the field for one that cannot be served."""
        return self._grammars.get(json.dumps(response_format, sort_keys=True),
                                  lambda tokens: Grammar.from_response_format(response_format, tokens))

    # ---- the queue
    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, jobs: list[Job], emits: list[Callable[[Event], None]]) -> list[Handle]:
        """Queue `jobs` together (all or none: Busy when slots + queue cannot take them all)."""
        handles = [Handle(job, emit) for job, emit in zip(jobs, emits)]
        with self._cond:
            if self._stopping:
                raise Busy("the server is shutting down")
            if self._inflight + len(handles) > self.slots + self.queue:
                raise Busy(f"all {self.slots} slots and {self.queue} queue places are taken")
            self._inflight += len(handles)
            self._waiting.extend(handles)
            self._cond.notify()
        return handles

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop the loop; whatever is waiting or running ends as cancelled."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    # ---- the model loop (the scheduler thread only)
    def _loop(self) -> None:
        while True:
            with self._cond:
                heartbeat = self.keepalive.heartbeat_seconds if self.keepalive else None
                while not (self._stopping or self._waiting or self._running):
                    if not self._cond.wait(heartbeat):
                        self.keepalive.idle()
                if self._stopping:
                    break
            for r in list(self._running.values()):
                if r.handle.cancelled:
                    self._end(r, "cancelled")
            with self._cond:
                gone = [h for h in self._waiting if h.cancelled]  # their clients left while they queued
                for handle in gone:
                    self._waiting.remove(handle)
                admit = [self._waiting.popleft() for _ in range(min(len(self._waiting), self.slots - len(self._running)))]
            for handle in gone:
                self._finish_unstarted(handle, Finished("cancelled", len(handle.job.prompt), 0))
            for handle in admit:
                self._admit(handle)
            if self._running:
                self._step()
        for r in list(self._running.values()):
            self._end(r, "cancelled")
        while self._waiting:
            handle = self._waiting.popleft()
            self._finish_unstarted(handle, Finished("cancelled", len(handle.job.prompt), 0))
        if self.keepalive is not None:
            self.keepalive.close()

    def _admit(self, handle: Handle) -> None:
        job = handle.job
        seed = job.seed if job.seed is not None or job.sampling.greedy else random.getrandbits(63)
        try:
            constraint = None if job.grammar is None else job.grammar.matcher()
            slot = self.decoder.admit(job.prompt, job.sampling, seed, job.logprobs, constraint)
        except Exception as e:  # a prompt the HTTP layer should have refused, or a model fault
            self._finish_unstarted(handle, Failed(f"prefill failed: {e}"))
            return
        self.metrics.cached(self.decoder.reused)
        self._running[slot] = _Running(handle, TextStream(self.tokenizer, job.stop), prefilled=self.decoder.reused)
        self._prefilling.append(slot)

    def _chunks(self) -> dict[int, int]:
        """This step's prompt tokens per prefilling slot: oldest first, prefill_chunk in all while
        some row decodes (whole prompts while none does, or with prefill_chunk 0)."""
        budget, chunks = self.prefill_chunk, {}
        whole = not self.prefill_chunk or len(self._running) == len(self._prefilling)  # no stream to keep going
        for slot in self._prefilling:
            r = self._running[slot]
            left = len(r.handle.job.prompt) - r.prefilled
            n = left if whole else min(left, budget)
            if n <= 0:
                break
            chunks[slot] = n
            r.prefilled += n
            budget -= n
        return chunks

    def _step(self) -> None:
        chunks = self._chunks()
        try:
            tokens = self.decoder.step(chunks)
        except Exception as e:  # a model fault: every running request fails, the server goes on
            for slot, r in list(self._running.items()):
                self._end(r, None, Failed(f"{'prefill' if slot in chunks else 'decode step'} failed: {e}"))
            return
        for slot, new in tokens.items():
            r = self._running.get(slot)
            if r is None:
                continue
            if slot in self._prefilling:  # its prompt has all run: this is its first token
                self._prefilling.remove(slot)
            for token in new:  # several where drafts were kept; the request may stop at any
                if r.ended:
                    break
                self._advance(slot, r, token)

    def _advance(self, slot: int, r: _Running, token: Token) -> None:
        """Take one new token for the request in `slot`: emit its text, decide whether it stops."""
        job, now = r.handle.job, time.perf_counter()
        r.generated += 1
        if r.generated == 1:
            self.metrics.first_token(now - r.handle.submitted)
        else:
            self.metrics.next_token(now - r.last)
        r.last = now
        text = r.text.push(token.id)
        if r.text.ended:  # EOS: no token of its own to report, only what was held back
            if text:
                self._emit(r, Piece(text))
            self._end(r, "stop")
            return
        info = self._info(token) if job.logprobs >= 0 else None
        if r.text.stopped:
            self._emit(r, Piece(text, info))
            self._end(r, "stop")
            return
        # The next token would go at position len(prompt) + generated - 1: past the cache, none can.
        full = len(job.prompt) + r.generated - 1 >= self.cache_len
        if r.generated >= job.max_tokens or full:
            text += r.text.flush()
            self._emit(r, Piece(text, info))
            self._end(r, "stop" if r.text.stopped else "length")
            return
        if text or info is not None:
            self._emit(r, Piece(text, info))

    def _info(self, token: Token) -> TokenInfo:
        def text(i: int) -> tuple[str, bytes]:
            raw = self.tokenizer.token_bytes(i) if 0 <= i < self.tokenizer.vocab_size else b""
            return (raw.decode("utf-8", errors="replace") if raw else self.tokenizer.decode([i])), raw

        return TokenInfo(token.id, *text(token.id), token.logprob,
                         tuple((*text(i), lp) for i, lp in token.top))

    def _emit(self, r: _Running, event: Event) -> None:
        try:
            r.handle.emit(event)
        except Exception:  # the listener is gone (its event loop closed): nobody wants the rest
            r.handle.cancel()

    def _end(self, r: _Running, reason: str | None, event: Event | None = None) -> None:
        """Free r's slot at once and send its last event (Finished(reason), or `event`)."""
        if r.ended:
            return
        r.ended = True
        slot = next(s for s, x in self._running.items() if x is r)
        self.decoder.finish(slot)
        del self._running[slot]
        if slot in self._prefilling:
            self._prefilling.remove(slot)
        prompt = len(r.handle.job.prompt)
        self.metrics.tokens(prompt, r.generated)
        with self._cond:
            self._inflight -= 1
        self._emit(r, event or Finished(reason, prompt, r.generated))

    def _finish_unstarted(self, handle: Handle, event: Event) -> None:
        with self._cond:
            self._inflight -= 1
        try:
            handle.emit(event)
        except Exception:
            pass
