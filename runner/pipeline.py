"""The whole flow: resolve -> load -> weight transforms -> shard -> decoder -> generate -> report."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Callable

import torch

from runner import decoders, loaders, parallel, sharders, sources, tokenizers, transforms
from runner.transforms import compile as compile_step
from runner.transforms import kernels as kernel_ops
from runner.config.errors import ConfigError, problem
from runner.config.schema import DraftKind, ModelSpec, QuantKVCache, QuantMode, QuantSection, Recipe, TokenizerKind, tp_problems
from runner.decoders.batched import BatchDecoder
from runner.decoders.stats import Stats, peak_memory
from runner.kernels import MAX_ROWS
from runner.tokenizers.base import Tokenizer
from runner.tokenizers.chat import render_chat


Shard = Callable[[torch.nn.Module], torch.nn.Module]


@dataclass
class Pipeline:
    recipe: Recipe
    tokenizer: Tokenizer
    model: torch.nn.Module
    decoder: object
    forward: object = None  # what the decoder calls: the model, or its compiled steps
    draft_forward: object = None  # what the draft model's proposer calls, likewise


# The file a source directory (an HF snapshot) holds for each tokenizer kind.
TOKENIZER_FILES = {TokenizerKind.sentencepiece: "tokenizer.model", TokenizerKind.tiktoken: "original/tokenizer.model",
                   TokenizerKind.hf: "tokenizer.json", TokenizerKind.gguf: ""}


def build_tokenizer(recipe: Recipe, recipe_file: str) -> Tokenizer:
    """The recipe's tokenizer; with no tokenizer.path, the one the model's source carries."""
    section = recipe.tokenizer
    if section.path is None:
        carrier = sources.source_file(recipe.model, recipe_file, TOKENIZER_FILES[section.kind])
        if carrier is None:
            raise ConfigError([problem(recipe_file, "tokenizer.path", "is required when model.source carries no tokenizer")])
        section = dataclasses.replace(section, path=str(carrier))
    tokenizer = tokenizers.build(section, recipe_file)
    if tokenizer.vocab_size > recipe.model.arch.vocab_size:
        raise ConfigError([problem(recipe_file, "tokenizer.path", f"the tokenizer has {tokenizer.vocab_size} tokens but the "
                                   f"model's embedding only {recipe.model.arch.vocab_size} (model.arch.vocab_size)",
                                   section.path)])
    return tokenizer


def build(recipe: Recipe, recipe_file: str, note: Callable[[str], None] | None = None,
          bar: sources.Bar | None = None) -> Pipeline:
    """Everything needed to generate, from a resolved recipe; `bar` draws progress (fetching,
    converting, quantizing)."""
    rank = parallel.current()  # joined by the caller when parallel.world_size > 1
    if recipe.threads is not None and rank is None:
        torch.set_num_threads(recipe.threads)
    path = sources.prepare(recipe.model, recipe_file, note, bar=bar)
    tokenizer = build_tokenizer(recipe, recipe_file)
    model = load(path, recipe.model.arch, recipe.quant, recipe, recipe_file, tokenizer, note, shard=_sharder(rank),
                 bar=bar)
    draft_model = None
    if recipe.draft.kind is DraftKind.model:
        draft_path = sources.prepare(recipe.draft.model, recipe_file, note, key="draft.model", bar=bar)
        arch = recipe.draft.model.arch
        int4 = recipe.draft.quant.mode in (QuantMode.int4, QuantMode.int4_gptq)
        # A draft whose heads do not split over the ranks runs whole on each of them.
        splits = rank is not None and not tp_problems(arch, rank.world_size, recipe.draft.quant.groupsize if int4 else None)
        if rank is not None and not splits:
            (note or (lambda text: None))(f"draft: its heads do not split over {rank.world_size} ranks; "
                                          "each rank runs the whole draft model")
        draft_model = load(draft_path, arch, recipe.draft.quant, recipe, recipe_file, tokenizer,
                           note, key="draft", shard=_sharder(rank) if splits else None, bar=bar)
    for each in (model, draft_model):
        if each is not None:
            kernel_ops.apply(each, recipe.kernels, torch.device(recipe.device), recipe_file, note)
    forward = compile_step.apply(model, recipe.compile, recipe_file, note)
    # The draft model's steps are compiled as the target's are: its one-token steps are most of a round.
    draft_forward = compile_step.apply(draft_model, recipe.compile, recipe_file, note) if draft_model else None
    decoder = decoders.build(recipe, model, draft_model, forward, draft_forward)
    return Pipeline(recipe, tokenizer, model, decoder, forward, draft_forward)


def warm_up(pipeline: Pipeline, prompt: list[int]) -> float:
    """Compile the compiled steps on the real shapes before timing anything; returns the seconds it took."""
    steps = [f for f in (pipeline.forward, pipeline.draft_forward) if hasattr(f, "compile_seconds")]
    if not steps:
        return 0.0
    draft = pipeline.recipe.draft
    # A speculative round drafts speculate_k tokens: generate enough for one whole round.
    lookahead = draft.speculate_k if draft.kind is not DraftKind.none else 0
    pipeline.decoder.generate(prompt, min(2 + lookahead, pipeline.recipe.generate.max_new_tokens))
    return sum(f.compile_seconds for f in steps)


def _sharder(rank: parallel.Rank | None) -> Shard | None:
    if rank is None or rank.world_size == 1:
        return None
    return lambda model: sharders.shard(model, rank.rank, rank.world_size, torch.distributed.group.WORLD)


def load(path: Path, arch: ModelSpec, section: QuantSection, recipe: Recipe, recipe_file: str,
         tokenizer: Tokenizer, note: Callable[[str], None] | None = None, key: str = "model",
         shard: Shard | None = None, bar: sources.Bar | None = None) -> torch.nn.Module:
    """One model in the recipe's dtype on its device, quantized as `section` says (its KV cache
    too, once set up), and `shard`ed."""
    model = _load(path, arch, section, recipe, recipe_file, tokenizer, note, key, shard, bar)
    model.int8_cache = section.kv_cache is QuantKVCache.int8
    return model


def _load(path: Path, arch: ModelSpec, section: QuantSection, recipe: Recipe, recipe_file: str,
          tokenizer: Tokenizer, note: Callable[[str], None] | None, key: str, shard: Shard | None,
          bar: sources.Bar | None) -> torch.nn.Module:
    """load's model, before its cache is chosen.

    A checkpoint written by `runner quantize` is loaded as it is, and must have been quantized
    the way `section` says: never a silent mix of two quantizations. A float model to be used as
    it is, and any quantized checkpoint, is sharded while its tensors are still the checkpoint's
    memory map: each rank reads and copies only its share. A model quantized here is quantized
    whole, then sharded (sharded quantized weights are then exactly the unsharded ones).
    """
    say = note or (lambda text: None)
    quant_key = "quant" if key == "model" else f"{key}.quant"
    device, dtype = torch.device(recipe.device), transforms.torch_dtype(recipe)
    stored = loaders.stored_quant(path)
    if stored is not None:
        from runner import quant

        if quant.metadata(quant.from_metadata(stored)) != quant.metadata(_layout_of(section)):
            raise ConfigError([problem(recipe_file, f"{quant_key}.mode",
                                       f"{path} was quantized with {_describe(stored)}, but the recipe says "
                                       f"{_describe(quant.metadata(section))}; make them agree, or load the float checkpoint",
                                       section.mode.value)])
        layout = quant.from_metadata(stored)
        # The quantized checkpoint's skeleton: its layers' shapes, to load (and shard) it as it is.
        model = loaders.load_model(path, arch, device, dtype, lambda m: quant.quantized_skeleton(m, layout), shard)
        quant.pack_for(model, device)
        quant.use_activations(model, section)
        return model
    if section.mode is QuantMode.none:
        return loaders.load_model(path, arch, device, dtype, shard=shard)
    model = loaders.load_model(path, arch, device, dtype)
    from runner import quant

    before = quant.model_bytes(model)
    calibration = None
    if quant.needs_calibration(section):
        text = Path(section.calibration.path).read_text(encoding="utf-8", errors="replace")
        calibration = quant.calibration_tokens(tokenizer.encode(text, bos=False), section, recipe_file, quant_key)
    what = "GPTQ, layer by layer" if calibration is not None else "quantizing layers"
    progress = bar(f"{quant_key}: {what}") if bar else None
    model = transforms.apply(model, section, recipe_file, quant_key, calibration, progress)
    say(f"{key}: {section.mode.value} quantization: {before / 1e6:.1f} MB -> {quant.model_bytes(model) / 1e6:.1f} MB")
    return model if shard is None else shard(model)


def quantized_path(recipe: Recipe, recipe_file: str) -> Path:
    """Where `runner quantize` writes by default: beside model.checkpoint, named by mode and groupsize."""
    q = recipe.quant
    if q.mode is QuantMode.none:
        raise ConfigError([problem(recipe_file, "quant.mode", "is none: nothing to quantize; choose one of "
                                   + ", ".join(m.value for m in QuantMode if m is not QuantMode.none), "none")])
    group = f".g{q.groupsize}" if q.mode in (QuantMode.int4, QuantMode.int4_gptq) else ""
    return Path(recipe.model.checkpoint).with_name(f"model_{q.mode.value}{group}.pth")


def write_quantized(recipe: Recipe, recipe_file: str, out: Path, note: Callable[[str], None] | None = None,
                    bar: sources.Bar | None = None) -> None:
    """Quantize the recipe's model as its quant section says and save it, atomically, with that section inside."""
    from runner import checkpoint, quant

    path = sources.prepare(recipe.model, recipe_file, note, bar=bar)
    if loaders.stored_quant(path) is not None:
        raise ConfigError([problem(recipe_file, "model.checkpoint", "is already quantized; quantize the float checkpoint", str(path))])
    tokenizer = build_tokenizer(recipe, recipe_file)
    model = load(path, recipe.model.arch, recipe.quant, recipe, recipe_file, tokenizer, note, bar=bar)
    checkpoint.save(out, recipe.model.arch, model.state_dict(), quant=quant.metadata(recipe.quant))


