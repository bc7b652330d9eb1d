"""`runner bench`: decode speed, latency, memory and bandwidth of recipes, measured in one run.

Figures, never assertions: tests check correctness, this measures speed. Every recipe runs the
same prompt and length after a warm-up (which also compiles compiled steps); medians over N runs.
"""
from __future__ import annotations

import importlib.util
import itertools
import json
from dataclasses import dataclass, replace
from pathlib import Path

from runner import recipes
from runner.config.schema import Recipe

__all__ = ["Options", "Refused", "run"]


class Refused(Exception):
    """What was asked cannot be timed (a baseline that cannot run here); the CLI shows it as a usage error."""


@dataclass(frozen=True)
class Options:
    runs: int
    new_tokens: int
    prompt: str
    prompt_tokens: list[int]  # [] times `prompt`; else a prompt of each length, in turn
    versus: tuple[str, ...] = ()  # BASELINES keys
    world_sizes: tuple[int | None, ...] = (None,)  # None: the recipe's own
    roofline: bool = False
    json_path: str | None = None
    plot_path: str | None = None
    threads: tuple[int | None, ...] = (None,)  # None: the recipe's own (auto)
    busy: int = 0  # competing CPU-bound processes while timing


@dataclass(frozen=True)
class _Job:
    path: str
    more: list[str]  # what its row's label adds to the overrides: its world size and thread count
    recipe: Recipe
    group: int  # jobs of one group differ in their thread count only
    threads: int | None  # the --threads value timed (None: auto)


def _jobs(recipe_paths: list[str], overrides: list[str], options: Options) -> list[_Job]:
    """Each recipe at each world size and thread count, resolved."""
    fixed = [f"generate.max_new_tokens={options.new_tokens}", "generate.temperature=0", "generate.chat=false",
             "generate.num_samples=1"]
    jobs = []
    for group, (path, size) in enumerate(itertools.product(recipe_paths, options.world_sizes)):
        for count in options.threads:
            more = [] if size is None else [f"parallel.world_size={size}"]
            more += [] if count is None else [f"threads={count}"]
            recipe = recipes.load(path, fixed + overrides + more, check_files=True)
            if count is None and options.threads != (None,):
                more.append("threads=auto")  # in the label only: the recipe's own
            # The prompt is set after resolving: it is text, not a YAML value to parse.
            recipe = replace(recipe, generate=replace(recipe.generate, prompt=options.prompt))
            jobs.append(_Job(path, more, recipe, group, count))
    return jobs


def run(recipe_paths: list[str], overrides: list[str], options: Options) -> None:
    """Time every recipe (at every world size and thread count), under options.busy competing
    processes, print the table and the ratios, and write the JSON and the plot where asked."""
    if options.plot_path and importlib.util.find_spec("matplotlib") is None:
        raise Refused("--plot needs matplotlib: pip install 'runner[plot]'")
    jobs = _jobs(recipe_paths, overrides, options)  # before torch loads: recipe errors come fast
    if options.versus and any(job.recipe.parallel.world_size > 1 for job in jobs):
        raise Refused("--vs times a baseline in this one process: use it with world size 1 only")
    from runner.bench.busy import competing

    with competing(options.busy):
        _time(jobs, overrides, options)


