"""Batched decoding: aggregate and per-row decode tok/s at several batch sizes, in one run.

    python benchmarks/batched.py [RECIPE] [--batches 1,2,4,8,16] [--steps 64] [--runs 3] [--json OUT] [key=value ...]

Each batch size fills every slot of a BatchDecoder with the same prompt (greedy), then times
`--steps` decode steps of all rows together (the median of `--runs`); prefill is not counted.
Decoding is memory-bound: each weight is read once per step whatever the number of rows, so the
aggregate rate grows with the batch until the rows' own work (attention, sampling, the per-row
part of each kernel) catches up with the weights' reading.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from runner import pipeline  # noqa: E402
from runner.decoders.batched import BatchDecoder  # noqa: E402
from runner.decoders.sampling import Sampling  # noqa: E402
from runner.recipes import load as resolve  # noqa: E402


def measure(built, prompt: list[int], batch: int, steps: int, runs: int) -> float:
    """Median seconds per step of `batch` rows."""
    decoder = BatchDecoder(built.model, batch, len(prompt) + steps + 2, built.forward)
    times = []
    for _ in range(runs + 1):  # the first run warms up
        for slot in decoder.busy():
            decoder.finish(slot)
        for _ in range(batch):
            decoder.start(prompt, Sampling())
        start = time.perf_counter()
        for _ in range(steps):
            decoder.step()
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", nargs="?", default=str(ROOT / "recipes" / "smollm2-135m.yaml"))
    parser.add_argument("overrides", nargs="*", default=[])
    parser.add_argument("--batches", default="1,2,4,8,16")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--prompt", default="The history of the printing press begins")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    recipe = resolve(args.recipe, ["dtype=bfloat16", *args.overrides], check_files=True)
    built = pipeline.build(recipe, args.recipe)
    prompt = built.tokenizer.encode(args.prompt, bos=True)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        step = measure(built, prompt, batch, args.steps, args.runs)
        rows.append({"batch": batch, "step_ms": step * 1e3, "aggregate_tok_s": batch / step, "per_row_tok_s": 1 / step})
    base = rows[0]["aggregate_tok_s"]
    print(f"{Path(args.recipe).stem} {recipe.dtype.value}, kernels {recipe.kernels.value}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print("| batch | step ms | aggregate tok/s | per-row tok/s | aggregate vs batch 1 |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['step_ms']:.1f} | {r['aggregate_tok_s']:.1f} | {r['per_row_tok_s']:.1f} | "
              f"{r['aggregate_tok_s'] / base:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({"recipe": args.recipe, "overrides": args.overrides, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