def _layout_of(section: QuantSection) -> QuantSection:
    """The part of a quant section that decides the stored layout (not how it was calibrated)."""
    return QuantSection(mode=section.mode, groupsize=section.groupsize, output=section.output, embedding=section.embedding)


def _describe(meta: dict) -> str:
    group = f" groupsize {meta['groupsize']}" if meta["mode"].startswith("int4") else ""
    return f"quant.mode {meta['mode']}{group} (output {meta['output']}, embedding {meta['embedding']})"


def encode_prompt(pipeline: Pipeline, recipe_file: str, prompt: str | None = None) -> list[int]:
    """generate.prompt (or `prompt`) as token ids, through the chat template when generate.chat says so."""
    recipe = pipeline.recipe
    prompt = recipe.generate.prompt if prompt is None else prompt
    if recipe.generate.chat:
        # The template writes any BOS itself, and its special-token text must become special tokens.
        text = render_chat(pipeline.tokenizer, prompt, recipe_file, recipe.generate.system)
        ids = pipeline.tokenizer.encode(text, bos=False, allow_special=True)
    else:
        ids = pipeline.tokenizer.encode(prompt, bos=True)
    return fit_prompt(pipeline, ids, recipe_file)


def fit_prompt(pipeline: Pipeline, ids: list[int], recipe_file: str) -> list[int]:
    """Check that prompt `ids` and the new tokens fit the cache, and size the cache for them once."""
    recipe = pipeline.recipe
    limit = recipe.generate.cache_len or recipe.model.arch.max_seq_len
    # A speculative round writes speculate_k positions past the last accepted token.
    lookahead = recipe.draft.speculate_k if recipe.draft.kind is not DraftKind.none else 0
    if len(ids) + recipe.generate.max_new_tokens + lookahead > limit:
        which = "generate.cache_len" if recipe.generate.cache_len else "model.arch.max_seq_len"
        extra = f" + draft.speculate_k={lookahead}" if lookahead else ""
        raise ConfigError([problem(recipe_file, "generate.prompt",
                                   f"is {len(ids)} tokens; with generate.max_new_tokens={recipe.generate.max_new_tokens}"
                                   f"{extra} that exceeds {which}={limit}; shorten the prompt or lower max_new_tokens")])
    if pipeline.decoder.cache_len is None:
        # One size for the warm-up and every sample, so compiled steps never see a new cache shape.
        pipeline.decoder.cache_len = len(ids) + recipe.generate.max_new_tokens + lookahead
    return ids


