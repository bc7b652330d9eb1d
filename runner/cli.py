"""The `runner` command line: run, show, init, list."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from runner.config.errors import ConfigError, RankFailed, problem


class _DefaultRun(click.Group):
    """`runner RECIPE ...` means `runner run RECIPE ...`."""

    def parse_args(self, ctx, args):
        i = 0
        while i < len(args) and args[i].startswith("-"):  # the group's flags (--debug) take no value
            i += 1
        if i < len(args) and args[i] not in self.commands:
            args = [*args[:i], "run", *args[i:]]
        return super().parse_args(ctx, args)


@click.group(cls=_DefaultRun, context_settings={"help_option_names": ["-h", "--help"]}, invoke_without_command=True)
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.option("--quiet", is_flag=True, help="No progress bars (they show only on a terminal anyway).")
@click.pass_context
def cli(ctx, debug, quiet):
    """Fast, PyTorch-native LLM text generation driven by YAML recipes.

    \b
    Example:
      runner recipes/tiny-random.yaml generate.max_new_tokens=50
    """
    ctx.obj = {"debug": debug}
    if quiet:
        from runner import report

        report.QUIET = True
    if ctx.invoked_subcommand is None:  # `runner` alone: what it does, and what there is to run
        click.echo(ctx.get_help())
        click.echo()
        _echo_recipes()


def _echo_recipes(folder: Path = Path("recipes")) -> None:
    from runner.config.resolve import recipes_in

    found = recipes_in(folder)
    if not found:
        click.echo(f"No recipes in ./{folder} (run from the project's folder, or name a recipe file).")
        return
    click.echo(f"Recipes in ./{folder} (runner RECIPE [key=value ...]):")
    width = max(len(str(path)) for path, _ in found)
    for path, description in found:
        click.echo(f"  {str(path):<{width}}  {description}")


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
def run(recipe, overrides):
    """Generate text with RECIPE, overriding keys with key=value.

    \b
    Example:
      runner run recipes/tiny-random.yaml generate.prompt="Once upon a time" generate.temperature=0
    """
    from runner.config.resolve import resolve

    resolved = resolve(recipe, overrides, check_files=True)  # before importing torch: errors come fast
    _on_ranks(_generate, resolved, recipe)


def _on_ranks(task, resolved, recipe: str, *args):
    """task(resolved, recipe, *args) here, or on parallel.world_size ranks: spawned, or joined under torchrun."""
    from runner import parallel

    parallel.check(resolved.parallel, resolved.device, recipe)
    if parallel.world_size(resolved.parallel) == 1:
        return {0: task(resolved, recipe, *args)}
    if parallel.under_torchrun():
        return {0: _as_rank(task, resolved, recipe, *args)}
    return parallel.launch(_as_rank, (task, resolved, recipe, *args), resolved.parallel.world_size)


def _as_rank(task, resolved, recipe: str, *args):
    from runner import parallel

    parallel.join(resolved.parallel, resolved.device, resolved.threads)
    # No teardown on failure: the group stays up until this rank has said why it failed (its
    # peers, seeing it gone, would otherwise report the lost connection first) and exits.
    result = task(resolved, recipe, *args)
    parallel.leave()
    return result


def _generate(resolved, recipe: str) -> None:
    from runner import parallel, pipeline
    from runner.report import Reporter
    from runner.tokenizers.base import StopText, TextStream

    from runner.config.schema import DraftKind

    rank = parallel.current()
    report = Reporter(rank=rank.rank if rank else 0)
    g = resolved.generate
    speculative = resolved.draft.kind is not DraftKind.none
    if g.prompts and speculative:
        raise ConfigError([problem(recipe, "generate.prompts", "decodes its prompts as rows of one batch, which "
                                   "speculative decoding does not do; use one generate.prompt, or draft.kind=none")])
    built = pipeline.build(resolved, recipe, report.note, report.progress)
    if g.prompts or (g.num_samples > 1 and not speculative):
        return _generate_batch(built, recipe, report)
    prompt = pipeline.encode_prompt(built, recipe)
    compile_seconds = pipeline.warm_up(built, prompt)
    if compile_seconds:
        report.note(f"compiled in {compile_seconds:.1f} s (not counted below)")
    n = resolved.generate.num_samples
    for i in range(n):
        if n > 1:
            report.line(f"--- sample {i + 1}/{n}")
        stream, stop = TextStream(built.tokenizer), StopText(resolved.generate.stop)

        def show(token: int) -> bool:
            report.write(stop.push(stream.push(token)))
            return stop.stopped

        report.write(resolved.generate.prompt + ("\n" if resolved.generate.chat else ""))
        _, stats = pipeline.generate(built, prompt, show, sample_index=i)
        report.write(stop.push(stream.flush()) + stop.flush())
        report.line()
        report.stats(stats)


def _generate_batch(built, recipe: str, report) -> None:
    """generate.prompts (or the one prompt) x generate.num_samples, decoded together; each text
    printed whole once the batch is done, then the batch's aggregate figures."""
    from runner import pipeline
    from runner.tokenizers.base import StopText, TextStream

    g = built.recipe.generate
    texts = list(g.prompts) or [g.prompt]
    prompts = [pipeline.encode_prompt(built, recipe, text) for text in texts]
    streams = [(TextStream(built.tokenizer), StopText(g.stop)) for _ in range(len(prompts) * g.num_samples)]
    pieces: list[list[str]] = [[] for _ in streams]

    def show(index: int, token: int) -> bool:
        stream, stop = streams[index]
        pieces[index].append(stop.push(stream.push(token)))
        return stop.stopped

    _, stats = pipeline.generate_batch(built, prompts, show)
    for index, (stream, stop) in enumerate(streams):
        prompt, sample = divmod(index, g.num_samples)
        label = [f"prompt {prompt + 1}/{len(prompts)}"] * (len(prompts) > 1) + \
            [f"sample {sample + 1}/{g.num_samples}"] * (g.num_samples > 1)
        report.line(f"--- {', '.join(label)}")
        report.write(texts[prompt] + ("\n" if g.chat else "") + "".join(pieces[index]) + stop.push(stream.flush())
                     + stop.flush())
        report.line()
    report.stats(stats, label=f"{len(streams)} rows decoded together: ")


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
def chat(recipe, overrides):
    """Talk with RECIPE's model, turn after turn (its chat template; the KV cache kept across turns).

    /reset starts over, /exit or Ctrl-D ends, Ctrl-C stops an answer. generate.system sets a
    system message, generate.stop stop strings, generate.max_new_tokens each answer's length.

    \b
    Example:
      runner chat recipes/smollm2-135m.yaml generate.system="You are terse."
    """
    from runner.config.resolve import resolve

    resolved = resolve(recipe, overrides, check_files=True)
    if resolved.parallel.world_size > 1:
        raise ConfigError([problem(recipe, "parallel.world_size", "runner chat runs in one process; use 1",
                                   resolved.parallel.world_size)])
    try:
        import readline  # noqa: F401: line editing and history for input()
    except ImportError:
        pass
    from runner import chat as chatting
    from runner import pipeline
    from runner.report import Reporter

    report = Reporter()
    built = pipeline.build(resolved, recipe, report.note, report.progress)
    chatting.run(built, recipe, report.note)


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
def show(recipe, overrides):
    """Print RECIPE fully resolved (spec merged in, overrides applied) as YAML.

    \b
    Example:
      runner show recipes/tiny-random.yaml generate.max_new_tokens=7
    """
    from runner.config.resolve import resolve, to_yaml

    click.echo(to_yaml(resolve(recipe, overrides)), nl=False)


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
def prepare(recipe, overrides):
    """Fetch RECIPE's model.source and convert it to the native model.checkpoint, once.

    A second call finds the checkpoint and returns at once. Writing is atomic: an
    interrupted prepare leaves nothing behind and the next one starts clean.

    \b
    Example:
      runner prepare recipes/smollm2-135m.yaml
    """
    from pathlib import Path

    from runner.config.resolve import resolve

    resolved = resolve(recipe, overrides)
    models = {"model": resolved.model}
    if resolved.draft.model is not None and resolved.draft.model.checkpoint != resolved.model.checkpoint:
        models["draft.model"] = resolved.draft.model
    for key, model in models.items():
        if Path(model.checkpoint).exists():
            click.echo(f"already prepared: {model.checkpoint}")
            continue
        from runner import sources
        from runner.report import Reporter

        report = Reporter()
        sources.prepare(model, recipe, report.note, key=key, explicit=True, bar=report.progress)
        click.echo(f"prepared {model.checkpoint}")


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Where to write it [default: beside model.checkpoint, e.g. model_int4.g32.pth].")
def quantize(recipe, overrides, out):
    """Write RECIPE's model quantized as its quant section says, with that config stored inside.

    Point a recipe's model.checkpoint at the result to load it directly (the recipe's quant
    section must then say the same).

    \b
    Example:
      runner quantize recipes/smollm2-135m.yaml quant.mode=int4 quant.groupsize=32
    """
    from runner.config.resolve import resolve

    resolved = resolve(recipe, overrides, check_files=True)
    from runner import pipeline
    from runner.report import Reporter

    report = Reporter()
    target = Path(out) if out else pipeline.quantized_path(resolved, recipe)
    pipeline.write_quantized(resolved, recipe, target, report.note, report.progress)
    click.echo(f"wrote {target}")


