"""`runner RECIPE`: prompts as token ids, one sample or a batch of them decoded, the text printed.

run() is what the CLI calls on each rank; generate() and generate_batch() return tokens and
statistics for any caller (bench, tests).
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from runner import decoders, parallel, pipeline as pipelines
from runner.config.errors import ConfigError, problem
from runner.config.schema import DraftKind, Recipe
from runner.decoders.batched import BatchDecoder
from runner.decoders.stats import Stats, peak_memory
from runner.kernels import MAX_ROWS
from runner.report import Reporter
from runner.text import TextStream
from runner.tokenizers.chat import render_chat

MAX_BATCH = MAX_ROWS  # rows decoded together at most: what runner's GEMV kernels take; more wait their turn


def run(rank: parallel.Rank | None, recipe: Recipe, recipe_path: str) -> None:
    """Generate as the recipe says and print it: each sample streamed, or a batch's texts once done."""
    report = Reporter(rank=rank.rank if rank else 0)
    g = recipe.generate
    speculative = recipe.draft.kind is not DraftKind.none
    if g.prompts and speculative:
        raise ConfigError([problem(recipe_path, "generate.prompts", "decodes its prompts as rows of one batch, which "
                                   "speculative decoding does not do; use one generate.prompt, or draft.kind=none")])
    built = pipelines.build(recipe, recipe_path, report.note, report.progress, rank=rank)
    if g.prompts or (g.num_samples > 1 and not speculative):
        return _print_batch(built, recipe_path, report)
    prompt = encode_prompt(built, recipe_path)
    compile_seconds = warm_up(built, prompt)
    if compile_seconds:
        report.note(f"compiled in {compile_seconds:.1f} s (not counted below)")
    for i in range(g.num_samples):
        if g.num_samples > 1:
            report.line(f"--- sample {i + 1}/{g.num_samples}")
        text = TextStream(built.tokenizer, g.stop)

        def show(token: int) -> bool:
            report.write(text.push(token))
            return text.done

        report.write(g.prompt + ("\n" if g.chat else ""))
        _, stats = generate(built, prompt, show, sample_index=i)
        report.write(text.flush())
        report.line()
        report.stats(stats)


def _print_batch(built: pipelines.Pipeline, recipe_path: str, report: Reporter) -> None:
    """generate.prompts (or the one prompt) x generate.num_samples, decoded together; each text
    printed whole once the batch is done, then the batch's aggregate figures."""
    g = built.recipe.generate
    texts = list(g.prompts) or [g.prompt]
    prompts = [encode_prompt(built, recipe_path, text, reserve=False) for text in texts]  # BatchDecoder has its own
    streams = [TextStream(built.tokenizer, g.stop) for _ in range(len(prompts) * g.num_samples)]
    pieces: list[list[str]] = [[] for _ in streams]

    def show(index: int, token: int) -> bool:
        pieces[index].append(streams[index].push(token))
        return streams[index].done

    _, stats = generate_batch(built, prompts, show)
    for index, stream in enumerate(streams):
        prompt, sample = divmod(index, g.num_samples)
        label = [f"prompt {prompt + 1}/{len(prompts)}"] * (len(prompts) > 1) + \
            [f"sample {sample + 1}/{g.num_samples}"] * (g.num_samples > 1)
        report.line(f"--- {', '.join(label)}")
        report.write(texts[prompt] + ("\n" if g.chat else "") + "".join(pieces[index]) + stream.flush())
        report.line()
    report.stats(stats, label=f"{len(streams)} rows decoded together: ")


def encode_prompt(built: pipelines.Pipeline, recipe_path: str, prompt: str | None = None,
                  reserve: bool = True) -> list[int]:
    """generate.prompt (or `prompt`) as token ids, through the chat template when generate.chat
    says so, checked against the cache (see fit_prompt)."""
    recipe = built.recipe
    prompt = recipe.generate.prompt if prompt is None else prompt
    if recipe.generate.chat:
        # The template writes any BOS itself, and its special-token text must become special tokens.
        text = render_chat(built.tokenizer, prompt, recipe_path, recipe.generate.system)
        ids = built.tokenizer.encode(text, bos=False, allow_special=True)
    else:
        ids = built.tokenizer.encode(prompt, bos=True)
    return fit_prompt(built, ids, recipe_path, reserve)