def _time(jobs: list[_Job], overrides: list[str], options: Options) -> None:
    """run()'s work, once its jobs are resolved and its competing processes started."""
    import torch

    from runner import parallel
    from runner.bench import machine
    from runner.bench.baselines import hf_decode_speed, llamacpp_decode_speed
    from runner.bench.figures import BASELINES, context_ratios, plot, table, threads_ratio
    from runner.bench.measure import measure, on_rank
    from runner.decoders.threads import default_count
    from runner.report import Reporter

    report = Reporter()
    lengths = options.prompt_tokens
    ceiling = machine.read_bandwidth() if options.roofline else None
    gemm_rates: dict = {}  # dtype -> torch's GEMM GFLOP/s, measured once per dtype
    rows, ratios = [], []  # ratios: each recipe's decode after each prompt length over after the shortest
    by_threads: dict[tuple[int, int | None], list] = {}  # (job group, --threads value) -> its rows
    for job in jobs:
        path, more, recipe = job.path, job.more, job.recipe
        label = " ".join([Path(path).stem, *overrides, *more])
        report.note(f"bench: {label}")
        parallel.check(recipe.parallel, recipe.device, path)
        if parallel.world_size(recipe.parallel) == 1:
            timed, built, prompts = measure(recipe, path, label, options.runs, options.new_tokens, report.note, lengths,
                                            report.progress)
            for figures in timed:
                figures.threads_at_end = torch.get_num_threads()
        else:
            ranks = parallel.run(on_rank, recipe, path, label, options.runs, options.new_tokens, lengths)
            timed, built, prompts = ranks[0], None, [None] * len(ranks[0])
            for i, figures in enumerate(timed):
                figures.rank_peak_memory_bytes = [ranks[k][i].peak_memory_bytes for k in sorted(ranks)]
        if options.roofline:
            from runner.transforms import torch_dtype

            dtype = torch_dtype(recipe)
            if dtype not in gemm_rates:
                gemm_rates[dtype] = machine.gemm_rate(dtype)
            for figures in timed:
                figures.gemm_gflop_s = gemm_rates[dtype]
        for figures in timed:
            figures.threads = recipe.threads
        rows += timed
        by_threads[job.group, job.threads] = timed
        if len(timed) > 1:
            ratios.append(context_ratios(label, timed))
        baseline_runs = max(1, options.runs // 2)
        for name in dict.fromkeys(options.versus):
            report.note(f"bench: {BASELINES[name]} on the same weights")
            for figures, ids in zip(timed, prompts):
                try:
                    if name == "llamacpp":
                        rate, prefill = llamacpp_decode_speed(built, path, ids, options.new_tokens, baseline_runs,
                                                              report.note)
                    else:
                        rate, prefill = hf_decode_speed(built, ids, options.new_tokens, baseline_runs,
                                                        compiled=name == "hf-compile")
                except ValueError as e:
                    raise Refused(f"--vs {name}: {e}") from None
                figures.baselines[name] = rate
                figures.baseline_prefill[name] = prefill
        del built
    caption = (f"machine: {machine.cpu_name()}, torch {torch.__version__}, {default_count()} threads by default"
               + (f", read bandwidth {ceiling:.1f} GB/s" if ceiling else "")
               + (f", busy: {options.busy} competing processes" if options.busy else ""))
    report.line(caption)
    report.line(table(rows, ceiling))
    # Each recipe at its own threads against threads=1, timed in the same minutes, under the same load.
    versus_one = [threads_ratio(own, one) for (group, count), rows_own in by_threads.items() if count is None
                  for own, one in zip(rows_own, by_threads.get((group, 1), []))]
    for each in versus_one:
        report.line(f"{each['recipe']}: decode at its own threads {each['own']:.1f} tok/s, "
                    f"{each['ratio']:.2f}x of threads=1's {each['threads_1']:.1f} (medians)")
    for each in ratios:
        shortest = min(each["ratios"])
        report.line(f"{each['recipe']}: decode after " + ", ".join(
            f"{n} prompt tokens {ratio['median']:.2f} (best runs {ratio['best']:.2f})"
            for n, ratio in each["ratios"].items() if n != shortest) + f" of after {shortest}")
    if options.plot_path:
        plot(rows, options.plot_path, caption)
    if options.json_path:
        data = {"machine": machine.cpu_name(), "torch": torch.__version__, "threads": default_count(),
                "busy": options.busy, "own_threads_over_threads_1": versus_one,
                "read_bandwidth_gb_s": ceiling, "prompt": None if lengths else options.prompt,
                "prompt_tokens": rows[0].prompt_tokens if len(lengths) < 2 else lengths,
                "decode_over_shortest_prompt": ratios, "new_tokens": options.new_tokens, "runs": options.runs,
                "gemm_gflop_s_by_dtype": {str(k).removeprefix("torch."): v for k, v in gemm_rates.items()},
                "results": [r.as_dict() for r in rows]}
        if len(rows) == 1:
            data.update(rows[0].as_dict())  # one recipe: its figures at the top level (e.g. vs_hf_ratio)
        Path(options.json_path).write_text(json.dumps(data, indent=2))
