"""The machine's side of the figures: its CPU's name, read bandwidth and GEMM rate (the rooflines)."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch


def cpu_name() -> str:
    """The CPU's model name, for the figures' caption."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """The machine's read bandwidth in GB/s: torch sums a `gib` GiB tensor (median of repeats)."""
    x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    x.sum()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - start)
    return x.numel() * 4 / statistics.median(times) / 1e9


def gemm_rate(dtype: torch.dtype, size: int = 1024, repeats: int = 5) -> float:
    """torch's matmul rate in GFLOP/s for `dtype` on square `size` matrices (median of repeats)."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9
