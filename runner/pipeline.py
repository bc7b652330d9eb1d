"""The whole flow from a resolved recipe: load -> weight transforms -> shard -> decoder.

runner.recipes resolves the recipe before this; runner.generate (and chat, eval, serve) generate
with what build() returns.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from dataclasses import dataclass
from typing import Callable

import torch

from runner import decoders, loaders, parallel, sharders, sources, tokenizers, transforms
from runner.transforms.compile import compiled_forward
from runner.transforms.runner_ops import use_runner_ops
from runner.config.errors import ConfigError, problem
from runner.config.schema import DraftKind, ModelSection, ModelSpec, QuantKVCache, QuantMode, QuantSection, Recipe, TokenizerKind, tp_problems
from runner.decoders import Decoder, Forward, threads
from runner.decoders.grammar import Grammar, GrammarTokenizer
from runner.tokenizers.base import Tokenizer


@dataclass
class Pipeline:
    recipe: Recipe
    tokenizer: Tokenizer
    model: torch.nn.Module
    decoder: Decoder
    forward: Forward | None = None  # the model, or its compiled steps (the decoder may call them at adaptive threads)
    draft_forward: Forward | None = None  # what the draft model's proposer calls, likewise
    grammar: Grammar | None = None  # generate.json_schema compiled: each sequence draws only what it allows


# The file a source directory (an HF snapshot) holds for each tokenizer kind.
TOKENIZER_FILES = {TokenizerKind.sentencepiece: "tokenizer.model", TokenizerKind.tiktoken: "original/tokenizer.model",
                   TokenizerKind.hf: "tokenizer.json", TokenizerKind.gguf: ""}


def build_tokenizer(recipe: Recipe, recipe_path: str) -> Tokenizer:
    """The recipe's tokenizer; with no tokenizer.path, the one the model's source carries."""
    section = recipe.tokenizer
    if section.path is None:
        carrier = sources.source_file(recipe.model, recipe_path, TOKENIZER_FILES[section.kind])
        if carrier is None:
            raise ConfigError([problem(recipe_path, "tokenizer.path", "is required when model.source carries no tokenizer")])
        section = dataclasses.replace(section, path=str(carrier))
    tokenizer = tokenizers.build(section, recipe_path)
    if tokenizer.vocab_size > recipe.model.arch.vocab_size:
        raise ConfigError([problem(recipe_path, "tokenizer.path", f"the tokenizer has {tokenizer.vocab_size} tokens but the "
                                   f"model's embedding only {recipe.model.arch.vocab_size} (model.arch.vocab_size)",
                                   section.path)])
    return tokenizer


def build(recipe: Recipe, recipe_path: str, note: Callable[[str], None] | None = None,
          bar: sources.Bar | None = None, rank: parallel.Rank | None = None) -> Pipeline:
    """Everything needed to generate, from a resolved recipe; `bar` draws progress (fetching,
    converting, quantizing). Under tensor parallelism `rank` is this process's joined rank, and
    the models are sharded over its group."""
    # threads: null starts at torch's own count, whatever an earlier pipeline in this process set
    # (its decode steps adapt it below). A tensor-parallel rank has its share already (runner.parallel).
    cores = threads.default_count()  # asked before any count is set
    if rank is None:
        torch.set_num_threads(recipe.threads or cores)
    path = model_path(recipe.model, recipe.quant, recipe_path, note, bar=bar)
    tokenizer = build_tokenizer(recipe, recipe_path)
    model = load(path, recipe.model.arch, recipe.quant, recipe, recipe_path, tokenizer, note, rank=rank, bar=bar)
    draft_model = None
    if recipe.draft.kind is DraftKind.model:
        draft_path = model_path(recipe.draft.model, recipe.draft.quant, recipe_path, note, key="draft.model", bar=bar)
        arch = recipe.draft.model.arch
        int4 = recipe.draft.quant.mode.is_int4
        # A draft whose heads do not split over the ranks runs whole on each of them.
        splits = rank is not None and not tp_problems(arch, rank.world_size, recipe.draft.quant.groupsize if int4 else None)
        if rank is not None and not splits:
            (note or (lambda text: None))(f"draft: its heads do not split over {rank.world_size} ranks; "
                                          "each rank runs the whole draft model")
        draft_model = load(draft_path, arch, recipe.draft.quant, recipe, recipe_path, tokenizer,
                           note, key="draft", rank=rank if splits else None, bar=bar)
    for each in (model, draft_model):
        if each is not None:
            use_runner_ops(each, recipe.kernels, torch.device(recipe.device), recipe_path, note)
    forward = compiled_forward(model, recipe.compile, recipe_path, note)
    # The draft model's steps are compiled as the target's are: its one-token steps are most of a round.
    draft_forward = compiled_forward(draft_model, recipe.compile, recipe_path, note) if draft_model else None
    steps, draft_steps = forward, draft_forward
    compiled = recipe.compile.decode or recipe.compile.prefill
    if recipe.threads is None and torch.device(recipe.device).type == "cpu" and rank is None and not compiled:
        # threads: null on the CPU: the decode steps run at the thread count the load allows. Not
        # under compile: a compiled step is guarded on the thread count, so each change recompiles it.
        steps = threads.adaptive(forward)
        draft_steps = None if draft_forward is None else threads.adaptive(draft_forward)
    grammar = json_grammar(recipe, recipe_path, tokenizer, model.spec.vocab_size)
    decoder = decoders.build(recipe, model, draft_model, steps, draft_steps, grammar)
    return Pipeline(recipe, tokenizer, model, decoder, forward, draft_forward, grammar)


def json_grammar(recipe: Recipe, recipe_path: str, tokenizer: Tokenizer, vocab_size: int) -> Grammar | None:
    """generate.json_schema compiled for the tokenizer and the model's logits, or None when unset."""
    schema = recipe.generate.json_schema
    if schema is None:
        return None
    try:
        return Grammar.from_json_schema(schema, GrammarTokenizer(tokenizer, vocab_size))
    except ValueError as e:
        raise ConfigError([problem(recipe_path, "generate.json_schema", str(e), schema)]) from None


