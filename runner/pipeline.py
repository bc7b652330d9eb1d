"""The whole flow: resolve -> load -> weight transforms -> shard -> decoder -> generate -> report."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

from runner import decoders, loaders, sources, tokenizers, transforms
from runner.config.errors import ConfigError, problem
from runner.config.schema import Recipe
from runner.decoders.stats import Stats
from runner.tokenizers.base import Tokenizer
from runner.tokenizers.chat import render_chat


@dataclass
class Pipeline:
    recipe: Recipe
    tokenizer: Tokenizer
    model: torch.nn.Module
    decoder: object


def build_tokenizer(recipe: Recipe, recipe_file: str) -> Tokenizer:
    """The recipe's tokenizer; with no tokenizer.path, the one the model's source carries."""
    section = recipe.tokenizer
    if section.path is None:
        carrier = sources.source_file(recipe.model, recipe_file)
        if carrier is None:
            raise ConfigError([problem(recipe_file, "tokenizer.path", "is required when model.source carries no tokenizer")])
        section = dataclasses.replace(section, path=str(carrier))
    tokenizer = tokenizers.build(section, recipe_file)
    if tokenizer.vocab_size > recipe.model.arch.vocab_size:
        raise ConfigError([problem(recipe_file, "tokenizer.path", f"the tokenizer has {tokenizer.vocab_size} tokens but the "
                                   f"model's embedding only {recipe.model.arch.vocab_size} (model.arch.vocab_size)",
                                   section.path)])
    return tokenizer


def build(recipe: Recipe, recipe_file: str, progress: Callable | None = None) -> Pipeline:
    """Everything needed to generate, from a resolved recipe."""
    if recipe.threads is not None:
        torch.set_num_threads(recipe.threads)
    device = torch.device(recipe.device)
    path = sources.prepare(recipe.model, recipe_file, progress)
    tokenizer = build_tokenizer(recipe, recipe_file)
    model = loaders.load_model(path, recipe.model.arch, device, transforms.torch_dtype(recipe))
    model = transforms.apply(model, recipe, recipe_file)
    # Sharding (parallel.world_size > 1) plugs in here; resolve refuses it for now.
    return Pipeline(recipe, tokenizer, model, decoders.build(recipe, model))


def encode_prompt(pipeline: Pipeline, recipe_file: str) -> list[int]:
    recipe = pipeline.recipe
    if recipe.generate.chat:
        # The template writes any BOS itself, and its special-token text must become special tokens.
        text = render_chat(pipeline.tokenizer, recipe.generate.prompt, recipe_file)
        ids = pipeline.tokenizer.encode(text, bos=False, allow_special=True)
    else:
        ids = pipeline.tokenizer.encode(recipe.generate.prompt, bos=True)
    limit = recipe.generate.cache_len or recipe.model.arch.max_seq_len
    if len(ids) + recipe.generate.max_new_tokens > limit:
        which = "generate.cache_len" if recipe.generate.cache_len else "model.arch.max_seq_len"
        raise ConfigError([problem(recipe_file, "generate.prompt",
                                   f"is {len(ids)} tokens; with generate.max_new_tokens={recipe.generate.max_new_tokens} "
                                   f"that exceeds {which}={limit}; shorten the prompt or lower max_new_tokens")])
    return ids


def generate(pipeline: Pipeline, prompt: list[int], on_token: Callable[[int], None] | None = None,
             sample_index: int = 0) -> tuple[list[int], Stats]:
    """One sample; sample i is seeded with generate.seed + i so each is reproducible on its own."""
    g = pipeline.recipe.generate
    generator = torch.Generator(pipeline.decoder.device).manual_seed(g.seed + sample_index)
    eos = pipeline.tokenizer.eos_ids
    return pipeline.decoder.generate(prompt, g.max_new_tokens, eos, generator, on_token)
