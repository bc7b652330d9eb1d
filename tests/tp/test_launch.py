"""Ranks on the command line: `parallel.world_size=N` spawns N local ranks, torchrun's ranks join.

Greedy text is the same at every world size and printed once (rank 0 speaks); a world size the
model cannot split is refused before anything is spawned; a rank that fails (raises, is killed, or
meets a corrupt checkpoint) ends the whole run within seconds, with its error once on stderr, a
non-zero exit and no process left behind. Every run is a subprocess in its own session, killed
whole if it overruns; its processes carry a marker in their environment, so survivors can be found.
"""
from __future__ import annotations

import functools
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from runner import parallel
from runner.cli import main
from tests.tp import tasks

pytestmark = pytest.mark.tp
REPO = Path(__file__).resolve().parents[2]
TINY = "recipes/tiny-random.yaml"
SMOLLM2 = "recipes/smollm2-135m.yaml"
GREEDY = ["generate.temperature=0", "generate.max_new_tokens=16"]
LIMIT = 120  # seconds any one run may take before it is killed (its whole session)
FAILS_WITHIN = 30  # seconds a failing run may take, from start to exit
MARKER = "RUNNER_TEST_LAUNCH_MARKER"
STATS = re.compile(r"^\d+ tokens \| [\d.]+ tokens/s \| time to first token [\d.]+ ms \| prompt \d+ tokens \| "
                   r"peak memory [\d.]+ MiB$")


@dataclass(frozen=True)
class Run:
    """A finished process: exit status, output, seconds from start to exit, and its marker."""

    returncode: int
    stdout: str
    stderr: str
    seconds: float
    marker: str


