"""Where runner keeps what it makes once per machine: fetched sources, built kernels."""
from __future__ import annotations

import os
from pathlib import Path


def runner_home() -> Path:
    """RUNNER_HOME, default ~/.cache/runner."""
    return Path(os.environ.get("RUNNER_HOME", "~/.cache/runner")).expanduser()
