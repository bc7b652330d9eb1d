"""Ranks for tensor parallelism: spawned by runner itself, or joined under torchrun.

`runner RECIPE parallel.world_size=N` starts N local ranks through torch.distributed's elastic
launcher (a c10d rendezvous on 127.0.0.1 at a free port, no restarts) and waits for them. Under
torchrun (RANK and WORLD_SIZE set) runner is already one rank of a group, possibly spanning
machines, and joins it. Each rank runs the same task; only rank 0 speaks.

If any rank fails, the launcher ends the others; the parent prints the failing rank's error once,
in the usual one-line form, and exits non-zero (2 for a recipe error, 1 otherwise).

The group's backend is gloo on CPU, NCCL on CUDA. Where every rank of a gloo group runs on this
machine, the all-reduces go through shared memory instead (runner.sharders.shm): a file in /dev/shm
that the ranks map and rank 0 removes at once, named after the launcher's run id so that the
launcher can remove one left by a rank that died before that.
"""
from __future__ import annotations

import datetime
import os
import signal
import socket
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from runner.config.errors import ConfigError, RankFailed, problem
from runner.config.schema import ParallelSection, Recipe

# How long a rank waits on a collective before it gives up (a peer that hangs, not one that dies:
# a dead peer's sockets close at once).
TIMEOUT = datetime.timedelta(seconds=60)
ERRORS_ENV = "RUNNER_RANK_ERRORS"  # where spawned ranks leave their one-line errors for the parent
RUN_ENV = "RUNNER_RUN_ID"  # the launcher's run id, which names the shared memory its ranks make
SHM = Path("/dev/shm")


@dataclass(frozen=True)
class Rank:
    """This process's place among the tensor-parallel ranks, handed to each stage that needs it."""
    rank: int
    world_size: int
    local_world_size: int
    run_id: str = ""  # the launcher's, when runner launched the ranks

    @property
    def main(self) -> bool:
        return self.rank == 0


def shm_prefix(run_id: str) -> str:
    """The start of the name of every shared-memory file that run `run_id`'s ranks make."""
    return f"runner-{run_id}-" if run_id else "runner-"


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def world_size(section: ParallelSection) -> int:
    """The world size a command runs with: torchrun's, or else the recipe's."""
    return int(os.environ["WORLD_SIZE"]) if under_torchrun() else section.world_size


def check(section: ParallelSection, device: str, source: str) -> None:
    """Recipe errors that need torch: caught before any rank starts."""
    if under_torchrun() and section.world_size not in (1, int(os.environ["WORLD_SIZE"])):
        raise ConfigError([problem(source, "parallel.world_size", f"torchrun started {os.environ['WORLD_SIZE']} ranks; "
                                   "leave world_size at 1 under torchrun, or make them agree", section.world_size)])
    n = world_size(section)
    if device.startswith("cuda") and n > 1:
        visible = torch.cuda.device_count()
        local = int(os.environ.get("LOCAL_WORLD_SIZE", n))
        if local > visible:
            raise ConfigError([problem(source, "parallel.world_size", f"needs {local} CUDA devices on this machine, "
                                       f"{visible} visible", n)])


def backend(section: ParallelSection, device: str) -> str:
    return section.backend or ("nccl" if device.startswith("cuda") else "gloo")