def start(args: list[str]) -> tuple[subprocess.Popen, str]:
    marker = uuid.uuid4().hex
    proc = subprocess.Popen(args, cwd=REPO, env={**os.environ, MARKER: marker}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    return proc, marker


def finish(proc: subprocess.Popen, marker: str, began: float) -> Run:
    try:
        out, err = proc.communicate(timeout=max(1.0, LIMIT - (time.monotonic() - began)))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the session we started: the run and every rank it spawned
        proc.communicate()
        pytest.fail(f"{proc.args} ran past {LIMIT} s")
    return Run(proc.returncode, out, err, time.monotonic() - began, marker)


def run(*args: str) -> Run:
    began = time.monotonic()
    return finish(*start(list(args)), began)


def runner(*args: str) -> Run:
    return run(sys.executable, "-m", "runner", *args)


def survivors(marker: str, grace: float = 5.0) -> list[int]:
    """Processes still carrying `marker` in their environment, after up to `grace` seconds."""
    needle = f"{MARKER}={marker}".encode()
    deadline = time.monotonic() + grace
    while True:
        found = []
        for environ in Path("/proc").glob("[0-9]*/environ"):
            try:
                if needle in environ.read_bytes().split(b"\0"):
                    found.append(int(environ.parent.name))
            except OSError:  # gone meanwhile, or not ours
                pass
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def text(result: Run) -> str:
    """The generated text of a successful run: its stdout without the statistics line (timings vary)."""
    assert result.returncode == 0, result.stderr
    *lines, stats = result.stdout.splitlines()
    assert STATS.match(stats), stats
    return "\n".join(lines)


# --- the same text at every world size, printed once --------------------------------------------


@pytest.mark.real
def test_smollm2_on_3_spawned_ranks_prints_what_one_process_prints():
    """SmolLM2 (9 heads, 3 kv heads) split over 3 ranks generates the same greedy text, and only
    rank 0 prints it. World size 1 runs first: on a fresh RUNNER_HOME it prepares the checkpoint."""
    args = [SMOLLM2, "dtype=float32", "generate.temperature=0", "generate.max_new_tokens=12"]
    one = runner(*args)
    three = runner(*args, "parallel.world_size=3")
    assert three.returncode == 0, three.stderr
    assert text(three) == text(one)
    assert text(one).startswith("What are three good reasons to learn to cook at home?\n")
    assert len(text(one).split("\n", 1)[1]) > 20  # some text was generated after the prompt
    assert three.stdout.count("What are three good reasons") == 1
    assert three.stdout.count(" tokens/s ") == 1
    assert "12 tokens |" in three.stdout
    assert survivors(three.marker) == []


def test_two_torchrun_nodes_print_what_spawned_ranks_and_one_process_print():
    """Two torchrun agents on this machine meet at a c10d rendezvous as 2 nodes of 1 rank each;
    the node that gets rank 0 prints the text runner prints with its own 2 ranks and with 1, and
    the other node prints nothing."""
    torchrun = Path(sys.executable).with_name("torchrun")
    assert torchrun.is_file(), f"{torchrun} is missing: torch's launcher should sit beside python"
    one = runner(TINY, *GREEDY)
    spawned = runner(TINY, *GREEDY, "parallel.world_size=2")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # --node-rank is left out: a c10d rendezvous hands out the ranks (torchrun ignores it, with a warning).
    command = [str(torchrun), "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", uuid.uuid4().hex, "-m", "runner", TINY, *GREEDY]
    began = time.monotonic()
    nodes = [start(command) for _ in range(2)]
    done = [finish(proc, marker, began) for proc, marker in nodes]
    for node in done:
        assert node.returncode == 0, node.stderr
    speaking = [node for node in done if node.stdout]
    assert len(speaking) == 1, [node.stdout for node in done]
    assert text(speaking[0]) == text(spawned) == text(one)
    assert text(one).startswith("Once upon a time")
    assert speaking[0].stdout.count("Once upon a time") == 1
    assert spawned.stdout.count("Once upon a time") == 1
    assert all(survivors(node.marker) == [] for node in done)


# --- a world size the model cannot split: refused before any rank starts -------------------------


def test_a_world_size_that_does_not_split_the_heads_exits_2_before_spawning(monkeypatch, capsys):
    """SmolLM2's 9 heads do not split over 2 ranks: one error line naming the heads and the world
    sizes that work, exit 2, no traceback, within seconds; the launcher is never called."""
    result = runner(SMOLLM2, "parallel.world_size=2")
    assert result.returncode == 2
    assert result.seconds < 15
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "parallel.world_size" in lines[0]
    assert "n_heads=9" in lines[0] and "world sizes that work: 1, 3" in lines[0]
    assert "(got 2)" in lines[0]
    assert "Traceback" not in result.stderr

    def launch(*args):
        raise AssertionError("parallel.launch was called")

    monkeypatch.setattr(parallel, "launch", launch)
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exit_:
        main([SMOLLM2, "parallel.world_size=2"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == result.stderr


# --- a rank that fails: the whole run ends at once, its error once, nothing left behind ----------


@functools.cache
def failed(how: str) -> Run:
    """tests/tp/tasks.py's launch of the tiny recipe on 2 ranks, rank 1 failing `how`; once per way."""
    return run(sys.executable, "-c", "from tests.tp.tasks import main; main()", how)


def assert_failed_at_once(result: Run, message: str) -> None:
    assert result.returncode == 1, result.stderr
    assert result.seconds < FAILS_WITHIN, result.seconds
    assert result.stderr.count(message) == 1, result.stderr
    assert result.stderr.splitlines()[-1].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    assert survivors(result.marker) == []


def test_a_gguf_split_through_a_block_exits_2_naming_the_world_size(tmp_path):
    """quant.mode gguf: attention outputs stored as Q4_K (rows of 256 values) over 2 heads of 128
    split into halves of 128, inside a block; every rank stops with one error line, exit 2."""
    from runner.config.schema import ModelSpec
    from tests.quant.test_gguf_model import K_TYPES, write_mixed

    spec = ModelSpec(dim=256, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=512, intermediate_size=512,
                     max_seq_len=64, tie_embeddings=False)
    path = tmp_path / "k.gguf"
    write_mixed(path, spec, 0, {**K_TYPES, "attn_output": K_TYPES["output"]})
    arch = [f"model.arch.{key}={getattr(spec, key)}" for key in ("dim", "n_layers", "n_heads", "n_kv_heads",
                                                                 "vocab_size", "intermediate_size")]
    result = runner(TINY, f"model.checkpoint={path}", "quant.mode=gguf", *arch, *GREEDY, "parallel.world_size=2")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors and "parallel.world_size" in errors[0] and "whole blocks of 256" in errors[0]
    assert survivors(result.marker) == []


def test_a_rank_that_raises_mid_generation_ends_the_run_with_its_error():
    """Rank 1 raises at its 4th forward (rank 0 waits in an all-reduce): exit 1, its error once,
    no process left."""
    result = failed("raise")
    assert_failed_at_once(result, "boom")
    assert result.stderr.splitlines()[-1] == "error: RuntimeError: boom"
    assert result.stdout.startswith("Once upon a time")  # rank 0 had streamed the first tokens


def test_a_rank_killed_mid_generation_ends_the_run():
    """Rank 1 SIGKILLs itself at its 4th forward: exit 1, one error line, no process left."""
    result = failed("kill")
    assert_failed_at_once(result, "error: ")


def test_a_rank_killed_mid_generation_is_reported_as_the_cause():
    """The error names the cause, the killed rank, not its peers' broken connections (the
    launcher does not always know the signal: it may see the peer's exit first)."""
    result = failed("kill")
    assert result.stderr.splitlines() == [result.stderr.splitlines()[-1]]
    assert result.stderr.splitlines()[-1].startswith("error: rank 1 was killed"), result.stderr


def test_the_launcher_ends_a_peer_busy_outside_any_collective():
    """Rank 1 raises at once while rank 0 computes alone for 20 s: the launcher ends rank 0 rather
    than waiting for it, so the run fails within seconds."""
    result = failed("raise-at-once")
    assert_failed_at_once(result, "boom")
    assert result.seconds < tasks.BUSY_SECONDS
    assert result.stdout == ""


def test_a_failed_run_prints_only_its_error_line():
    """stderr holds the failing rank's one line and nothing else: no launcher chatter."""
    result = failed("raise-at-once")
    assert result.stderr.splitlines() == ["error: RuntimeError: boom"], result.stderr


def test_a_corrupt_checkpoint_met_by_the_ranks_exits_2_with_one_error_line(tmp_path):
    """A checkpoint that exists but is garbage passes the checks before spawning and fails in every
    rank's load: the parent prints the recipe error once, exits 2, no traceback, nothing left."""
    corrupt = tmp_path / "model.pth"
    corrupt.write_bytes(b"not a checkpoint\0" * 256)
    result = runner(TINY, "parallel.world_size=2", f"model.checkpoint={corrupt}", "model.source=null")
    assert result.returncode == 2, result.stderr
    assert result.seconds < FAILS_WITHIN
    assert result.stdout == ""
    assert result.stderr.count(str(corrupt)) == 1, result.stderr
    line = result.stderr.splitlines()[-1]
    assert line.startswith(f"error: {corrupt}: model.checkpoint: unreadable checkpoint"), result.stderr
    assert "Traceback" not in result.stderr
    assert survivors(result.marker) == []
