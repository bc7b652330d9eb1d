"""Speculative decoding against plain decoding, on SmolLM2-135M by default.

    python benchmarks/speculative.py [--json OUT.json] [--md OUT.md] [options]

The target is the recipe's float model. Proposers: the same checkpoint quantized as a draft
model (draft.kind=model, draft.model=${model}, draft.quant.*), and prompt lookup
(draft.kind=ngram). Two chat prompts: prose (the recipe's own prompt) and a code edit whose
answer copies a 20-line function from the prompt, where n-gram drafting should shine.

Greedy, EOS ignored so every run makes --new-tokens tokens. The target and each draft model
are loaded once per dtype and shared by every decoder. Each (configuration, prompt) is warmed
up once (--warmup-tokens), then --runs rounds run every configuration in turn (interleaved,
so a load spike on a shared machine hits all alike); tokens/s is new tokens over the wall time
of decoder.generate (prefill included, the same prompt for all), median over the rounds;
speedup is over plain decoding of the same prompt, measured in the same rounds.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from runner import decoders, pipeline, sources  # noqa: E402
from runner.tokenizers.chat import render_chat  # noqa: E402
from runner.transforms.runner_ops import use_runner_ops  # noqa: E402

FUNCTION = '''def summarize(records, key):
    """Return count, mean, min and max of one numeric field."""
    total = 0
    count = 0
    smallest = None
    largest = None
    for record in records:
        value = record.get(key)
        if value is None:
            continue
        total += value
        count += 1
        if smallest is None or value < smallest:
            smallest = value
        if largest is None or value > largest:
            largest = value
    if count == 0:
        return {"count": 0, "mean": None, "min": None, "max": None}
    mean = total / count
    return {"count": count, "mean": mean, "min": smallest, "max": largest}
'''
CODE_PROMPT = ("Here is a Python function:\n\n```python\n" + FUNCTION + "```\n\nRewrite it with the variable `total` "
               "renamed to `running_sum`. Keep every other line exactly the same and print the complete function.")

# label -> draft.quant overrides of a draft model (the checkpoint of the target itself)
DRAFT_MODELS = {
    "int8": ["draft.quant.mode=int8"],
    "int4 g32": ["draft.quant.mode=int4", "draft.quant.groupsize=32"],
    "int4 g32 + int8 output": ["draft.quant.mode=int4", "draft.quant.groupsize=32", "draft.quant.output=int8"],
}


@dataclass
class Config:
    label: str  # "plain", "draft int8", "ngram", "int8 alone" ...
    k: int | None
    decoder: object
    alone: bool = False  # a draft model decoding by itself (its cost, for reference)

    @property
    def name(self) -> str:
        return self.label if self.k is None else f"{self.label}, k={self.k}"


@dataclass
class Cell:
    """One (configuration, prompt): its rounds and what the decoder reported."""

    rates: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    acceptance: float = float("nan")
    per_forward: float = float("nan")
    drafted_per_round: float = float("nan")
    accepted_histogram: list[int] = field(default_factory=list)


def build_configs(args, recipe_path: Path, dtype: str) -> tuple[list[Config], object]:
    base = [f"dtype={dtype}", f"threads={args.threads}", "generate.temperature=0"]
    plain_recipe = common.recipe(base + ["draft.kind=none"], recipe_path)
    common.note(f"{dtype}: loading the target")
    target = pipeline.build(plain_recipe, str(recipe_path))
    configs = [Config("plain", None, decoders.build(plain_recipe, target.model))]
    for label, quant in DRAFT_MODELS.items():
        if label not in args.drafts:
            continue
        draft = ["draft.kind=model", "draft.model=${model}"] + quant
        r = common.recipe(base + draft, recipe_path)
        common.note(f"{dtype}: loading draft {label}")
        path = sources.prepare(r.draft.model, str(recipe_path))
        model = pipeline.load(path, r.draft.model.arch, r.draft.quant, r, str(recipe_path), target.tokenizer, key="draft")
        use_runner_ops(model, r.kernels, torch.device(r.device), str(recipe_path))  # as pipeline.build does
        for k in args.k_model:
            rk = common.recipe(base + draft + [f"draft.speculate_k={k}"], recipe_path)
            configs.append(Config(f"draft {label}", k, decoders.build(rk, target.model, model)))
        if args.draft_alone:
            configs.append(Config(f"{label} alone", None, decoders.build(plain_recipe, model), alone=True))
    if "ngram" in args.drafts:
        for k in args.k_ngram:
            r = common.recipe(base + ["draft.kind=ngram", f"draft.speculate_k={k}", f"draft.ngram.max_n={args.ngram_max_n}",
                                      f"draft.ngram.min_n={args.ngram_min_n}"], recipe_path)
            configs.append(Config(f"ngram {args.ngram_min_n}..{args.ngram_max_n}", k, decoders.build(r, target.model)))
    return configs, target


def measure(args, configs: list[Config], prompts: dict[str, list[int]]) -> dict[tuple[str, str], Cell]:
    cells = {(c.name, p): Cell() for c in configs for p in prompts}
    for c in configs:
        for ids in prompts.values():
            c.decoder.generate(ids, args.warmup_tokens, frozenset())
    for r in range(args.runs):
        for pname, ids in prompts.items():
            for c in configs:
                if c.alone and pname != "prose":
                    continue
                t = time.perf_counter()
                out, stats = c.decoder.generate(ids, args.new_tokens, frozenset())
                wall = time.perf_counter() - t
                cell = cells[c.name, pname]
                cell.rates.append(len(out) / wall)
                cell.tokens = out
                spec = stats.speculative
                if spec is not None:
                    cell.acceptance = spec.acceptance_rate
                    cell.per_forward = stats.new_tokens / spec.target_forwards
                    cell.drafted_per_round = spec.proposed / spec.target_forwards
                    cell.accepted_histogram = spec.histogram()
            plain = common.median(cells["plain", pname].rates)
            common.note(f"  round {r + 1}/{args.runs}, {pname}: " + ", ".join(
                f"{c.name} {cells[c.name, pname].rates[-1] / plain:.2f}x" for c in configs if cells[c.name, pname].rates))
    return cells


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default=str(common.RECIPE))
    ap.add_argument("--dtypes", default="bfloat16", help="comma-separated: bfloat16, float32")
    ap.add_argument("--drafts", default=",".join(list(DRAFT_MODELS) + ["ngram"]),
                    help=f"comma-separated subset of: {', '.join(DRAFT_MODELS)}, ngram")
    ap.add_argument("--k-model", default="2,4", help="draft.speculate_k values for draft models")
    ap.add_argument("--k-ngram", default="4,8", help="draft.speculate_k values for ngram drafting")
    ap.add_argument("--ngram-max-n", type=int, default=3)
    ap.add_argument("--ngram-min-n", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--warmup-tokens", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-draft-alone", dest="draft_alone", action="store_false",
                    help="skip timing each draft model decoding alone (prose prompt)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    ap.add_argument("--md")
    args = ap.parse_args()
    args.drafts = [d.strip() for d in args.drafts.split(",")]
    unknown = set(args.drafts) - set(DRAFT_MODELS) - {"ngram"}
    if unknown:
        raise SystemExit(f"unknown --drafts {', '.join(sorted(unknown))}; choose from: {', '.join(DRAFT_MODELS)}, ngram")
    args.k_model = [int(k) for k in args.k_model.split(",") if k]
    args.k_ngram = [int(k) for k in args.k_ngram.split(",") if k]
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    info = common.machine()
    recipe_path = Path(args.recipe)

    data = {"machine": info, "command": " ".join(sys.argv), "args": vars(args), "dtypes": {}}
    sections = []
    for dtype in args.dtypes.split(","):
        configs, target = build_configs(args, recipe_path, dtype)
        tok = target.tokenizer
        texts = {"prose": target.recipe.generate.prompt, "code edit": CODE_PROMPT}
        prompts = {name: tok.encode(render_chat(tok, text, str(recipe_path)), bos=False, allow_special=True)
                   for name, text in texts.items()}
        common.note(f"{dtype}: {len(configs)} configurations x {len(prompts)} prompts x {args.runs} runs")
        cells = measure(args, configs, prompts)
        rows, records = [], []
        for pname in prompts:
            plain = cells["plain", pname]
            base = common.median(plain.rates)
            for c in configs:
                cell = cells[c.name, pname]
                if not cell.rates:
                    continue
                rate = common.median(cell.rates)
                same = None if c.alone else common.common_prefix(cell.tokens, plain.tokens)
                rows.append([pname, c.name, common.fmt(cell.acceptance, ".1%"), common.fmt(cell.drafted_per_round, ".2f"),
                             common.fmt(cell.per_forward, ".2f"), f"{rate:.1f}", f"{rate / base:.2f}",
                             "-" if same is None else f"{same}/{len(plain.tokens)}"])
                records.append({"prompt": pname, "config": c.label, "k": c.k, "draft_alone": c.alone,
                                "acceptance_rate": cell.acceptance, "drafted_per_round": cell.drafted_per_round,
                                "tokens_per_target_forward": cell.per_forward, "accepted_histogram": cell.accepted_histogram,
                                "tokens_per_second_runs": cell.rates, "tokens_per_second": rate, "speedup": rate / base,
                                "tokens_equal_to_plain": same})
        header = ["prompt", "configuration", "acceptance", "drafted / round", "tokens / target forward", "tokens/s",
                  "x plain", "greedy = plain"]
        sections += [f"## Target {dtype}", ""] + common.table(header, rows) + [""]
        sections += ["Prompt tokens: " + ", ".join(f"{n} {len(ids)}" for n, ids in prompts.items()) +
                     ". What plain greedy decoding wrote (first 400 characters):", ""]
        for pname in prompts:
            text = tok.decode(cells["plain", pname].tokens)[:400].replace("```", "'''")
            sections += [f"{pname}:", "", "```", text, "```", ""]
        data["dtypes"][dtype] = {"prompt_tokens": {n: len(ids) for n, ids in prompts.items()}, "rows": records,
                                 "plain_text": {p: tok.decode(cells["plain", p].tokens) for p in prompts}}
        del configs, target, cells

    info["load_average_end"] = common.load_average()
    seconds = time.perf_counter() - start
    data["seconds"] = seconds
    md = ["# Speculative decoding: draft models and n-gram lookup against plain decoding", "",
          f"Recipe `{args.recipe}`; `python {' '.join(sys.argv)}`.", ""]
    md += common.machine_lines(info) + [""]
    md += [f"{seconds / 60:.1f} min in all. Greedy, {args.new_tokens} new tokens (EOS ignored), torch threads = "
           f"{args.threads} (a shared 2-core machine makes 2-thread timings unreliable); median of {args.runs} interleaved "
           f"runs after a {args.warmup_tokens}-token warm-up; tokens/s = new tokens / wall time of generate() "
           "(prefill included).", "",
           "- acceptance: accepted / proposed draft tokens; drafted / round: proposed tokens per target forward (below k "
           "when n-gram lookup finds no match, or near the end); tokens / target forward: new tokens / verify forwards.",
           "- draft models are the target's own checkpoint quantized (draft.model=${model}); the output layer stays "
           "float unless '+ int8 output' (draft.quant.output=int8, which unties it from the embedding).",
           "- 'X alone': that draft model decoding by itself, plain (prose prompt): what one draft step costs.",
           "- greedy = plain: how many tokens equal plain decoding's, from the start (greedy speculative decoding must "
           "reproduce it up to floating-point differences between a batched verify forward and one-token steps).", ""]
    md += sections
    common.write_outputs(md, data, args.json, args.md)


if __name__ == "__main__":
    main()