def join(section: ParallelSection, device: str, threads: int | None) -> Rank:
    """Join the process group the environment describes (torchrun's, or the launcher's); joining
    again returns the same rank."""
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", size))
    run_id = os.environ.get(RUN_ENV, "")
    if torch.distributed.is_initialized():
        return Rank(rank, size, local_size, run_id)
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    # The machine's cores shared among its ranks (torchrun would leave each rank one thread).
    torch.set_num_threads(max(1, (threads or os.cpu_count() or 1) // local_size))
    torch.distributed.init_process_group(backend(section, device), timeout=TIMEOUT)
    return Rank(rank, size, local_size, run_id)


def leave() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# A command's work on one rank: task(rank, recipe, recipe_path, *args), rank None outside tensor parallelism.
Task = Callable[..., object]


def run(task: Task, recipe: Recipe, recipe_path: str, *args) -> dict[int, object]:
    """task(rank, recipe, recipe_path, *args) here (rank None), or on the recipe's world size of
    ranks: spawned here, or this one under torchrun. Returns each rank's result by rank."""
    check(recipe.parallel, recipe.device, recipe_path)
    if world_size(recipe.parallel) == 1:
        return {0: task(None, recipe, recipe_path, *args)}
    if under_torchrun():
        return {0: as_rank(task, recipe, recipe_path, *args)}
    return launch(as_rank, (task, recipe, recipe_path, *args), recipe.parallel.world_size)


def as_rank(task: Task, recipe: Recipe, recipe_path: str, *args):
    """Join the group, run the task as this rank, leave."""
    rank = join(recipe.parallel, recipe.device, recipe.threads)
    # No teardown on failure: the group stays up until this rank has said why it failed (its
    # peers, seeing it gone, would otherwise report the lost connection first) and exits.
    result = task(rank, recipe, recipe_path, *args)
    leave()
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(task: Callable, args: tuple, size: int) -> dict[int, object]:
    """Run task(*args) on `size` local ranks; returns each rank's result. The task joins the group.
    Whatever happens, no shared memory of theirs is left behind."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    import logging

    # The failure report is ours to give, once: the launcher's and the ranks' own logs stay quiet.
    for name in ("torch.distributed.elastic", "torch.multiprocessing.spawn"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="runner-ranks-") as errors:
        run_id = uuid.uuid4().hex
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=size, run_id=run_id,
                              rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{_free_port()}",
                              max_restarts=0, monitor_interval=0.1, start_method="spawn")
        saved = {key: os.environ.get(key) for key in (ERRORS_ENV, RUN_ENV, "TORCH_CPP_LOG_LEVEL")}
        # The ranks inherit these: where to leave their errors, the run id that names their shared
        # memory, and C++ logs (gloo's) held to fatal ones.
        os.environ.update({ERRORS_ENV: errors, RUN_ENV: run_id, "TORCH_CPP_LOG_LEVEL": "FATAL"})
        try:
            return elastic_launch(config, _rank_main)(task, args)
        except ChildFailedError as e:
            raise RankFailed(*_failure(e, Path(errors), size)) from None
        except SignalException:  # Ctrl-C or a kill while the ranks ran (the launcher has stopped them)
            raise KeyboardInterrupt from None
        finally:
            # Rank 0 removes the shared memory once every rank has mapped it; one that died before
            # then leaves the file.
            for leftover in SHM.glob(shm_prefix(run_id) + "*"):
                leftover.unlink(missing_ok=True)
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


# A rank's error that only says a peer went away: the consequence of the failure, not its cause.
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
             "ended while this rank waited for it")  # the last: runner.kernels' shared-memory all-reduce


def _failure(error, errors: Path, size: int) -> tuple[str, int]:
    """The failing rank's own error line, or how it died: an error of its own first, then a
    death by signal (a killed rank writes nothing; its peers only see it gone), then the rest."""
    written = []
    for path in sorted(errors.glob("rank-*.txt"), key=lambda p: p.stat().st_mtime):
        code, _, message = path.read_text().partition("\n")
        written.append((message, int(code)))
    own = [w for w in written if not any(gone in w[0] for gone in PEER_GONE)]
    if own:
        return own[0]
    # A rank that wrote nothing and was not stopped by the launcher died on its own: killed.
    heard = {int(p.stem.split("-")[1]) for p in errors.glob("rank-*.*")}
    silent = sorted(set(range(size)) - heard)
    if silent:
        failure = error.failures.get(silent[0])
        how = (f"was killed by signal {failure.signal_name()}" if failure is not None and failure.exitcode < 0
               else "was killed (it ended without an error of its own)")
        return f"error: rank {silent[0]} {how}", 1
    if written:
        return written[0]
    rank, failure = min(error.failures.items(), key=lambda item: item[1].timestamp)
    return f"error: rank {rank} exited with status {failure.exitcode}", 1


def _rank_main(task: Callable, args: tuple):
    """A spawned rank: run the task; on failure leave a one-line error for the parent and exit non-zero."""
    errors = os.environ.get(ERRORS_ENV)
    if errors:
        signal.signal(signal.SIGTERM, lambda *_: _stopped(Path(errors)))
    try:
        return task(*args)
    except BaseException as e:  # noqa: BLE001: every failure becomes the parent's one line
        if isinstance(e, ConfigError):
            code, lines = 2, [f"error: {p}" for p in e.problems]
        elif isinstance(e, KeyboardInterrupt):
            code, lines = 130, ["interrupted"]
        else:
            code, lines = 1, [f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"]
        if errors:
            rank = os.environ.get("RANK", "0")
            tmp = Path(errors, f".rank-{rank}.partial")
            tmp.write_text(f"{code}\n" + "\n".join(lines))
            tmp.replace(Path(errors, f"rank-{rank}.txt"))
        else:
            print("\n".join(lines), file=sys.stderr)
        os._exit(code)  # no teardown: a peer blocked on us must see the sockets close now


def _stopped(errors: Path) -> None:
    """SIGTERM: the launcher stops this rank because another failed; say so, so it is not taken for the cause."""
    Path(errors, f"rank-{os.environ.get('RANK', '0')}.stopped").touch()
    os._exit(143)
