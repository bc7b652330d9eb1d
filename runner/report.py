"""Everything runner prints during generation: the streamed text and the statistics line."""
from __future__ import annotations

import sys

from runner.decoders.stats import Stats


QUIET = False  # `runner --quiet`: no progress bars


class Reporter:
    """Writes to stdout (the text) and stderr-free summary lines; only rank 0 reports."""

    def __init__(self, out=None, rank: int = 0):
        self.out = out or sys.stdout
        self.enabled = rank == 0

    def write(self, text: str) -> None:
        if self.enabled and text:
            self.out.write(text)
            self.out.flush()

    def line(self, text: str = "") -> None:
        self.write(text + "\n")

    def note(self, text: str) -> None:
        """A status line on stderr, keeping stdout for the generated text."""
        if self.enabled:
            print(text, file=sys.stderr, flush=True)

    def progress(self, label: str, unit: str = ""):
        """A callback(done, total) drawing a progress bar on stderr: only on a terminal (piped
        logs stay clean), never with --quiet. unit "B" shows sizes in MB."""
        err = sys.stderr
        if QUIET or not self.enabled or not err.isatty():
            return lambda done, total: None
        shown = [-1]

        def amount(n: int) -> str:
            return f"{n / 1e6:.1f} MB" if unit == "B" else str(n)

        def update(done: int, total: int | None) -> None:
            if total is None:  # a size not known in advance: what has arrived so far
                err.write(f"\r{label} {amount(done)}")
                err.flush()
                return
            percent = 100 * done // max(total, 1)
            if percent == shown[0] and done < total:
                return
            shown[0] = percent
            err.write(f"\r{label} [{'#' * (percent // 4):<25}] {amount(done)}/{amount(total)}")
            if done >= total:
                err.write("\n")
            err.flush()

        return update

    def stats(self, stats: Stats, label: str = "") -> None:
        spec = stats.speculative
        if spec is not None:
            per_forward = stats.new_tokens / spec.target_forwards if spec.target_forwards else float("nan")
            histogram = " ".join(f"{n}:{count}" for n, count in enumerate(spec.histogram()))
            self.line(
                f"speculative (k={spec.speculate_k}): acceptance rate {spec.acceptance_rate:.1%} | "
                f"{per_forward:.2f} tokens per target forward | accepted drafts per round {histogram}"
            )
        self.line(
            f"{label}{stats.new_tokens} tokens | {stats.tokens_per_second:.2f} tokens/s | "
            f"time to first token {stats.time_to_first_token * 1000:.1f} ms | "
            f"prompt {stats.prompt_tokens} tokens | peak memory {stats.peak_memory_bytes / 2**20:.1f} MiB"
        )
