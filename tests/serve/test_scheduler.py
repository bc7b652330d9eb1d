"""The scheduler on a scripted decoder (no model, no HTTP): stopping, slots, the queue, cancelling."""
from __future__ import annotations

import queue
import time

import pytest

from runner.decoders.base import Token
from runner.decoders.sampling import Sampling
from runner.serve.scheduler import Busy, Finished, Job, Piece, Scheduler

EOS = 0
PIECES = {EOS: b"", 1: b"a", 2: b"b", 3: b"c", 4: b"\xe2\x82", 5: b"\xac"}  # 4 + 5: "€" split in two


class Tokenizer:
    eos_ids = frozenset({EOS})
    vocab_size = len(PIECES)

    def token_bytes(self, i):
        return PIECES[i]

    def decode(self, ids):
        return b"".join(PIECES[i] for i in ids).decode("utf-8", errors="replace")


class Scripted:
    """A SlotDecoder whose slot s produces the token ids of the script its prompt names, per_step
    of them a step."""

    def __init__(self, slots: int, cache_len: int, scripts: dict[int, list[int]], delay: float = 0.0, per_step: int = 1):
        self.slots, self.cache_len, self.scripts, self.delay = slots, cache_len, scripts, delay
        self.per_step = per_step
        self.rows, self.max_busy, self.reused = {}, 0, 0
        self.calls = []  # ("admit", slot), ("step", the slots it decoded, {slot: prompt tokens it ran})

    def admit(self, prompt, sampling, seed=None, logprobs=0, constraint=None):
        slot = next(s for s in range(self.slots) if s not in self.rows)
        self.rows[slot] = [iter(self.scripts[prompt[0]]), 0, len(prompt)]  # script, position, prompt length
        self.max_busy = max(self.max_busy, len(self.rows))
        self.calls.append(("admit", slot))
        return slot

    def step(self, chunks=None):
        time.sleep(self.delay)
        out = {}
        for slot, row in self.rows.items():
            if row[2] <= row[1] < self.cache_len:
                n = min(self.per_step, self.cache_len - row[1])  # as drafts kept: several tokens a step
                row[1] += n
                out[slot] = [Token(next(row[0], EOS), -0.5) for _ in range(n)]  # past its script: EOS
        for slot, n in (chunks or {}).items():
            row = self.rows[slot]
            assert 0 < n <= row[2] - row[1]
            row[1] += n
            if row[1] == row[2]:
                out[slot] = [Token(next(row[0]), -0.5)]
        self.calls.append(("step", sorted(s for s in out if s not in (chunks or {})), dict(chunks or {})))
        return out

    def finish(self, slot):
        self.rows.pop(slot, None)


def run(decoder, jobs, queue_places=4, prefill_chunk=0):
    scheduler = Scheduler(decoder, Tokenizer(), queue_places, prefill_chunk=prefill_chunk)
    scheduler.start()
    boxes = [queue.Queue() for _ in jobs]
    handles = scheduler.submit(jobs, [box.put for box in boxes])
    return scheduler, handles, boxes


def collect(box, timeout=5.0) -> tuple[str, Finished]:
    text = ""
    while True:
        event = box.get(timeout=timeout)
        if isinstance(event, Piece):
            text += event.text
        else:
            return text, event


def job(script: int, max_tokens: int = 10, stop=()) -> Job:
    return Job([script], Sampling(), max_tokens, tuple(stop))


@pytest.mark.parametrize("per_step", [1, 3])  # 3: steps that keep drafts end requests mid-step
def test_eos_max_tokens_split_character_and_stop_across_tokens(per_step):
    decoder = Scripted(4, 64, {1: [1, 4, 5, 2, EOS], 2: [1, 2, 3] * 10, 3: [1, 2, 3, 1, 2], 4: [4, 5, 1, 2]},
                       per_step=per_step)
    scheduler, _, boxes = run(decoder, [job(1), job(2, max_tokens=5), job(3, stop=["ca"]), job(4, stop=["€a"])])
    try:
        assert collect(boxes[0]) == ("a€b", Finished("stop", 1, 5))
        assert collect(boxes[1]) == ("abcab", Finished("length", 1, 5))
        assert collect(boxes[2]) == ("ab", Finished("stop", 1, 4))  # "c" and "a" are two tokens
        assert collect(boxes[3]) == ("", Finished("stop", 1, 3))
        assert scheduler.running == 0 and scheduler.waiting == 0
    finally:
        scheduler.close()


@pytest.mark.parametrize("per_step", [1, 2])
def test_a_full_cache_ends_with_length(per_step):
    decoder = Scripted(1, 4, {1: [1] * 100}, per_step=per_step)  # prompt of 1: tokens at positions 1..3, then full
    scheduler, _, boxes = run(decoder, [job(1, max_tokens=100)])
    try:
        assert collect(boxes[0]) == ("aaaa", Finished("length", 1, 4))
    finally:
        scheduler.close()


