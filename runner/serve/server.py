"""`runner serve`: uvicorn answers at once (/health: 503) while the recipe loads in a thread;
then the scheduler starts and /health says 200."""
from __future__ import annotations

import threading
from typing import Callable

from runner.config.schema import Recipe


def default_cache_len(recipe: Recipe) -> int:
    """The recipe's generate.cache_len, or the model's max_seq_len capped at 2048."""
    return recipe.generate.cache_len or min(recipe.model.arch.max_seq_len, 2048)


def serve(recipe: Recipe, recipe_file: str, host: str, port: int, slots: int, cache_len: int, queue: int,
          api_key: str | None, model_name: str, note: Callable[[str], None], bar=None) -> None:
    """Serve until interrupted; a failure while loading stops the server and is raised here."""
    import uvicorn

    from runner.serve.app import Settings, State, create_app
    from runner.serve.metrics import Metrics

    g = recipe.generate
    settings = Settings(model_name=model_name, api_key=api_key, slots=slots, cache_len=cache_len,
                        temperature=g.temperature, top_p=g.top_p, top_k=g.top_k, max_tokens=g.max_new_tokens)
    state = State(settings, Metrics())
    server = uvicorn.Server(uvicorn.Config(create_app(state), host=host, port=port, log_level="warning",
                                           timeout_graceful_shutdown=2))
    failed: list[BaseException] = []

    def load() -> None:
        try:
            state.scheduler = _scheduler(recipe, recipe_file, slots, cache_len, queue, state.metrics, note, bar)
            note(f"ready: {model_name} on http://{host}:{port}/v1 ({slots} slots of {cache_len} positions)")
        except BaseException as e:  # shown by the CLI once the server has stopped
            failed.append(e)
            server.should_exit = True

    note(f"loading {recipe_file}; http://{host}:{port}/health says 503 until it is ready")
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


def _scheduler(recipe: Recipe, recipe_file: str, slots: int, cache_len: int, queue: int, metrics, note, bar):
    from runner import pipeline
    from runner.decoders.batched import BatchDecoder
    from runner.decoders.sampling import Sampling
    from runner.serve.scheduler import Scheduler

    built = pipeline.build(recipe, recipe_file, note, bar)
    decoder = BatchDecoder(built.model, slots, cache_len, built.forward)
    if recipe.parallel.world_size > 1:  # every other rank repeats this decoder's calls (follow)
        from runner.serve.ranks import Leader

        decoder = Leader(decoder)
    # One prefill and one step before the first request: compiled steps compile here, not in its latency.
    slot, _ = decoder.start(built.tokenizer.encode("Hello", bos=True), Sampling())
    decoder.step()
    decoder.finish(slot)
    scheduler = Scheduler(decoder, built.tokenizer, queue, metrics)
    scheduler.start()
    return scheduler


def follow(recipe: Recipe, recipe_file: str, slots: int, cache_len: int) -> None:
    """A tensor-parallel rank other than 0: build the same decoder, then run rank 0's calls on it."""
    from runner import pipeline
    from runner.decoders.batched import BatchDecoder
    from runner.serve.ranks import follow as follow_leader

    built = pipeline.build(recipe, recipe_file)
    follow_leader(BatchDecoder(built.model, slots, cache_len, built.forward))