def model_path(model: ModelSection, section: QuantSection, recipe_path: str, note: Callable[[str], None] | None = None,
               key: str = "model", bar: sources.Bar | None = None) -> Path:
    """What to load the model from: its native checkpoint (prepared from model.source where it is
    missing), or under quant.mode gguf the GGUF file itself."""
    if section.mode is QuantMode.gguf:
        return sources.gguf_file(model, recipe_path, note, key=key, bar=bar)
    return sources.prepare(model, recipe_path, note, key=key, bar=bar)


def load(path: Path, arch: ModelSpec, section: QuantSection, recipe: Recipe, recipe_path: str,
         tokenizer: Tokenizer, note: Callable[[str], None] | None = None, key: str = "model",
         rank: parallel.Rank | None = None, bar: sources.Bar | None = None) -> torch.nn.Module:
    """One model in the recipe's dtype on its device, quantized as `section` says (its KV cache
    too, once set up), and sharded over `rank`'s group when given."""
    model = _load(path, arch, section, recipe, recipe_path, tokenizer, note, key, rank, bar)
    model.int8_cache = section.kv_cache is QuantKVCache.int8
    return model


def _load(path: Path, arch: ModelSpec, section: QuantSection, recipe: Recipe, recipe_path: str,
          tokenizer: Tokenizer, note: Callable[[str], None] | None, key: str, rank: parallel.Rank | None,
          bar: sources.Bar | None) -> torch.nn.Module:
    """load's model, before its cache is chosen.

    A checkpoint written by `runner quantize` is loaded as it is, and must have been quantized
    the way `section` says: never a silent mix of two quantizations. A float model to be used as
    it is, and any quantized checkpoint, is sharded while its tensors are still the checkpoint's
    memory map, and only then copied to the device and dtype: each rank reads and copies only
    its share. A model quantized here is quantized whole, then sharded (sharded quantized weights
    are then exactly the unsharded ones).
    """
    say = note or (lambda text: None)
    quant_key = "quant" if key == "model" else f"{key}.quant"
    device, dtype = torch.device(recipe.device), transforms.torch_dtype(recipe)
    plan = None if rank is None else sharders.plan(arch, rank.world_size)

    def shard(model: torch.nn.Module) -> torch.nn.Module:
        return model if plan is None else sharders.shard(model, plan, rank)

    def place(model: torch.nn.Module) -> torch.nn.Module:
        return model.to(device=device, dtype=dtype).eval()

    if section.mode is QuantMode.gguf:  # the file's blocks as they are, never quantized again
        from runner import quant
        from runner.quant import gguf_model

        try:
            model = place(shard(gguf_model.read(path, arch)))
        except ValueError as e:  # a split through a block: which world sizes work depends on the file's types
            raise ConfigError([problem(recipe_path, "parallel.world_size", f"{e}; choose a world size whose shares "
                                       "keep whole blocks", rank.world_size if rank else 1)]) from None
        quant.pack_for(model, device)
        quant.use_activations(model, section)
        say(f"{key}: GGUF blocks as stored: {quant.model_bytes(model) / 1e6:.1f} MB")
        return model
    stored = loaders.stored_quant(path)
    if stored is not None:
        from runner import quant

        if quant.metadata(quant.from_metadata(stored)) != quant.metadata(_layout_of(section)):
            raise ConfigError([problem(recipe_path, f"{quant_key}.mode",
                                       f"{path} was quantized with {_describe(stored)}, but the recipe says "
                                       f"{_describe(quant.metadata(section))}; make them agree, or load the float checkpoint",
                                       section.mode.value)])
        layout = quant.from_metadata(stored)
        # The quantized checkpoint's skeleton: its layers' shapes, to load (and shard) it as it is.
        model = place(shard(loaders.read_model(path, arch, lambda m: quant.quantized_skeleton(m, layout))))
        quant.pack_for(model, device)
        quant.use_activations(model, section)
        return model
    if section.mode is QuantMode.none:
        return place(shard(loaders.read_model(path, arch)))
    model = place(loaders.read_model(path, arch))
    from runner import quant

    before = quant.model_bytes(model)
    calibration = None
    if quant.needs_calibration(section):
        text = Path(section.calibration.path).read_text(encoding="utf-8", errors="replace")
        calibration = quant.calibration_tokens(tokenizer.encode(text, bos=False), section, recipe_path, quant_key)
    what = "GPTQ, layer by layer" if calibration is not None else "quantizing layers"
    progress = bar(f"{quant_key}: {what}") if bar else None
    model = transforms.quantize(model, section, recipe_path, quant_key, calibration, progress)
    say(f"{key}: {section.mode.value} quantization: {before / 1e6:.1f} MB -> {quant.model_bytes(model) / 1e6:.1f} MB")
    return shard(model)


