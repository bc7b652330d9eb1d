"""What a long cache costs a decode step, with the KV cache in the model's dtype and in int8.

    python benchmarks/kv_cache.py [RECIPE] [key=value ...] [--near 8] [--far 640] [--rounds 40]
        [--json OUT.json]

The recipe's model (default recipes/smollm2-135m-fast.yaml) is built once, in this process, with
two caches (quant.kv_cache float and int8), each filled by a prompt of `far` random tokens. Then,
round after round in alternation, one token's forward at position `near` and at position `far`
on each cache, three times each (the first of them discarded). On this kind of shared machine a
step's time drifts by a quarter within minutes, so the figures are each case's minimum over the
rounds, and the ratio near / far is the share of the short-context speed a long context keeps.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from runner import pipeline  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", default=str(common.ROOT / "recipes" / "smollm2-135m-fast.yaml"))
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--near", type=int, default=8)
    parser.add_argument("--far", type=int, default=640)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--json")
    args = parser.parse_args()
    recipe = common.recipe(["generate.temperature=0", "draft.kind=none", *args.overrides], Path(args.recipe))
    built = pipeline.build(recipe, args.recipe, common.note)
    model = built.model
    caches = {}
    with torch.inference_mode():
        for int8 in (False, True):
            model.int8_cache = int8
            model.setup_cache(1, args.far + 1)
            caches[int8] = [layer.attention.kv_cache for layer in model.layers]
            model(torch.randint(0, recipe.model.arch.vocab_size, (1, args.far), generator=torch.Generator().manual_seed(0)),
                  torch.arange(args.far), last_only=True)
        times: dict[tuple[bool, int], list[float]] = {}
        token = torch.tensor([[42]])
        for _ in range(args.rounds):
            for int8 in (False, True):
                for layer, cache in zip(model.layers, caches[int8]):
                    layer.attention.kv_cache = cache
                for at in (args.near, args.far):
                    pos = torch.tensor([at])
                    for rep in range(3):
                        start = time.perf_counter()
                        model(token, pos)
                        if rep:
                            times.setdefault((int8, at), []).append(time.perf_counter() - start)
    rows = []
    for int8 in (False, True):
        near, far = min(times[(int8, args.near)]), min(times[(int8, args.far)])
        rows.append({"kv_cache": "int8" if int8 else "float", "near_ms": near * 1e3, "far_ms": far * 1e3,
                     "extra_ms": (far - near) * 1e3, "near_over_far": near / far})
    markdown = [f"{Path(args.recipe).name} {' '.join(args.overrides)}: a decode step at position {args.near} and at "
                f"{args.far}, min of {args.rounds} rounds in alternation", "",
                *common.table(["kv_cache", f"ms at {args.near}", f"ms at {args.far}", "extra ms",
                               f"tok/s at {args.far} / at {args.near}"],
                              [[r["kv_cache"], f"{r['near_ms']:.3f}", f"{r['far_ms']:.3f}", f"{r['extra_ms']:.3f}",
                                f"{r['near_over_far']:.3f}"] for r in rows])]
    common.write_outputs(markdown, {"machine": common.machine(), "recipe": args.recipe, "overrides": args.overrides,
                                    "near": args.near, "far": args.far, "rounds": args.rounds, "rows": rows},
                         args.json, None)

if __name__ == "__main__":
    main()
