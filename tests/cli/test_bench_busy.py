"""`runner bench --busy N` and `--threads`: the competing processes run while the recipes are timed
and are always gone after, whatever way the bench ends (checked in the process table, /proc)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from runner.cli import cli

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process table in /proc")

BENCH = ["bench", "recipes/tiny-random.yaml", "--runs", "1", "--tokens", "4"]


def busy_children(parent: int) -> list[int]:
    """The pids of `parent`'s busy processes (runner/bench/busy.py) that are still running."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:  # gone meanwhile
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and b"busy.py" in cmdline:
            found.append(int(entry.name))
    return found


def gone(pid: int) -> bool:
    """No entry in the process table: ended and reaped (a zombie still has one)."""
    return not Path(f"/proc/{pid}").exists()


@pytest.fixture
def seen(monkeypatch) -> list[list[int]]:
    """The busy processes running as each recipe is timed (the real measurement runs after)."""
    from runner.bench import measure

    real, seen = measure.measure, []

    def spy(*args, **kwargs):
        seen.append(busy_children(os.getpid()))
        return real(*args, **kwargs)

    monkeypatch.setattr(measure, "measure", spy)
    return seen


def test_busy_processes_run_while_timing_and_are_reaped_after(tmp_path, seen):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(cli, [*BENCH, "--busy", "2", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert len(seen) == 2 and all(len(pids) == 2 for pids in seen)  # auto and threads=1, each under 2 processes
    assert all(gone(pid) for pids in seen for pid in pids)
    assert "busy: 2 competing processes" in result.output
    assert "| tiny-random threads=auto |" in result.output and "| tiny-random threads=1 |" in result.output
    assert "tiny-random threads=auto: decode at its own threads" in result.output
    assert "x of threads=1's" in result.output
    data = json.loads(out.read_text())
    assert data["busy"] == 2 and [row["threads"] for row in data["results"]] == [None, 1]
    (ratio,) = data["own_threads_over_threads_1"]
    assert ratio["ratio"] == ratio["own"] / ratio["threads_1"]
    assert ratio["own"] == data["results"][0]["decode_tokens_per_s_median"]


@pytest.mark.parametrize("error", [RuntimeError("injected"), KeyboardInterrupt()])
def test_busy_processes_are_reaped_when_the_bench_fails(monkeypatch, error):
    from runner.bench import measure

    seen = []

    def failing(*args, **kwargs):
        seen.append(busy_children(os.getpid()))
        raise error

    monkeypatch.setattr(measure, "measure", failing)
    result = CliRunner().invoke(cli, [*BENCH, "--busy", "2"])
    assert result.exit_code != 0
    assert len(seen) == 1 and len(seen[0]) == 2
    assert all(gone(pid) for pid in seen[0])


def test_a_bad_recipe_key_fails_before_any_busy_process_starts(seen):
    result = CliRunner().invoke(cli, [*BENCH, "no_such_key=1", "--busy", "2"])
    assert result.exit_code != 0 and not seen
    assert busy_children(os.getpid()) == []


def start_bench(tmp_path: Path, busy: int) -> tuple[subprocess.Popen, list[int]]:
    """A bench in a process of its own, once its busy processes all run: (it, their pids)."""
    env = dict(os.environ, RUNNER_HOME=str(tmp_path))
    bench = subprocess.Popen([sys.executable, "-m", "runner", "--quiet", *BENCH, "--runs", "1000", "--busy", str(busy)],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while len(pids := busy_children(bench.pid)) < busy:
        assert bench.poll() is None and time.monotonic() < deadline, bench.stderr.read().decode()
        time.sleep(0.05)
    time.sleep(0.5)  # their interpreters start, and ask for PR_SET_PDEATHSIG
    return bench, pids


def test_ctrl_c_of_the_bench_reaps_its_busy_processes(tmp_path):
    bench, pids = start_bench(tmp_path, 2)
    bench.send_signal(signal.SIGINT)
    assert bench.wait(timeout=60) == 130
    assert all(gone(pid) for pid in pids)


# Run in a process of its own that adopts orphans (PR_SET_CHILD_SUBREAPER): the bench's busy
# processes become its children when the bench is killed, so it can see how they end and reap them.
KILLED = textwrap.dedent("""
    import ctypes, json, os, signal, sys, time
    sys.path.insert(0, sys.argv[1])
    from test_bench_busy import start_bench
    from pathlib import Path

    ctypes.CDLL(None).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER
    bench, pids = start_bench(Path(sys.argv[2]), 2)
    bench.kill()
    bench.wait()
    killed_at, ended = time.monotonic(), {}
    while len(ended) < len(pids) and time.monotonic() < killed_at + 5:
        for pid in set(pids) - set(ended):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                ended[pid] = [os.WTERMSIG(status) if os.WIFSIGNALED(status) else None, time.monotonic() - killed_at]
        time.sleep(0.01)
    for pid in set(pids) - set(ended):  # still running: end them, and fail
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    print(json.dumps({"pids": pids, "ended": ended}))
""")


def test_busy_processes_die_with_a_killed_bench(tmp_path):
    run = subprocess.run([sys.executable, "-c", KILLED, str(Path(__file__).parent), str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert len(report["pids"]) == 2 and len(report["ended"]) == 2, report
    for signal_number, seconds in report["ended"].values():
        assert signal_number == signal.SIGKILL and seconds < 1  # PR_SET_PDEATHSIG, at once


@pytest.mark.parametrize("value", ["0", "x", "1,1", "auto,auto", ""])
def test_threads_takes_counts_or_auto(value):
    result = CliRunner().invoke(cli, [*BENCH, "--threads", value])
    assert result.exit_code == 2 and "--threads takes" in result.output


def test_threads_times_each_count_with_its_label(tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(cli, [*BENCH, "--threads", "1,auto", "--json", str(out)])
    assert result.exit_code == 0, result.output
    labels = [row["label"] for row in json.loads(out.read_text())["results"]]
    assert labels == ["tiny-random threads=1", "tiny-random threads=auto"]
    assert "busy:" not in result.output and "x of threads=1's" in result.output  # the ratio needs no load
