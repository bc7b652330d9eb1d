"""Timing one recipe: build its pipeline, warm it up, time greedy generations of one prompt or
of prompts of several lengths, in turn."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from runner import generate, parallel, pipeline
from runner.bench.figures import Figures
from runner.config.schema import Recipe


# English prose to cut long prompts from (--prompt-tokens): what a chat history or a retrieved
# document looks like to a tokenizer, unlike one token repeated.
FILLER = (
    "The history of the printing press begins long before Gutenberg. Carved wooden blocks were used in "
    "China to print text and images on cloth and paper, and movable type made of baked clay appeared in "
    "the eleventh century. What changed in Mainz around 1450 was the combination of a hand mould for "
    "casting metal type quickly and in quantity, an oil-based ink that held to metal, and a screw press "
    "adapted from the ones used to make wine and oil. Within fifty years, presses were at work in more "
    "than two hundred European towns, and the price of a book had fallen so far that students, merchants "
    "and craftsmen could own several. Scholars still argue about how much of the Reformation, the "
    "scientific revolution and the rise of vernacular literature follows from this, but few doubt that "
    "cheap, identical copies changed how knowledge was kept, checked and argued over. "
)


def long_prompt(built: pipeline.Pipeline, tokens: int) -> list[int]:
    """A prompt of exactly `tokens` tokens (BOS first) cut from English prose."""
    text, ids = FILLER, []
    while len(ids) < tokens:
        ids = built.tokenizer.encode(text, bos=True)
        text += FILLER
    return ids[:tokens]


def measure(recipe: Recipe, recipe_path: str, label: str, runs: int, new_tokens: int, note=None,
            prompt_tokens: Sequence[int] = (), bar=None, rank: parallel.Rank | None = None
            ) -> tuple[list[Figures], pipeline.Pipeline, list[list[int]]]:
    """Build the recipe's pipeline, warm it up, then time `runs` greedy-or-sampled generations of
    the recipe's prompt, or of a prompt of each length in `prompt_tokens`: one Figures (and prompt)
    each. Several lengths take their runs in turn, a run of each per round, so that a long prompt
    and a short one are timed over the same minutes of a machine whose speed drifts."""
    built = pipeline.build(recipe, recipe_path, note, bar, rank=rank)
    # Fitted longest first: the first sets the cache's size, which every length then shares.
    cut = {n: long_prompt(built, n) for n in prompt_tokens}
    for n in sorted(cut, reverse=True):
        generate.fit_prompt(built, cut[n], recipe_path)
    prompts = [cut[n] for n in prompt_tokens] or [generate.encode_prompt(built, recipe_path)]
    rows = [Figures(f"{label} @{len(p)}" if len(prompts) > 1 else label, prompt_tokens=len(p)) for p in prompts]
    compiled = 0.0  # seconds, so far: warm_up reports the compiled steps' total
    for figures, prompt in zip(rows, prompts):
        total = generate.warm_up(built, prompt)
        figures.compile_seconds, compiled = total - compiled, total
        if not total:
            generate.generate(built, prompt)  # warm caches and allocator
    show = bar(f"bench: {label}: timed runs") if bar else (lambda done, total: None)
    for i in range(runs):
        for figures, prompt in zip(rows, prompts):
            _, stats = generate.generate(built, prompt, sample_index=i)
            figures.decode_tokens_per_s.append(stats.tokens_per_second)
            figures.time_to_first_token_s.append(stats.time_to_first_token)
            figures.prefill_tokens_per_s.append(stats.prompt_tokens / stats.time_to_first_token)
            figures.peak_memory_bytes = max(figures.peak_memory_bytes, stats.peak_memory_bytes)
        show(i + 1, runs)
    model_bytes, bytes_per_token = weight_bytes(built.model)
    matmul_params = sum(m.in_features * m.out_features for m in built.model.modules()
                        if hasattr(m, "in_features") and hasattr(m, "out_features"))
    for figures in rows:
        figures.model_bytes, figures.bytes_per_token, figures.matmul_params = model_bytes, bytes_per_token, matmul_params
    return rows, built, prompts


def weight_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes the model holds, bytes one decode step reads): the embedding table is read one row
    per token, unless the output layer reads it whole (tied embeddings); of a mixture of experts'
    stacked experts a token reads the n_experts_per_token it is routed to."""
    from runner.quant.model import unique_tensors

    tensors = unique_tensors(model)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    spec = model.spec
    experts = sum(t.numel() * t.element_size() for name, t in tensors.items() if ".experts." in name)
    unread = experts - experts * spec.n_experts_per_token // spec.n_experts if spec.moe else 0
    # the embedding's table: a float weight, or a GGUF layer's blocks (which a tied output layer shares)
    embedding = getattr(model.tok_embeddings, "weight", None)
    embedding = embedding if embedding is not None else model.tok_embeddings.blocks0
    head = None if model.output is None else getattr(model.output, "weight", getattr(model.output, "blocks0", None))
    tied = head is None or head.untyped_storage().data_ptr() == embedding.untyped_storage().data_ptr()
    return total, total - unread - (0 if tied else embedding.numel() * embedding.element_size())


def on_rank(rank: parallel.Rank | None, recipe: Recipe, recipe_path: str, label: str, runs: int, new_tokens: int,
            prompt_tokens: Sequence[int]) -> list[Figures]:
    """One recipe's figures (one per prompt length), measured on this rank (every rank of a
    tensor-parallel run times the same steps)."""
    from runner.report import Reporter

    report = Reporter(rank=rank.rank if rank else 0)
    timed, _, _ = measure(recipe, recipe_path, label, runs, new_tokens, report.note, prompt_tokens, report.progress,
                          rank)
    return timed
