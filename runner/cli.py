"""The `runner` command line: run, chat, show, prepare, quantize, bench, eval, serve, init, list.

Click wiring and argument checks only: each command resolves its recipe (runner.recipes) and
hands it to the module that does the work. Imports are local so that errors in a recipe come
back before torch loads.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from runner import recipes
from runner.registries import recipe_lines, stages
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
    Example: runner recipes/tiny-random.yaml generate.max_new_tokens=50
    """
    ctx.obj = {"debug": debug}
    if quiet:
        from runner import report

        report.QUIET = True
    if ctx.invoked_subcommand is None:  # `runner` alone: what it does, and what there is to run
        click.echo(ctx.get_help())
        click.echo()
        click.echo("\n".join(recipe_lines(Path("recipes"))))


def recipe_command(name: str | None = None):
    """A command taking RECIPE [key=value ...]."""
    def wrap(function):
        function = click.argument("overrides", nargs=-1)(function)
        function = click.argument("recipe_path", metavar="RECIPE", type=click.Path(dir_okay=False))(function)
        return cli.command(name=name)(function)
    return wrap


@recipe_command()
def run(recipe_path, overrides):
    """Generate text with RECIPE, overriding keys with key=value.

    \b
    Example: runner run recipes/tiny-random.yaml generate.prompt="Once upon a time" generate.temperature=0
    """
    recipe = recipes.load(recipe_path, overrides, check_files=True)  # before importing torch: errors come fast
    from runner import generate, parallel

    parallel.run(generate.run, recipe, recipe_path)


@recipe_command()
def chat(recipe_path, overrides):
    """Talk with RECIPE's model, turn after turn (its chat template; the KV cache kept across turns).

    /reset starts over, /exit or Ctrl-D ends, Ctrl-C stops an answer. generate.system sets a
    system message, generate.stop stop strings, generate.max_new_tokens each answer's length.

    \b
    Example: runner chat recipes/smollm2-135m.yaml generate.system="You are terse."
    """
    recipe = recipes.load(recipe_path, overrides, check_files=True)
    if recipe.parallel.world_size > 1:
        raise ConfigError([problem(recipe_path, "parallel.world_size", "runner chat runs in one process; use 1",
                                   recipe.parallel.world_size)])
    from runner import chat as chatting

    chatting.main(recipe, recipe_path)


@recipe_command()
def show(recipe_path, overrides):
    """Print RECIPE fully resolved (spec merged in, overrides applied) as YAML.

    \b
    Example: runner show recipes/tiny-random.yaml generate.max_new_tokens=7
    """
    from runner.config.resolve import to_yaml

    click.echo(to_yaml(recipes.load(recipe_path, overrides)), nl=False)


@recipe_command()
def prepare(recipe_path, overrides):
    """Fetch RECIPE's model.source and convert it to the native model.checkpoint, once.

    A second call finds the checkpoint and returns at once. Writing is atomic: an
    interrupted prepare leaves nothing behind and the next one starts clean.

    \b
    Example: runner prepare recipes/smollm2-135m.yaml
    """
    recipe = recipes.load(recipe_path, overrides)
    from runner import pipeline
    from runner.report import Reporter

    report = Reporter()
    for checkpoint, fetched in pipeline.prepare(recipe, recipe_path, report.note, report.progress):
        click.echo(f"prepared {checkpoint}" if fetched else f"already prepared: {checkpoint}")


@recipe_command()
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Where to write it [default: beside model.checkpoint, e.g. model_int4.g32.pth].")
def quantize(recipe_path, overrides, out):
    """Write RECIPE's model quantized as its quant section says, with that config stored inside.

    Point a recipe's model.checkpoint at the result to load it directly (the recipe's quant
    section must then say the same).

    \b
    Example: runner quantize recipes/smollm2-135m.yaml quant.mode=int4 quant.groupsize=32
    """
    recipe = recipes.load(recipe_path, overrides, check_files=True)
    from runner import pipeline
    from runner.report import Reporter

    report = Reporter()
    target = Path(out) if out else pipeline.quantized_path(recipe, recipe_path)
    pipeline.write_quantized(recipe, recipe_path, target, report.note, report.progress)
    click.echo(f"wrote {target}")


