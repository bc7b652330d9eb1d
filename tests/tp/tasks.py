"""Tasks for ranks spawned by runner.parallel.launch in tests/tp/test_launch.py: a rank that fails
mid-generation. The spawn start method imports them by name, so they live at module level.

`python -c "from tests.tp.tasks import main; main()" HOW` launches the tiny random recipe
on 2 ranks with rank 1 failing that way, and ends as runner's command line would: the one-line
error on stderr and its exit status.
"""
from __future__ import annotations

import os
import signal
import sys
import time

from runner import generate, parallel, pipeline

RECIPE = "recipes/tiny-random.yaml"
FAILING_RANK = 1
FAILING_CALL = 4  # the prompt's forward, then 2 decode steps, then this one fails
BUSY_SECONDS = 20  # "raise-at-once": how long rank 0 computes alone (no collective) before generating


class _Failing:
    """The decoder's forward, failing `how` on its FAILING_CALL-th call."""

    def __init__(self, forward, how: str):
        self.forward, self.how, self.calls = forward, how, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == FAILING_CALL:
            if self.how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("boom")
        return self.forward(*args, **kwargs)


def generate_failing(rank: parallel.Rank, resolved, recipe: str, how: str) -> None:
    """runner's own rank task (runner.generate.run), with rank FAILING_RANK's decoder failing `how`
    ("raise", "kill") mid-generation; or ("raise-at-once") that rank raising at once while rank 0
    is busy outside any collective, so that only the launcher can end it."""
    if how == "raise-at-once":
        if rank.rank == FAILING_RANK:
            raise RuntimeError("boom")
        time.sleep(BUSY_SECONDS)
    build = pipeline.build

    def build_failing(*args, **kwargs):
        built = build(*args, **kwargs)
        if rank.rank == FAILING_RANK:
            built.decoder.forward = _Failing(built.decoder.forward, how)
        return built

    pipeline.build = build_failing  # this rank's process only: it ends with the task
    generate.run(rank, resolved, recipe)


def main() -> None:
    from runner.config.errors import RankFailed
    from runner.recipes import load as resolve

    how = sys.argv[1]
    resolved = resolve(RECIPE, ["parallel.world_size=2", "generate.temperature=0", "generate.max_new_tokens=16"],
                       check_files=True)
    try:
        parallel.launch(parallel.as_rank, (generate_failing, resolved, RECIPE, how), 2)
    except RankFailed as e:
        print(e.message, file=sys.stderr)
        sys.exit(e.exit_code)
