"""What both benchmarks share: the machine description, timing medians, tables, output files."""
from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path

import torch

from runner.bench.machine import cpu_name
from runner.recipes import load as resolve

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "smollm2-135m.yaml"


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many tokens two outputs share from the start."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def cpu_flags() -> list[str]:
    """The matmul-relevant ISA extensions (they decide which torch kernels are fast)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                return sorted(f for f in flags if f.startswith(("avx512_bf16", "amx", "avx512f", "avx2", "avx512_vnni")))
    except OSError:
        pass
    return []


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def machine() -> dict:
    return {
        "cpu": cpu_name(),
        "cpu_flags": cpu_flags(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "load_average_start": load_average(),
    }


def machine_lines(info: dict) -> list[str]:
    return [
        f"- CPU: {info['cpu']} ({info['cores']} cores visible; {', '.join(info['cpu_flags']) or 'no AVX flags read'})",
        f"- torch {info['torch']}, Python {info['python']}, torch threads: {info['torch_threads']}",
        f"- load average (1/5/15 min) at start: {info['load_average_start']}, at end: {info.get('load_average_end', 'n/a')}",
    ]


def recipe(overrides: list[str], path: Path = RECIPE):
    """The resolved recipe (the file name is what errors and relative paths are resolved against)."""
    return resolve(str(path), overrides)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def fmt(x: float | None, spec: str = ".2f") -> str:
    if x is None or x != x:  # None or nan
        return "n/a"
    return format(x, spec)


def write_outputs(markdown: list[str], data: dict, json_path: str | None, md_path: str | None) -> None:
    text = "\n".join(markdown) + "\n"
    print(text)
    if md_path:
        Path(md_path).parent.mkdir(parents=True, exist_ok=True)
        Path(md_path).write_text(text)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(_finite(data), indent=2) + "\n")


def _finite(data):
    """NaN and infinities as null, so the JSON is strict."""
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(v) for v in data]
    if isinstance(data, float) and (data != data or data in (float("inf"), float("-inf"))):
        return None
    return data


def note(text: str) -> None:
    """Progress on stderr, so stdout holds the report only."""
    print(text, file=sys.stderr, flush=True)