def generate(pipeline: Pipeline, prompt: list[int], on_token: Callable[[int], bool | None] | None = None,
             sample_index: int = 0) -> tuple[list[int], Stats]:
    """One sample; sample i is seeded with generate.seed + i so each is reproducible on its own.
    on_token(id) sees each new token; when it returns True, generation ends there."""
    g = pipeline.recipe.generate
    generator = torch.Generator(pipeline.decoder.device).manual_seed(g.seed + sample_index)
    eos = pipeline.tokenizer.eos_ids
    return pipeline.decoder.generate(prompt, g.max_new_tokens, eos, generator, on_token)


MAX_BATCH = MAX_ROWS  # rows decoded together at most: what runner's GEMV kernels take; more wait their turn


def generate_batch(pipeline: Pipeline, prompts: list[list[int]], on_token: Callable[[int, int], bool | None] | None = None
                   ) -> tuple[list[list[int]], Stats]:
    """Every prompt's generate.num_samples samples decoded together as rows of one batch; sample j
    of each prompt is seeded with generate.seed + j, as generate() seeds it, so a row draws what it
    would alone. on_token(sequence, id) sees each new token (sequence: prompt i's sample j is
    i * num_samples + j); True ends that sequence. Returns each sequence's tokens and the batch's
    aggregate statistics."""
    g, eos = pipeline.recipe.generate, pipeline.tokenizer.eos_ids
    sequences = [(ids, j) for ids in prompts for j in range(g.num_samples)]
    cache_len = g.cache_len or max(len(ids) for ids in prompts) + g.max_new_tokens
    decoder = BatchDecoder(pipeline.model, min(len(sequences), MAX_BATCH), cache_len, pipeline.forward)
    out: list[list[int]] = [[] for _ in sequences]
    owner: dict[int, int] = {}  # slot -> sequence
    waiting = list(range(len(sequences)))
    sampling = decoders.sampling_of(pipeline.recipe)
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
            slot, token = decoder.start(ids, sampling, g.seed + sample)
            owner[slot] = index
            first = first or time.perf_counter()
            take(index, slot, token.id)
        for slot, token in decoder.step().items():
            take(owner[slot], slot, token.id)
    end = time.perf_counter()
    stats = Stats(prompt_tokens=sum(len(ids) for ids, _ in sequences), new_tokens=sum(map(len, out)),
                  time_to_first_token=(first or end) - start, decode_seconds=end - (first or end),
                  peak_memory_bytes=peak_memory(decoder.device))
    return out, stats
