"""The server's counters in Prometheus' text format (version 0.0.4), with no client library.

The scheduler thread and the HTTP event loop both record here, so every change holds one lock.
"""
from __future__ import annotations

import bisect
import threading
from collections import Counter

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Histogram:
    """Cumulative buckets, a sum and a count, as Prometheus keeps them."""

    def __init__(self, buckets: tuple[float, ...]):
        self.bounds = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one: above every bound (+Inf only)
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts):
            total += n
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{le="{le}"}} {total}')
        return out + [f"{name}_sum {self.sum}", f"{name}_count {self.count}"]


class Metrics:
    """Requests by endpoint and status, token totals, and the latency histograms."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.prompt_tokens = 0
        self.cached_prompt_tokens = 0
        self.generated_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[endpoint, status] += 1

    def tokens(self, prompt: int, generated: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt
            self.generated_tokens += generated

    def cached(self, tokens: int) -> None:
        """Prompt tokens a prefill found in its slot's cache (prefix caching), not computed again."""
        with self._lock:
            self.cached_prompt_tokens += tokens

    def first_token(self, seconds: float) -> None:
        """Time from a request's arrival at the scheduler (queueing included) to its first token."""
        with self._lock:
            self.ttft.observe(seconds)

    def next_token(self, seconds: float) -> None:
        """Time between two tokens of one request."""
        with self._lock:
            self.tpot.observe(seconds)

    def render(self, running: int, waiting: int) -> str:
        """The exposition text; `running` and `waiting` are read from the scheduler at scrape time."""
        with self._lock:
            lines = ["# HELP runner_requests_total HTTP requests answered, by endpoint and status code.",
                     "# TYPE runner_requests_total counter"]
            lines += [f'runner_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                      for (e, s), n in sorted(self.requests.items())]
            lines += ["# HELP runner_prompt_tokens_total Prompt tokens prefilled.",
                      "# TYPE runner_prompt_tokens_total counter",
                      f"runner_prompt_tokens_total {self.prompt_tokens}",
                      "# HELP runner_prompt_tokens_cached_total Prompt tokens served from a slot's cache (prefix caching).",
                      "# TYPE runner_prompt_tokens_cached_total counter",
                      f"runner_prompt_tokens_cached_total {self.cached_prompt_tokens}",
                      "# HELP runner_generation_tokens_total Tokens generated.",
                      "# TYPE runner_generation_tokens_total counter",
                      f"runner_generation_tokens_total {self.generated_tokens}",
                      "# HELP runner_requests_running Sequences holding a slot of the batch.",
                      "# TYPE runner_requests_running gauge",
                      f"runner_requests_running {running}",
                      "# HELP runner_requests_waiting Sequences queued for a free slot.",
                      "# TYPE runner_requests_waiting gauge",
                      f"runner_requests_waiting {waiting}",
                      "# HELP runner_time_to_first_token_seconds From arrival (queueing included) to the first token.",
                      "# TYPE runner_time_to_first_token_seconds histogram",
                      *self.ttft.lines("runner_time_to_first_token_seconds"),
                      "# HELP runner_time_per_output_token_seconds Between two tokens of one sequence.",
                      "# TYPE runner_time_per_output_token_seconds histogram",
                      *self.tpot.lines("runner_time_per_output_token_seconds")]
        return "\n".join(lines) + "\n"
