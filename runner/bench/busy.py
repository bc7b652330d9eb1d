"""`runner bench --busy N`: N processes that keep a core busy each while the recipes are timed.

They end with the bench whatever way it ends: the bench kills and reaps them when it returns,
fails or is interrupted (competing()); a bench that is itself killed takes them with it, because
each asks the kernel to kill it when its parent goes (PR_SET_PDEATHSIG, on Linux), and each also
leaves once it sees its parent gone (on any system).

This file runs as a script (python busy.py PARENT_PID), importing nothing of runner: it starts
fast and knows only its parent.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator

PR_SET_PDEATHSIG = 1  # linux/prctl.h


@contextlib.contextmanager
def competing(n: int) -> Iterator[list[subprocess.Popen]]:
    """N busy processes for the duration of the with-block (none for 0), killed and reaped after it.

    Started from the calling thread, which must outlive the block (the main thread does):
    PR_SET_PDEATHSIG fires when the thread that started a process ends, not its process."""
    processes: list[subprocess.Popen] = []
    try:
        for _ in range(n):
            processes.append(subprocess.Popen([sys.executable, "-I", __file__, str(os.getpid())],
                                              stdin=subprocess.DEVNULL))
        yield processes
    finally:
        for process in processes:
            process.kill()
        for process in processes:
            process.wait()


def spin(parent: int) -> None:
    """Keep one core busy until killed or until `parent` is gone."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a Ctrl-C at the terminal ends it quietly; the bench reaps it
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    # Checked after prctl: a parent gone before then would not send the signal.
    while os.getppid() == parent:
        for _ in range(100_000):  # a few milliseconds of pure computation between checks
            pass


if __name__ == "__main__":
    spin(int(sys.argv[1]))