def fit_prompt(built: pipelines.Pipeline, ids: list[int], recipe_path: str, reserve: bool = True) -> list[int]:
    """Check that prompt `ids` and the new tokens fit the cache, and (with `reserve`) have the
    decoder reserve its cache for them once."""
    recipe, decoder = built.recipe, built.decoder
    limit = recipe.generate.cache_len or recipe.model.arch.max_seq_len
    needed = decoder.positions(len(ids), recipe.generate.max_new_tokens)
    if needed > limit:
        which = "generate.cache_len" if recipe.generate.cache_len else "model.arch.max_seq_len"
        extra = f" + draft.speculate_k={decoder.lookahead}" if decoder.lookahead else ""
        raise ConfigError([problem(recipe_path, "generate.prompt",
                                   f"is {len(ids)} tokens; with generate.max_new_tokens={recipe.generate.max_new_tokens}"
                                   f"{extra} that exceeds {which}={limit}; shorten the prompt or lower max_new_tokens")])
    if reserve and decoder.cache_len is None:
        # One size for the warm-up and every sample, so compiled steps never see a new cache shape.
        decoder.reserve(needed)
    return ids


def warm_up(built: pipelines.Pipeline, prompt: list[int]) -> float:
    """Compile the compiled steps on the real shapes before timing anything; returns the seconds it took."""
    steps = [f for f in (built.forward, built.draft_forward) if hasattr(f, "compile_seconds")]
    if not steps:
        return 0.0
    # Enough tokens for one whole speculative round.
    built.decoder.generate(prompt, min(2 + built.decoder.lookahead, built.recipe.generate.max_new_tokens))
    return sum(f.compile_seconds for f in steps)


def generate(built: pipelines.Pipeline, prompt: list[int], on_token: Callable[[int], bool | None] | None = None,
             sample_index: int = 0) -> tuple[list[int], Stats]:
    """One sample; sample i is seeded with generate.seed + i so each is reproducible on its own.
    on_token(id) sees each new token; when it returns True, generation ends there."""
    g = built.recipe.generate
    generator = torch.Generator(built.decoder.device).manual_seed(g.seed + sample_index)
    return built.decoder.generate(prompt, g.max_new_tokens, built.tokenizer.eos_ids, generator, on_token)


def generate_batch(built: pipelines.Pipeline, prompts: list[list[int]],
                   on_token: Callable[[int, int], bool | None] | None = None) -> tuple[list[list[int]], Stats]:
    """Every prompt's generate.num_samples samples decoded together as rows of one batch; sample j
    of each prompt is seeded with generate.seed + j, as generate() seeds it, so a row draws what it
    would alone. on_token(sequence, id) sees each new token (sequence: prompt i's sample j is
    i * num_samples + j); True ends that sequence. Returns each sequence's tokens and the batch's
    aggregate statistics."""
    g, eos = built.recipe.generate, built.tokenizer.eos_ids
    sequences = [(ids, j) for ids in prompts for j in range(g.num_samples)]
    cache_len = g.cache_len or max(len(ids) for ids in prompts) + g.max_new_tokens
    decoder = BatchDecoder(built.model, min(len(sequences), MAX_BATCH), cache_len, built.forward)
    out: list[list[int]] = [[] for _ in sequences]
    owner: dict[int, int] = {}  # slot -> sequence
    waiting = list(range(len(sequences)))
    sampling = decoders.sampling_of(built.recipe)
    start, first = time.perf_counter(), None

    def take(index: int, slot: int, token: int) -> None:
        out[index].append(token)
        stop = on_token is not None and bool(on_token(index, token))
        if stop or token in eos or len(out[index]) == g.max_new_tokens:
            decoder.finish(slot)
            del owner[slot]

    while waiting or owner:
        while waiting and decoder.free():  # new rows join between steps
            index = waiting.pop(0)
            ids, sample = sequences[index]
            constraint = None if built.grammar is None else built.grammar.matcher()
            slot, token = decoder.start(ids, sampling, g.seed + sample, constraint=constraint)
            owner[slot] = index
            first = first or time.perf_counter()
            take(index, slot, token.id)
        for slot, tokens in decoder.step().items():
            for token in tokens:
                if slot in owner:  # take() frees the slot once its sequence stops
                    take(owner[slot], slot, token.id)
    end = time.perf_counter()
    stats = Stats(prompt_tokens=sum(len(ids) for ids, _ in sequences), new_tokens=sum(map(len, out)),
                  time_to_first_token=(first or end) - start, decode_seconds=end - (first or end),
                  peak_memory_bytes=peak_memory(decoder.device))
    return out, stats
