"""Each GGUF block type on runner's kernels: bits per weight and one-thread GEMV time.

    python benchmarks/gguf_types.py [--rows 2048] [--cols 2048] [--calls 200]

For every type quant.mode gguf runs, a random [rows, cols] matrix of that type's blocks (random
bytes with moderate fp16 scales) is multiplied by one row of x through torch.ops.runner.gguf_linear,
with float activations and with int8 activations, alternating the types call by call so that a
load spike hits each alike; it prints the median microseconds per call and the weight bytes read
per second. fp32 and int8 per-channel (runner's own layouts) are timed beside them for scale.
"""
from __future__ import annotations

import argparse
import statistics
import time

import gguf
import numpy as np
import torch

from runner import kernels
from runner.quant import gguf as blocks_math
from runner.quant import int8


def random_blocks(kind, rows: int, cols: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    size, type_size = gguf.GGML_QUANT_SIZES[kind]
    data = rng.integers(0, 256, size=(rows * cols // size, type_size), dtype=np.uint8)
    at = {gguf.GGMLQuantizationType.Q6_K: (208,)}.get(kind, (0, 2) if kind in (3, 7, 12, 13) else (0,))
    for offset in at:
        data[:, offset:offset + 2] = (rng.standard_normal(len(data)) * 1e-3).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return torch.from_numpy(data.reshape(rows, -1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args()
    print(f"kernels: {kernels.load()}, 1 thread, x [1, {args.cols}] fp32, weights [{args.rows}, {args.cols}]")
    torch.set_num_threads(1)
    x = torch.randn(1, args.cols)
    cases = {}
    for kind in blocks_math.SUPPORTED:
        data = random_blocks(kind, args.rows, args.cols, int(kind))
        for int8_x in (False, True):
            cases[f"{kind.name} {'int8' if int8_x else 'float'} x"] = (
                data.numel(), lambda d=data, k=int(kind), i=int8_x: torch.ops.runner.gguf_linear(x, d, k, i))
    w = torch.randn(args.rows, args.cols) * 0.02
    q, scales = int8.quantize(w)
    cases["fp32 (runner's linear)"] = (w.numel() * 4, lambda: torch.ops.runner.linear(x, w))
    cases["int8 per channel, float x"] = (q.numel() + scales.numel() * 4, lambda: torch.ops.runner.int8_linear(x, q, scales))
    times = {name: [] for name in cases}
    for _ in range(args.calls):
        for name, (_, call) in cases.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    print("| type | bits per weight | us per call (median) | weight GB/s |")
    print("|---|---|---|---|")
    for name, (nbytes, _) in cases.items():
        median = statistics.median(times[name])
        print(f"| {name} | {8 * nbytes / (args.rows * args.cols):.2f} | {median * 1e6:.0f} | {nbytes / median / 1e9:.1f} |")


if __name__ == "__main__":
    main()