@cli.command()
@click.argument("args", nargs=-1, required=True)
@click.option("--runs", default=5, show_default=True, help="Timed generations per recipe (after a warm-up).")
@click.option("--tokens", "new_tokens", type=click.IntRange(min=2), default=128, show_default=True,
              help="New tokens per generation.")
@click.option("--prompt", default="Hello, my name is", show_default=True,
              help="The prompt every recipe runs (any text, as typed).")
@click.option("--prompt-tokens", default=None, metavar="N[,M,...]",
              help="Instead of --prompt, a prompt of exactly N tokens cut from English prose (prefill, long contexts); "
                   "several lengths time each recipe after each, their runs in turn, with decode after each "
                   "over decode after the shortest.")
@click.option("--vs", "versus", type=click.Choice(["hf", "hf-compile", "llamacpp"]), multiple=True,
              help="Also time a baseline on the same weights, prompt and threads (repeatable): HF transformers' "
                   "generate (hf), HF with a static cache and torch.compile (hf-compile), llama.cpp on the "
                   "recipe's GGUF (llamacpp, needs llama-cpp-python).")
@click.option("--world-sizes", default=None, metavar="N,M,...",
              help="Time each recipe at each of these tensor-parallel world sizes (parallel.world_size), "
                   "with each rank's peak memory.")
