"""`runner serve`: uvicorn answers at once (/health: 503) while the recipe loads in a thread;
then the scheduler starts and /health says 200."""
from __future__ import annotations

import importlib.util
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from runner.config.errors import ConfigError, problem
from runner.config.schema import DraftKind, Recipe

if TYPE_CHECKING:
    from runner import parallel

EXTRA = ("fastapi", "uvicorn", "sse_starlette")  # what the serve extra installs


@dataclass(frozen=True)
class Options:
    """`runner serve`'s command-line options, checked."""

    host: str
    port: int
    slots: int
    cache_len: int
    queue: int
    api_key: str | None
    model_name: str
    prefix_cache: bool = True
    prefill_chunk: int = 0  # prompt tokens inside each decode step, at most (0: whole prompts)


def default_cache_len(recipe: Recipe) -> int:
    """The recipe's generate.cache_len, or the model's max_seq_len capped at 2048."""
    return recipe.generate.cache_len or min(recipe.model.arch.max_seq_len, 2048)


def check(recipe: Recipe, recipe_path: str, cache_len: int | None) -> int:
    """The cache length per slot (--cache-len, or the recipe's default), once the recipe is one
    the server runs; a ConfigError names every problem."""
    problems = []
    if recipe.draft.kind is DraftKind.model:
        problems.append(problem(recipe_path, "draft.kind", "runner serve drafts by n-gram lookup only (a draft "
                                "model is not served); use ngram or none", recipe.draft.kind.value))
    cache_len = cache_len or default_cache_len(recipe)
    if cache_len > recipe.model.arch.max_seq_len:
        problems.append(problem("command line", "--cache-len", f"must be at most model.arch.max_seq_len "
                                f"({recipe.model.arch.max_seq_len})", cache_len))
    if problems:
        raise ConfigError(problems)
    return cache_len


def missing_extra() -> list[str]:
    """The serve extra's packages that are not installed."""
    return [name for name in EXTRA if importlib.util.find_spec(name) is None]


def on_rank(rank: parallel.Rank | None, recipe: Recipe, recipe_path: str, options: Options) -> None:
    """Rank 0 (or the only process) serves; every other rank follows rank 0's decoder calls."""
    from runner.report import Reporter

    if rank is not None and rank.rank > 0:
        return follow(rank, recipe, recipe_path, options)
    report = Reporter()
    serve(rank, recipe, recipe_path, options, report.note, report.progress)


def serve(rank: parallel.Rank | None, recipe: Recipe, recipe_path: str, options: Options,
          note: Callable[[str], None], bar=None) -> None:
    """Serve until interrupted; a failure while loading stops the server and is raised here."""
    import uvicorn

    from runner.decoders import sampling_of
    from runner.serve.app import Settings, State, create_app
    from runner.serve.metrics import Metrics

    host, port, slots, cache_len = options.host, options.port, options.slots, options.cache_len
    model_name = options.model_name
    vocab = recipe.model.arch.vocab_size
    settings = Settings(model_name=model_name, api_key=options.api_key, slots=slots, cache_len=cache_len,
                        sampling=sampling_of(recipe), max_tokens=recipe.generate.max_new_tokens,
                        vocab_size=vocab if isinstance(vocab, int) else None)
    state = State(settings, Metrics())
    server = uvicorn.Server(uvicorn.Config(create_app(state), host=host, port=port, log_level="warning",
                                           timeout_graceful_shutdown=2))
    failed: list[BaseException] = []

    def load() -> None:
        try:
            state.scheduler = _scheduler(rank, recipe, recipe_path, options, state.metrics, note, bar)
            note(f"ready: {model_name} on http://{host}:{port}/v1 ({slots} slots of {cache_len} positions)")
        except BaseException as e:  # shown by the CLI once the server has stopped
            failed.append(e)
            server.should_exit = True

    note(f"loading {recipe_path}; http://{host}:{port}/health says 503 until it is ready")
    loader = threading.Thread(target=load, name="runner-load", daemon=True)
    loader.start()
    try:
        server.run()
    finally:
        if state.scheduler is not None:
            state.scheduler.close()
    if failed:
        raise failed[0]
    if not server.started:
        raise OSError(f"could not listen on {host}:{port}")


def drafts(recipe: Recipe, vocab_size: int):
    """The batched decoder's n-gram drafts for a recipe with draft.kind ngram, else None."""
    from runner.decoders import ngram_proposer

    if recipe.draft.kind is not DraftKind.ngram:
        return None
    return ngram_proposer(recipe, vocab_size), recipe.draft.speculate_k


def _scheduler(rank: parallel.Rank | None, recipe: Recipe, recipe_path: str, options: Options, metrics, note, bar):
    from runner import pipeline
    from runner.decoders.batched import BatchDecoder
    from runner.decoders.sampling import Sampling
    from runner.serve.scheduler import Scheduler

    built = pipeline.build(recipe, recipe_path, note, bar, rank=rank)
    slots, cache_len = options.slots, options.cache_len
    decoder = BatchDecoder(built.model, slots, cache_len, built.forward, options.prefix_cache,
                           drafts(recipe, built.model.spec.vocab_size))
    keepalive = None
    if rank is not None:  # every other rank repeats this decoder's calls (follow)
        from runner.serve.ranks import Leader

        decoder = keepalive = Leader(decoder)
    # One prefill and one step before the first request: compiled steps compile here, not in its latency.
    slot, _ = decoder.start(built.tokenizer.encode("Hello", bos=True), Sampling())
    decoder.step()
    decoder.finish(slot)
    scheduler = Scheduler(decoder, built.tokenizer, options.queue, metrics, keepalive, options.prefill_chunk,
                          built.model.spec.vocab_size)
    scheduler.start()
    return scheduler


def follow(rank: parallel.Rank, recipe: Recipe, recipe_path: str, options: Options) -> None:
    """A tensor-parallel rank other than 0: build the same decoder (its slots chosen alike, prefix
    caching included), then run rank 0's calls on it."""
    from runner import pipeline
    from runner.decoders.batched import BatchDecoder
    from runner.serve.ranks import follow as follow_leader

    built = pipeline.build(recipe, recipe_path, rank=rank)
    vocab_size = built.model.spec.vocab_size
    follow_leader(BatchDecoder(built.model, options.slots, options.cache_len, built.forward, options.prefix_cache,
                               drafts(recipe, vocab_size)), built.tokenizer, vocab_size)