def test_queue_waits_for_slots_and_busy_beyond_it():
    decoder = Scripted(2, 1000, {1: [1] * 1000}, delay=0.002)
    scheduler, handles, boxes = run(decoder, [job(1, max_tokens=50)] * 3, queue_places=1)
    try:
        with pytest.raises(Busy):
            scheduler.submit([job(1)], [lambda e: None])
        for box in boxes:
            assert collect(box) == ("a" * 50, Finished("length", 1, 50))
        assert decoder.max_busy == 2  # never more rows than slots
        extra = queue.Queue()
        scheduler.submit([job(1, max_tokens=3)], [extra.put])  # room again
        assert collect(extra)[1].reason == "length"
    finally:
        scheduler.close()


def test_cancel_frees_the_slot_at_once_running_or_waiting():
    decoder = Scripted(1, 10**6, {1: [1] * 10**6}, delay=0.001)
    scheduler, handles, boxes = run(decoder, [job(1, max_tokens=10**5), job(1, max_tokens=10**5)])
    try:
        assert isinstance(boxes[0].get(timeout=5), Piece)
        handles[1].cancel()  # waiting
        assert collect(boxes[1]) == ("", Finished("cancelled", 1, 0))
        handles[0].cancel()  # running
        text, end = collect(boxes[0])
        assert end.reason == "cancelled" and end.completion_tokens < 10**5
        assert scheduler.running == 0 and decoder.rows == {}
    finally:
        scheduler.close()


@pytest.mark.parametrize("chunk", [1, 4, 7])
def test_a_long_prompt_is_prefilled_in_chunks_while_the_running_rows_decode(chunk):
    scripts = {1: [1] * 1000, 2: [2, 3] * 500}
    short, long = job(1, max_tokens=200), Job([2] * 25, Sampling(), 5)
    decoder = Scripted(2, 1000, scripts, delay=0.001)
    scheduler, _, boxes = run(decoder, [short], prefill_chunk=chunk)
    try:
        first = boxes[0].get(timeout=5)  # the short row runs
        late = queue.Queue()
        scheduler.submit([long], [late.put])
        assert collect(late) == ("bcbcb", Finished("length", 25, 5))
        text, end = collect(boxes[0])
        assert (first.text + text, end) == ("a" * 200, Finished("length", 1, 200))
    finally:
        scheduler.close()
    steps = [call for call in decoder.calls if call[0] == "step"]
    assert all(sum(call[2].values()) <= chunk for call in steps)
    slot = [call[1] for call in decoder.calls if call[0] == "admit"][1]
    runs = [call[2][slot] for call in steps if slot in call[2]]
    assert sum(runs) == 25 and len(runs) == -(-25 // chunk)
    # Every step that ran a chunk of the long prompt decoded the short row too.
    assert all(call[1] == [0] for call in steps if slot in call[2])


def test_a_prompt_runs_whole_while_no_row_decodes():
    decoder = Scripted(2, 1000, {2: [2] * 1000})
    scheduler, _, boxes = run(decoder, [Job([2] * 40, Sampling(), 5)], prefill_chunk=4)
    try:
        assert collect(boxes[0]) == ("bbbbb", Finished("length", 40, 5))
    finally:
        scheduler.close()
    assert ("step", [], {0: 40}) in decoder.calls  # no stream to keep going: no chunks


def test_without_chunks_a_prompt_is_prefilled_whole_before_the_next_step():
    decoder = Scripted(2, 1000, {1: [1] * 1000, 2: [2] * 1000})
    scheduler, _, boxes = run(decoder, [job(1, max_tokens=5), Job([2] * 40, Sampling(), 5)])
    try:
        assert collect(boxes[1]) == ("bbbbb", Finished("length", 40, 5))
        collect(boxes[0])
    finally:
        scheduler.close()
    assert ("step", [], {0: 1, 1: 40}) in decoder.calls  # both prompts whole, in the first step


def test_cancelling_a_request_while_it_prefills_frees_its_slot():
    decoder = Scripted(2, 10**6, {1: [1] * 10**6, 2: [2] * 10}, delay=0.001)
    scheduler, handles, boxes = run(decoder, [job(1, max_tokens=10**5)], prefill_chunk=1)
    try:
        assert isinstance(boxes[0].get(timeout=5), Piece)  # a row decodes: prompts now run in chunks
        late = queue.Queue()
        handle, = scheduler.submit([Job([2] * 10**5, Sampling(), 5)], [late.put])
        while not any(call[0] == "step" and call[2] for call in decoder.calls):
            time.sleep(0.001)
        handle.cancel()
        assert collect(late) == ("", Finished("cancelled", 10**5, 0))
        assert set(decoder.rows) == {0}  # the prefilling row's slot is free; the decoding one runs on
        handles[0].cancel()
        collect(boxes[0])
        assert scheduler.running == 0 and decoder.rows == {}
    finally:
        scheduler.close()