def quantized_path(recipe: Recipe, recipe_path: str) -> Path:
    """Where `runner quantize` writes by default: beside model.checkpoint, named by mode and groupsize."""
    q = recipe.quant
    if q.mode is QuantMode.none:
        raise ConfigError([problem(recipe_path, "quant.mode", "is none: nothing to quantize; choose one of "
                                   + ", ".join(m.value for m in QuantMode if m is not QuantMode.none), "none")])
    group = f".g{q.groupsize}" if q.mode.is_int4 else ""
    return Path(recipe.model.checkpoint).with_name(f"model_{q.mode.value}{group}.pth")


def write_quantized(recipe: Recipe, recipe_path: str, out: Path, note: Callable[[str], None] | None = None,
                    bar: sources.Bar | None = None) -> None:
    """Quantize the recipe's model as its quant section says and save it, atomically, with that section inside."""
    from runner import checkpoint, quant

    path = model_path(recipe.model, recipe.quant, recipe_path, note, bar=bar)
    if recipe.quant.mode is not QuantMode.gguf and loaders.stored_quant(path) is not None:
        raise ConfigError([problem(recipe_path, "model.checkpoint", "is already quantized; quantize the float checkpoint", str(path))])
    tokenizer = build_tokenizer(recipe, recipe_path)
    model = load(path, recipe.model.arch, recipe.quant, recipe, recipe_path, tokenizer, note, bar=bar)
    checkpoint.save(out, recipe.model.arch, model.state_dict(), quant=quant.metadata(recipe.quant))


def _layout_of(section: QuantSection) -> QuantSection:
    """The part of a quant section that decides the stored layout (not how it was calibrated)."""
    return QuantSection(mode=section.mode, groupsize=section.groupsize, output=section.output, embedding=section.embedding)


def _describe(meta: dict) -> str:
    group = f" groupsize {meta['groupsize']}" if QuantMode(meta["mode"]).is_int4 else ""
    return f"quant.mode {meta['mode']}{group} (output {meta['output']}, embedding {meta['embedding']})"


def prepare(recipe: Recipe, recipe_path: str, note: Callable[[str], None] | None = None,
            bar: sources.Bar | None = None) -> list[tuple[str, bool]]:
    """Fetch and convert the recipe's model (and a draft model of its own) to their native
    checkpoints where they are not yet: (checkpoint, whether it was prepared now) for each."""
    models = {"model": recipe.model}
    if recipe.draft.model is not None and recipe.draft.model.checkpoint != recipe.model.checkpoint:
        models["draft.model"] = recipe.draft.model
    done = []
    for key, model in models.items():
        fetched = not Path(model.checkpoint).exists()
        if fetched:
            sources.prepare(model, recipe_path, note, key=key, explicit=True, bar=bar)
        done.append((model.checkpoint, fetched))
    return done