def _numbers(option: str, text: str | None, what: str) -> list[int]:
    """A comma-separated list of different whole numbers >= 1 (empty for None), or a usage error."""
    try:
        numbers = [int(n) for n in text.split(",")] if text else []
    except ValueError:
        numbers = [0]
    if any(n < 1 for n in numbers) or len(set(numbers)) != len(numbers):
        raise click.UsageError(f"{option} takes different whole numbers >= 1 separated by commas "
                               f"({what}), got {text!r}")
    return numbers


def _thread_counts(text: str | None, busy: int) -> tuple[int | None, ...]:
    """bench's --threads: each count, None for auto (the recipe's own); without it auto, or with
    --busy auto and 1."""
    if text is None:
        return (None, 1) if busy else (None,)
    try:
        counts = [None if n == "auto" else int(n) for n in text.split(",")]
    except ValueError:
        counts = [0]
    if any(n is not None and n < 1 for n in counts) or len(set(counts)) != len(counts):
        raise click.UsageError(f"--threads takes different whole numbers >= 1 or auto separated by commas "
                               f"(e.g. auto,1), got {text!r}")
    return tuple(counts)


@cli.command()
@click.argument("args", nargs=-1, required=True)
@click.option("--runs", default=5, show_default=True, help="Timed generations per recipe (after a warm-up).")
@click.option("--tokens", "new_tokens", type=click.IntRange(min=2), default=128, show_default=True, help="New tokens.")
@click.option("--prompt", default="Hello, my name is", show_default=True, help="The prompt (any text, as typed).")
@click.option("--prompt-tokens", default=None, metavar="N[,M,...]",
              help="Instead of --prompt, a prompt of exactly N tokens of English prose; several lengths time each "
                   "recipe after each, in turn, with decode after each over decode after the shortest.")
@click.option("--vs", "versus", type=click.Choice(["hf", "hf-compile", "llamacpp"]), multiple=True,
              help="Also time a baseline on the same weights, prompt and threads (repeatable): HF's generate, "
                   "HF with a static cache and torch.compile, llama.cpp on the recipe's GGUF (llama-cpp-python).")
@click.option("--world-sizes", default=None, metavar="N,M,...",
              help="Time each recipe at each of these parallel.world_size values, with each rank's peak memory.")
@click.option("--threads", "thread_counts", default=None, metavar="N|auto,...",
              help="Time each recipe at each of these thread counts (auto: the recipe's own threads) "
                   "[default: auto; with --busy, auto,1].")
@click.option("--busy", type=click.IntRange(min=0), default=0, show_default=True,
              help="Run N competing CPU-bound processes while timing (they end with the bench); without --threads, "
                   "each recipe is timed at its own threads and at threads=1, with the ratio of the two.")
@click.option("--roofline", is_flag=True, help="Measure the machine's read bandwidth and GEMM rate; show each "
              "decode figure's share of the first, each prefill figure's of the second.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the figures as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Draw decode tokens/s as a bar chart (PNG; needs matplotlib: pip install 'runner[plot]').")
def bench(args, runs, new_tokens, prompt, prompt_tokens, versus, world_sizes, thread_counts, busy, roofline, json_path,
          plot_path):
    """Time recipes: RECIPE... [key=value ...] (overrides apply to every recipe).

    Greedy decoding of --tokens tokens from --prompt, after a warm-up; prints decode tokens/s
    (median, min, max), time to first token, prefill speed, model size, effective bandwidth
    (weights read per token x tokens/s), peak memory and compile time, one row per recipe.

    \b
    Example:
      runner bench recipes/smollm2-135m.yaml dtype=bfloat16 --vs hf --json out.json
      runner bench recipes/smollm2-135m.yaml recipes/smollm2-135m.yaml quant.mode=int8 dtype=bfloat16
      runner bench recipes/smollm2-135m.yaml --busy 1
    """
    recipe_paths = [a for a in args if "=" not in a]
    overrides = [a for a in args if "=" in a]
    if not recipe_paths:
        raise click.UsageError("name at least one recipe")
    sizes = tuple(_numbers("--world-sizes", world_sizes, "e.g. 1,2")) or (None,)
    lengths = _numbers("--prompt-tokens", prompt_tokens, "e.g. 5,512")
    threads = _thread_counts(thread_counts, busy)
    from runner import bench as benchmark

    try:
        benchmark.run(recipe_paths, overrides, benchmark.Options(runs, new_tokens, prompt, lengths, tuple(versus),
                                                                 sizes, roofline, json_path, plot_path, threads, busy))
    except benchmark.Refused as e:
        raise click.UsageError(str(e)) from None