@click.option("--roofline", is_flag=True, help="Measure the machine's read bandwidth and GEMM rate, and show each "
              "decode figure's share of the first and each prefill figure's share of the second.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the figures as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Draw decode tokens/s as a bar chart (PNG; needs matplotlib: pip install 'runner[plot]').")
def bench(args, runs, new_tokens, prompt, prompt_tokens, versus, world_sizes, roofline, json_path, plot_path):
    """Time recipes: RECIPE... [key=value ...] (overrides apply to every recipe).

    Greedy decoding of --tokens tokens from --prompt, after a warm-up; prints decode tokens/s
    (median, min, max), time to first token, prefill speed, model size, effective bandwidth
    (weights read per token x tokens/s), peak memory and compile time, one row per recipe.

    \b
    Example:
      runner bench recipes/smollm2-135m.yaml dtype=bfloat16 --vs hf --json out.json
      runner bench recipes/smollm2-135m.yaml recipes/smollm2-135m.yaml quant.mode=int8 dtype=bfloat16
    """
    import json

    from runner.config.resolve import resolve

    recipes = [a for a in args if "=" not in a]
    overrides = [a for a in args if "=" in a]
    if not recipes:
        raise click.UsageError("name at least one recipe")
    if plot_path:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise click.UsageError("--plot needs matplotlib: pip install 'runner[plot]'") from None
    from dataclasses import replace

    fixed = [f"generate.max_new_tokens={new_tokens}", "generate.temperature=0", "generate.chat=false",
             "generate.num_samples=1"]
    try:
        sizes = [int(n) for n in world_sizes.split(",")] if world_sizes else [None]
    except ValueError:
        raise click.UsageError(f"--world-sizes takes whole numbers separated by commas, got {world_sizes!r}") from None
    try:
        lengths = [int(n) for n in prompt_tokens.split(",")] if prompt_tokens else []
    except ValueError:
        lengths = [0]
    if any(n < 1 for n in lengths) or len(set(lengths)) != len(lengths):
        raise click.UsageError(f"--prompt-tokens takes different whole numbers >= 1 separated by commas "
                               f"(e.g. 5,512), got {prompt_tokens!r}")
    jobs = []
    for path in recipes:
        for size in sizes:
            more = [] if size is None else [f"parallel.world_size={size}"]
            recipe = resolve(path, fixed + overrides + more, check_files=True)
            # The prompt is set after resolving: it is text, not a YAML value to parse.
            jobs.append((path, more, replace(recipe, generate=replace(recipe.generate, prompt=prompt))))

    from runner import bench as measure
    from runner import parallel
    from runner.report import Reporter

    if versus and any(recipe.parallel.world_size > 1 for _, _, recipe in jobs):
        raise click.UsageError("--vs times a baseline in this one process: use it with world size 1 only")
    report = Reporter()
    ceiling = measure.read_bandwidth() if roofline else None
    gemm_rates: dict = {}  # dtype -> torch's GEMM GFLOP/s, measured once per dtype
    rows, ratios = [], []  # ratios: each recipe's decode after each prompt length over after the shortest
    for path, more, recipe in jobs:
        label = " ".join([Path(path).stem, *overrides, *more])
        report.note(f"bench: {label}")
        parallel.check(recipe.parallel, recipe.device, path)
        if parallel.world_size(recipe.parallel) == 1:
            timed, built, prompts = measure.measure(recipe, path, label, runs, new_tokens, report.note, lengths,
                                                    report.progress)
        else:
            ranks = _on_ranks(_bench_rank, recipe, path, label, runs, new_tokens, lengths)
            timed, built, prompts = ranks[0], None, [None] * len(ranks[0])
            for i, figures in enumerate(timed):
                figures.rank_peak_memory_bytes = [ranks[k][i].peak_memory_bytes for k in sorted(ranks)]
        if roofline:
            from runner.transforms import torch_dtype

            dtype = torch_dtype(recipe)
            if dtype not in gemm_rates:
                gemm_rates[dtype] = measure.gemm_rate(dtype)
            for figures in timed:
                figures.gemm_gflop_s = gemm_rates[dtype]
        rows += timed
        if len(timed) > 1:
            ratios.append(measure.context_ratios(label, timed))
        baseline_runs = max(1, runs // 2)
        for name in dict.fromkeys(versus):
            report.note(f"bench: {measure.BASELINES[name]} on the same weights")
            for figures, ids in zip(timed, prompts):
                try:
                    if name == "llamacpp":
                        rate, prefill = measure.llamacpp_decode_speed(built, path, ids, new_tokens, baseline_runs,
                                                                      report.note)
                    else:
                        rate, prefill = measure.hf_decode_speed(built, ids, new_tokens, baseline_runs,
                                                                compiled=name == "hf-compile")
                except ValueError as e:
                    raise click.UsageError(f"--vs {name}: {e}") from None
                figures.baselines[name] = rate
                figures.baseline_prefill[name] = prefill
        del built
    import torch

    caption = (f"machine: {measure.cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads"
               + (f", read bandwidth {ceiling:.1f} GB/s" if ceiling else ""))
    report.line(caption)
    report.line(measure.table(rows, ceiling))
    for each in ratios:
        shortest = min(each["ratios"])
        report.line(f"{each['recipe']}: decode after " + ", ".join(
            f"{n} prompt tokens {ratio['median']:.2f} (best runs {ratio['best']:.2f})"
            for n, ratio in each["ratios"].items() if n != shortest) + f" of after {shortest}")
    if plot_path:
        measure.plot(rows, plot_path, caption)
    if json_path:
        data = {"machine": measure.cpu_name(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                "read_bandwidth_gb_s": ceiling, "prompt": None if prompt_tokens else prompt,
                "prompt_tokens": rows[0].prompt_tokens if len(lengths) < 2 else lengths,
                "decode_over_shortest_prompt": ratios, "new_tokens": new_tokens, "runs": runs,
                "gemm_gflop_s_by_dtype": {str(k).removeprefix("torch."): v for k, v in gemm_rates.items()},
                "results": [r.as_dict() for r in rows]}
        if len(rows) == 1:
            data.update(rows[0].as_dict())  # one recipe: its figures at the top level (e.g. vs_hf_ratio)
        Path(json_path).write_text(json.dumps(data, indent=2))


def _bench_rank(resolved, recipe: str, label: str, runs: int, new_tokens: int, prompt_tokens: list[int]):
    """One recipe's figures (one per prompt length), measured on this rank (every rank of a
    tensor-parallel run times the same steps)."""
    from runner import bench as measure
    from runner import parallel
    from runner.report import Reporter

    rank = parallel.current()
    report = Reporter(rank=rank.rank if rank else 0)
    timed, _, _ = measure.measure(resolved, recipe, label, runs, new_tokens, report.note, prompt_tokens,
                                  report.progress)
    return timed


@cli.command(name="eval")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--tasks", required=True, help="Comma-separated task names (runner/eval/tasks/, or --include-path's).")
@click.option("--limit", type=int, default=None, help="At most N documents per task.")
@click.option("--include-path", "include", multiple=True, type=click.Path(),
              help="A folder of lm-eval task YAMLs with local data files (repeatable).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write lm-eval's results and the resolved recipe as JSON.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Sequences scored per forward.")
def eval_(recipe, overrides, tasks, limit, include, json_path, batch_size):
    """Score RECIPE's pipeline on lm-eval tasks, offline (needs the eval extra); greedy unless
    generate.temperature is set.

    \b
    Example:
      runner eval recipes/smollm2-135m.yaml --tasks pydoc_perplexity,basic_knowledge_mc --limit 50
    """
    from runner.config.resolve import resolve
    from runner.eval import command

    names = command.check(tasks, limit, include)  # before torch: errors come fast
    resolved = resolve(recipe, ["generate.temperature=0", *overrides], check_files=True)
    results = _on_ranks(command.evaluate, resolved, recipe, names, include, limit, batch_size)[0]
    click.echo(command.caption(resolved, recipe, limit) + f" ({results['kernels_used']})")
    click.echo("\n".join(command.table(results)))
    if json_path:
        command.write_json(json_path, results, resolved)


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port to listen on.")
@click.option("--slots", type=click.IntRange(min=1), default=4, show_default=True,
              help="Sequences decoded together (rows of the batch and of the KV cache).")
@click.option("--cache-len", type=click.IntRange(min=2), default=None,
              help="Positions per slot (prompt + new tokens) [default: generate.cache_len, or the model's "
                   "max_seq_len capped at 2048].")
@click.option("--queue", type=click.IntRange(min=0), default=64, show_default=True,
              help="Requests that may wait for a free slot; beyond slots + queue a request gets 429.")
@click.option("--api-key", default=None, help="Require Authorization: Bearer KEY on /v1 routes.")
@click.option("--model-name", default=None, help="The model's id in /v1/models [default: the recipe's file stem].")
def serve(recipe, overrides, host, port, slots, cache_len, queue, api_key, model_name):
    """Serve RECIPE's model over an OpenAI-compatible HTTP API (needs the serve extra).

    POST /v1/completions and /v1/chat/completions (streamed or not), GET /v1/models, /health
    (503 while loading) and /metrics (Prometheus). A field a request leaves out takes the
    recipe's generate.* value.

    \b
    Example:
      runner serve recipes/smollm2-135m.yaml --slots 8 --port 8000
    """
    from runner.config.resolve import resolve

    resolved = resolve(recipe, overrides, check_files=True)
    problems = []
    if resolved.draft.kind.value != "none":
        problems.append(problem(recipe, "draft.kind", "runner serve decodes without a draft (speculative serving "
                                "is not built); use none", resolved.draft.kind.value))
    from runner.serve.server import default_cache_len

    cache_len = cache_len or default_cache_len(resolved)
    if cache_len > resolved.model.arch.max_seq_len:
        problems.append(problem("command line", "--cache-len", f"must be at most model.arch.max_seq_len "
                                f"({resolved.model.arch.max_seq_len})", cache_len))
    if problems:
        raise ConfigError(problems)
    import importlib.util

    missing = [name for name in ("fastapi", "uvicorn", "sse_starlette") if importlib.util.find_spec(name) is None]
    if missing:
        raise click.UsageError(f"runner serve needs the serve extra ({', '.join(missing)} missing): "
                               "pip install -e '.[serve]'")
    # Tensor parallelism: rank 0 serves HTTP and schedules; the other ranks repeat its decoder's calls.
    _on_ranks(_serve_rank, resolved, recipe, host, port, slots, cache_len, queue, api_key,
              model_name or Path(recipe).stem)


def _serve_rank(resolved, recipe: str, host, port, slots, cache_len, queue, api_key, model_name) -> None:
    from runner import parallel
    from runner.report import Reporter
    from runner.serve import server

    rank = parallel.current()
    if rank is not None and rank.rank > 0:
        return server.follow(resolved, recipe, slots, cache_len)
    report = Reporter()
    server.serve(resolved, recipe, host, port, slots, cache_len, queue, api_key, model_name, report.note, report.progress)


@cli.command()
@click.argument("spec")
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--seed", default=0, show_default=True, help="Seed of the random weights.")
def init(spec, out, seed):
    """Write a random-weight checkpoint of SPEC (a specs/ name or a YAML file) to OUT.

    \b
    Example:
      runner init tiny-llama /tmp/tiny/model.pth --seed 1
    """
    from runner import checkpoint
    from runner.config.resolve import load_spec

    arch = load_spec(spec)
    checkpoint.save(Path(out), arch, checkpoint.random_state_dict(arch, seed))
    click.echo(f"wrote {out}")


@cli.command(name="list")
@click.argument("what", required=False, type=click.Choice(["recipes"]))
def list_(what):
    """List what each stage offers: specs, loaders, tokenizers, quant modes, decoders, kernels;
    or, with `recipes`, the recipes in ./recipes and what each is for.

    \b
    Example:
      runner list
      runner list recipes
    """
    if what == "recipes":
        _echo_recipes()
        return
    from runner import decoders, kernels, loaders, sources, tokenizers, transforms
    from runner.config.resolve import known_specs
    from runner.config.schema import CompileMode, DType, Kernels

    try:
        here = kernels.choose_target()
    except kernels.KernelsUnavailable:  # RUNNER_KERNELS_TARGET names one this CPU lacks
        here = None
    rows = {
        "specs": known_specs(),
        "loaders": list(loaders.LOADERS),
        "sources": list(sources.SCHEMES),
        "tokenizers": [k.value for k in tokenizers.TOKENIZERS],
        "quant modes": [m.value for m in transforms.QUANT_MODES],
        "dtypes": [d.value for d in DType],
        "draft kinds (decoders)": [f"{k.value} ({d.__name__})" for k, d in decoders.DECODERS.items()],
        "kernels": [k.value for k in Kernels],
        "kernel targets": [t.name + (" (this CPU's)" if t is here else "") for t in kernels.TARGETS],
        "compile modes": [m.value for m in CompileMode],
    }
    for name, values in rows.items():
        click.echo(f"{name}: {', '.join(values)}")


def main(argv=None):
    """Entry point: ConfigErrors become a message and exit code 2, without a traceback."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="runner", standalone_mode=False)
    except ConfigError as e:
        if debug:
            raise
        for p in e.problems:
            click.echo(f"error: {p}", err=True)
        sys.exit(2)
    except RankFailed as e:  # a spawned rank's error, already in the one-line form
        click.echo(e.message, err=True)
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(2 if isinstance(e, click.UsageError) else e.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
