"""Adaptive thread count for decode steps on the CPU: what a recipe's `threads: null` means there.

A decode step is short and its threads wait for each other many times a step. When another
process takes a core, a thread waiting on a preempted partner loses its time slice, and the step
at one thread per core becomes many times slower than at fewer threads. AdaptiveThreads wraps a
Forward, times its decode-shaped calls and keeps torch at the count that is fastest now: it runs
one count and, every so often, tries another for one step (a probe, each other count in turn),
switching when the probes' recent times beat the current count's by a margin. Probes come at once
after start, after a switch and after the current count slows down (load appeared), then rarer
while the current count keeps winning, and rarer still for a count that probed much slower (a
probe there is costly).

Prefills run at the current count and are not timed: they are long, few, and their GEMMs share
work differently; nor is the first step after one, slow for reasons of its own. The count is torch's process-wide setting, changed only when the
count wanted differs from it, and put back right after a probe.
"""
from __future__ import annotations

import functools
import math
import statistics
import time
from collections import deque
from typing import Callable

import torch

from runner.decoders.base import Forward
from runner.kernels import MAX_ROWS

WINDOW = 5  # the current count's time: the median of its last WINDOW steps
PROBES = 3  # a probed count's time: the median of its last PROBES probes
MARGIN = 0.05  # a probed count takes over when it is this much faster than the current one
RECENT = 3  # the load changed when the current count's last RECENT steps (their median) take
JUMP = 1.5  # more than JUMP times the WINDOW steps before them
MAX_PERIOD = 128  # steps at the current count between probes: none after a change, then doubling up to this
PROBE_SHARE = 0.03  # a probe of a slow count comes late enough to cost at most this share of the time


@functools.cache
def default_count() -> int:
    """torch's own thread count (one per core, or OMP_NUM_THREADS), as it is the first time this
    is asked: runner.pipeline asks before it sets any count."""
    return torch.get_num_threads()


def candidates(n: int) -> list[int]:
    """The thread counts to choose from, most first: n, n - 1 (when more than half of n), then
    n halved again and again down to 1."""
    counts = [n] + ([n - 1] if n - 1 > n / 2 else [])
    half = n // 2
    while half >= 1:
        counts.append(half)
        half //= 2
    return list(dict.fromkeys(counts))


def adaptive(forward: Forward, n: int | None = None) -> Forward:
    """`forward` at an adaptive thread count among candidates(n) (n: default_count()); `forward`
    itself where there is one count only."""
    counts = candidates(default_count() if n is None else n)
    return AdaptiveThreads(forward, counts) if len(counts) > 1 else forward


