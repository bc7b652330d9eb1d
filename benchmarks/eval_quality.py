"""Quality of every quantization mode in one table, through `runner eval` (lm-eval's metrics).

    python benchmarks/eval_quality.py [--recipe R] [--modes none,int8,int4:32,int4:64,int4-gptq:32]
        [--tasks pydoc_perplexity,basic_knowledge_mc,basic_facts_qa] [--limit N] [--json OUT] [override ...]

Each mode is the recipe with quant.mode/quant.groupsize overrides, built and scored in this
process exactly as `runner eval RECIPE quant.mode=... --tasks ...` would (runner.eval.command).
GPTQ calibrates on CPython's pydoc topics taken from the last one backwards, disjoint from
pydoc_perplexity's first eleven. The kernels column names the kernels the quantized layers ran.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runner.eval import command  # noqa: E402
from runner.recipes import load as resolve  # noqa: E402

COLUMNS = [("pydoc_perplexity", "word_perplexity"), ("pydoc_perplexity", "bits_per_byte"),
           ("basic_knowledge_mc", "acc"), ("basic_knowledge_mc", "acc_norm"), ("basic_facts_qa", "exact_match")]


def calibration_text(first_eval_topics: int = 11, chars: int = 200_000) -> str:
    from pydoc_data.topics import topics

    keys = sorted(topics)[first_eval_topics:][::-1]
    out, total = [], 0
    for key in keys:
        if total >= chars:
            break
        out.append(topics[key])
        total += len(topics[key])
    return "\n\n".join(out)


def mode_overrides(item: str, calibration: Path) -> tuple[str, list[str]]:
    name, _, group = item.partition(":")
    label = name + (f" g{group}" if group else "")
    out = [f"quant.mode={name}"] + ([f"quant.groupsize={group}"] if group else [])
    if name == "int4-gptq":
        out += [f"quant.calibration.path={calibration}", "quant.calibration.samples=32", "quant.calibration.seq_len=256"]
    return label, out


def value(results: dict, task: str, metric: str) -> float | None:
    for key, v in results["results"].get(task, {}).items():
        if key.split(",")[0] == metric and isinstance(v, (int, float)):
            return v
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "smollm2-135m.yaml"))
    ap.add_argument("--modes", default="none,int8,int4:32,int4:64,int4-gptq:32,int4-gptq:64")
    ap.add_argument("--tasks", default="pydoc_perplexity,basic_knowledge_mc,basic_facts_qa")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--json")
    ap.add_argument("overrides", nargs="*", help="recipe overrides for every mode, e.g. dtype=bfloat16")
    args = ap.parse_args()
    names = command.check(args.tasks, args.limit, ())
    rows, data = [], []
    with tempfile.TemporaryDirectory() as tmp:
        calibration = Path(tmp) / "calibration.txt"
        calibration.write_text(calibration_text(), encoding="utf-8")
        for item in args.modes.split(","):
            label, more = mode_overrides(item, calibration)
            recipe = resolve(args.recipe, ["generate.temperature=0", *more, *args.overrides], check_files=True)
            print(f"{label}: evaluating", file=sys.stderr, flush=True)
            start = time.perf_counter()
            results = command.evaluate(None, recipe, args.recipe, names, (), args.limit, args.batch_size)
            seconds = time.perf_counter() - start
            kernels = results.pop("kernels_used", None)
            cells = [value(results, t, m) for t, m in COLUMNS]
            rows.append([label, recipe.dtype.value, f"{recipe.kernels.value}" + (f" ({kernels})" if kernels else ""),
                         *("" if c is None else f"{c:.4f}" for c in cells), f"{seconds:.0f}"])
            data.append({"mode": label, "overrides": more, "seconds": seconds, "kernels": kernels,
                         "lm_eval": results})
    header = ["mode", "dtype", "kernels", *(f"{t} {m}" for t, m in COLUMNS), "seconds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    print(f"python benchmarks/eval_quality.py {' '.join(sys.argv[1:])}")
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({"command": sys.argv, "table": lines, "modes": data}, indent=2))


if __name__ == "__main__":
    main()
