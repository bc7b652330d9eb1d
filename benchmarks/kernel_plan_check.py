"""Decode steps of the tiny random model on runner's kernels, timed: the check that keeping the
fused decode step's gathered operands (runner.kernels.KernelOps) costs nothing per step.

    RUNNER_HOME=... python benchmarks/kernel_plan_check.py [--steps 200] [--repeats 5] [--threads 1]

Greedy one-token steps of specs/tiny-llama.yaml with random weights, float32, batch 1; prints
the median over the repeats of the microseconds per step, and the best. One thread by default:
on a shared machine a parallel region waits for its slowest thread, which buries the difference.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import yaml

from runner.checkpoint import random_state_dict
from runner.config.schema import Kernels, ModelSpec
from runner.model.llama import Transformer
from runner.transforms.runner_ops import use_runner_ops

SPEC = Path(__file__).resolve().parents[1] / "specs" / "tiny-llama.yaml"


def build() -> Transformer:
    spec = ModelSpec(**yaml.safe_load(SPEC.read_text()))
    model = Transformer(spec)
    model.load_state_dict(random_state_dict(spec, 0))
    use_runner_ops(model.eval(), Kernels.runner, torch.device("cpu"), str(SPEC))
    return model


@torch.no_grad()
def seconds_per_step(model: Transformer, steps: int) -> float:
    model.setup_cache(1, steps + 1)
    token = torch.tensor([[1]])
    model(token, torch.tensor([0]))  # the first step gathers the operands
    start = time.perf_counter()
    for i in range(1, steps + 1):
        token = model(token, torch.tensor([i]))[:, -1:].argmax(-1)  # [1, 1]
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build()
    times = [seconds_per_step(model, args.steps) for _ in range(args.repeats)]
    print(f"tiny-llama, {args.steps} decode steps on runner's kernels, {torch.get_num_threads()} threads: "
          f"median {statistics.median(times) * 1e6:.1f} us/step, best {min(times) * 1e6:.1f} us/step")


if __name__ == "__main__":
    main()