class AdaptiveThreads:
    """A Forward whose decode steps (up to MAX_ROWS tokens, not a prefill) run at the thread count
    that measures fastest, among `counts` (the first is where it starts). `clock`, `set_threads` and
    `get_threads` are time.perf_counter and torch's, or a test's fakes."""

    def __init__(self, forward: Forward, counts: list[int], clock: Callable[[], float] = time.perf_counter,
                 set_threads: Callable[[int], None] = torch.set_num_threads,
                 get_threads: Callable[[], int] = torch.get_num_threads):
        self.forward, self.counts = forward, counts
        self.clock, self.set_threads, self.get_threads = clock, set_threads, get_threads
        self.current = counts[0]
        # Each count's recent step times: the current count's last WINDOW + RECENT (to see a jump), a
        # probed count's last few probes.
        self.times: dict[int, deque[float]] = {n: deque(maxlen=WINDOW + RECENT) for n in counts}
        self.step = 0  # decode steps so far
        self.period = 0  # steps at the current count between probes
        self.next_probe = 1  # the step from which the next probe may run
        self.due = dict.fromkeys(counts, 0)  # the step from which each count may be probed again
        self.after_prompt = True  # the next decode step follows a prefill (or is the first)
        self.probed = None  # the count the last step probed, until the step after it is timed

    def __call__(self, tokens: torch.Tensor, input_pos: torch.Tensor, last_only: bool = False,
                 row: int | slice | None = None) -> torch.Tensor:
        args = (tokens, input_pos, last_only) if row is None else (tokens, input_pos, last_only, row)
        # A prefill: a prompt (a short one wants only its last position's logits, as a draft
        # model's catch-up does), or more tokens than a decode step.
        prefill = tokens.numel() > MAX_ROWS or (last_only and tokens.shape[-1] > 1)
        if prefill or self.after_prompt:
            # A prefill runs at the current count, which a probe has left in place. So does the first
            # step after one, untimed: it is several times slower than the next ones.
            self.after_prompt, self.probed = prefill, None
            self._use(self.current)
            return self.forward(*args)
        count = self._next()
        self._use(count)
        start = self.clock()
        out = self.forward(*args)  # synchronous on the CPU: the wall clock around it is the step's time
        self._record(count, self.clock() - start)
        self._use(self.current)  # after a probe, back at once: whatever runs next runs at the current count
        self.step += 1
        return out

    def _use(self, count: int) -> None:
        if self.get_threads() != count:
            self.set_threads(count)

    def _next(self) -> int:
        """This step's count: the current one, or, once the period is over, the other count that
        has waited longest for a probe (a round robin over those whose probes are affordable)."""
        if self.step >= self.next_probe and self.times[self.current]:
            ready = [n for n in self.counts if n != self.current and self.due[n] <= self.step]
            if ready:
                return min(ready, key=self.due.__getitem__)
        return self.current

    def _median(self, count: int, last: int) -> float:
        """The median of count's `last` most recent times."""
        return statistics.median(list(self.times[count])[-last:])

    def _record(self, count: int, seconds: float) -> None:
        times = self.times[count]
        times.append(seconds)
        if count == self.current:
            if self.probed is not None:
                # The step after a probe is part of its cost: under load it pays back the time
                # the probe's extra threads took from the other processes.
                self.due[self.probed] += self._spacing(seconds / self._median(count, WINDOW))
                self.probed = None
            before = list(times)[:WINDOW]
            if len(times) == times.maxlen and self._median(count, RECENT) > JUMP * statistics.median(before):
                self._changed()
            return
        current = self._median(self.current, WINDOW)
        beats = (1 - MARGIN) * current  # a time under this beats the current count
        if len(times) >= 2 and seconds < beats <= self._median(count, PROBES):
            # Faster than its earlier probes said: they are from before a change. Start afresh
            # from this one, and probe again soon.
            times.clear()
            times.append(seconds)
            self.period = 0
        elif len(times) >= 2:  # one probe says too little: the period stays until a second one
            probed = self._median(count, PROBES)
            if probed < beats:
                self.due[self.current] = self.step + self._spacing(current / probed)
                self.current, self.period = count, 0
            else:
                self.period = min(max(1, 2 * self.period), MAX_PERIOD)
        self.due[count] = self.step + self._spacing(seconds / current)
        self.probed = None if count == self.current else count
        self.next_probe = self.step + 1 + self.period

    def _changed(self) -> None:
        """The current count's last steps are slower than those before: the machine changed, and
        the other counts' times with it. Their probes start afresh, from the next step for the
        smaller counts (load that slows the current count slows a larger one at least as much)."""
        times = self.times[self.current]
        for _ in range(WINDOW):  # the older steps go: one jump, one change
            times.popleft()
        for n in self.counts:
            if n != self.current:
                self.times[n].clear()
            if n < self.current:
                self.due[n] = self.step
        self.period, self.next_probe = 0, self.step + 1

    def _spacing(self, slower: float) -> int:
        """Steps to wait before probing a count whose probe cost `slower` times a step at the
        current count: the dearer a probe, the later the next, for probes to take at most about
        PROBE_SHARE of the time."""
        return math.ceil(max(0.0, slower - 1) / PROBE_SHARE)