@recipe_command("eval")
@click.option("--tasks", required=True, help="Comma-separated task names (runner/eval/tasks/, or --include-path's).")
@click.option("--limit", type=int, default=None, help="At most N documents per task.")
@click.option("--include-path", "include", multiple=True, type=click.Path(),
              help="A folder of lm-eval task YAMLs with local data files (repeatable).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the results as JSON.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Sequences per forward.")
def eval_(recipe_path, overrides, tasks, limit, include, json_path, batch_size):
    """Score RECIPE's pipeline on lm-eval tasks, offline (needs the eval extra); greedy unless
    generate.temperature is set.

    \b
    Example: runner eval recipes/smollm2-135m.yaml --tasks pydoc_perplexity,basic_knowledge_mc --limit 50
    """
    from runner.eval import command

    names = command.check(tasks, limit, include)  # before torch: errors come fast
    recipe = recipes.load(recipe_path, ["generate.temperature=0", *overrides], check_files=True)
    from runner import parallel

    results = parallel.run(command.evaluate, recipe, recipe_path, names, include, limit, batch_size)[0]
    click.echo(command.report(results, recipe, recipe_path, limit, json_path))


@recipe_command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port to listen on.")
@click.option("--slots", type=click.IntRange(min=1), default=4, show_default=True,
              help="Sequences decoded together (rows of the batch and of the KV cache).")
@click.option("--cache-len", type=click.IntRange(min=2), default=None, help="Positions per slot (prompt + new "
              "tokens) [default: generate.cache_len, or the model's max_seq_len capped at 2048].")
@click.option("--queue", type=click.IntRange(min=0), default=64, show_default=True,
              help="Requests that may wait for a free slot; beyond slots + queue a request gets 429.")
@click.option("--api-key", default=None, help="Require Authorization: Bearer KEY on /v1 routes.")
@click.option("--model-name", default=None, help="The model's id in /v1/models [default: the recipe's file stem].")
@click.option("--prefix-cache/--no-prefix-cache", default=True, show_default=True,
              help="Prefill only what a free slot's cache does not already hold of a prompt.")
@click.option("--prefill-chunk", type=click.IntRange(min=0), default=8, show_default=True,
              help="Prompt tokens run inside each decode step, at most, while requests stream: they keep "
                   "streaming while a long prompt arrives (0: each prompt whole).")
def serve(recipe_path, overrides, cache_len, model_name, **options):
    """Serve RECIPE's model over an OpenAI-compatible HTTP API (needs the serve extra).

    POST /v1/completions and /v1/chat/completions (streamed or not), GET /v1/models, /health
    (503 while loading) and /metrics (Prometheus). A field a request leaves out takes the
    recipe's generate.* value.

    \b
    Example: runner serve recipes/smollm2-135m.yaml --slots 8 --port 8000
    """
    recipe = recipes.load(recipe_path, overrides, check_files=True)
    from runner.serve import server

    options = server.Options(cache_len=server.check(recipe, recipe_path, cache_len),
                             model_name=model_name or Path(recipe_path).stem, **options)
    if server.missing_extra():
        raise click.UsageError(f"runner serve needs the serve extra ({', '.join(server.missing_extra())} missing): "
                               "pip install -e '.[serve]'")
    from runner import parallel

    # Tensor parallelism: rank 0 serves HTTP and schedules; the other ranks repeat its decoder's calls.
    parallel.run(server.on_rank, recipe, recipe_path, options)


@cli.command()
@click.argument("spec")
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--seed", default=0, show_default=True, help="Seed of the random weights.")
def init(spec, out, seed):
    """Write a random-weight checkpoint of SPEC (a specs/ name or a YAML file) to OUT.

    \b
    Example: runner init tiny-llama /tmp/tiny/model.pth --seed 1
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
        click.echo("\n".join(recipe_lines(Path("recipes"))))
        return
    for name, values in stages().items():
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
