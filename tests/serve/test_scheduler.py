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
    """A SlotDecoder whose slot s produces the token ids of the script its prompt names."""

    def __init__(self, slots: int, cache_len: int, scripts: dict[int, list[int]], delay: float = 0.0):
        self.slots, self.cache_len, self.scripts, self.delay = slots, cache_len, scripts, delay
        self.rows, self.max_busy, self.reused = {}, 0, 0
        self.calls = []  # ("admit", slot), ("prefill", slot, tokens run), ("step", the slots it decoded)

    def admit(self, prompt, sampling, seed=None, logprobs=0):
        slot = next(s for s in range(self.slots) if s not in self.rows)
        self.rows[slot] = [iter(self.scripts[prompt[0]]), 0, len(prompt)]  # script, position, prompt length
        self.max_busy = max(self.max_busy, len(self.rows))
        self.calls.append(("admit", slot))
        return slot

    def prefill(self, slot, limit):
        time.sleep(self.delay)
        row = self.rows[slot]
        ran = min(limit, row[2] - row[1])
        row[1] += ran
        self.calls.append(("prefill", slot, ran))
        return ran, Token(next(row[0]), -0.5) if row[1] == row[2] else None

    def step(self):
        time.sleep(self.delay)
        out = {}
        for slot, row in self.rows.items():
            if row[2] <= row[1] < self.cache_len:
                row[1] += 1
                out[slot] = Token(next(row[0]), -0.5)
        self.calls.append(("step", sorted(out)))
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


def test_eos_max_tokens_split_character_and_stop_across_tokens():
    decoder = Scripted(4, 64, {1: [1, 4, 5, 2, EOS], 2: [1, 2, 3] * 10, 3: [1, 2, 3, 1, 2], 4: [4, 5, 1, 2]})
    scheduler, _, boxes = run(decoder, [job(1), job(2, max_tokens=5), job(3, stop=["ca"]), job(4, stop=["€a"])])
    try:
        assert collect(boxes[0]) == ("a€b", Finished("stop", 1, 5))
        assert collect(boxes[1]) == ("abcab", Finished("length", 1, 5))
        assert collect(boxes[2]) == ("ab", Finished("stop", 1, 4))  # "c" and "a" are two tokens
        assert collect(boxes[3]) == ("", Finished("stop", 1, 3))
        assert scheduler.running == 0 and scheduler.waiting == 0
    finally:
        scheduler.close()


def test_a_full_cache_ends_with_length():
    decoder = Scripted(1, 4, {1: [1] * 100})  # prompt of 1: tokens at positions 1..3, then full
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


def between_steps(calls) -> list[list[tuple]]:
    """The decoder's prefill calls grouped by the steps that separate them."""
    groups = [[]]
    for call in calls:
        if call[0] == "step":
            groups.append([])
        elif call[0] == "prefill":
            groups[-1].append(call)
    return groups


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
    groups = between_steps(decoder.calls)
    assert all(sum(call[2] for call in group) <= chunk for group in groups)
    slot = next(call[1] for call in decoder.calls if call[0] == "admit" and call != decoder.calls[0])
    runs = [call[2] for call in decoder.calls if call[0] == "prefill" and call[1] == slot]
    assert sum(runs) == 25 and len(runs) == -(-25 // chunk)
    # Every step while the long prompt prefilled decoded the short row.
    mine = [i for i, call in enumerate(decoder.calls) if call[:2] == ("prefill", slot)]
    steps = [call for call in decoder.calls[mine[0]:mine[-1]] if call[0] == "step"]
    assert len(steps) == len(runs) - 1 and all(call[1] == [0] for call in steps)


def test_without_chunks_a_prompt_is_prefilled_whole_before_the_next_step():
    decoder = Scripted(2, 1000, {1: [1] * 1000, 2: [2] * 1000})
    scheduler, _, boxes = run(decoder, [job(1, max_tokens=5), Job([2] * 40, Sampling(), 5)])
    try:
        assert collect(boxes[1]) == ("bbbbb", Finished("length", 40, 5))
        collect(boxes[0])
    finally:
        scheduler.close()
    assert ("prefill", 1, 40) in decoder.calls


def test_cancelling_a_request_while_it_prefills_frees_its_slot():
    decoder = Scripted(1, 10**6, {1: [1] * 10}, delay=0.001)
    scheduler, handles, boxes = run(decoder, [Job([1] * 10**5, Sampling(), 5)], prefill_chunk=1)
    try:
        while not any(call[0] == "prefill" for call in decoder.calls):
            time.sleep(0.001)
        handles[0].cancel()
        assert collect(boxes[0]) == ("", Finished("cancelled", 10**5, 0))
        assert scheduler.running == 0 and decoder.rows == {}
    finally:
        scheduler.close()
