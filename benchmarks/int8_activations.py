"""What int8 activations (quant.activations: int8) cost in quality, token by token, on SmolLM2-135M.

    python benchmarks/int8_activations.py [--windows 8] [--window-len 128] [--threads N]
        [--variant 'LABEL=RECIPE [key=value ...]' ...] [--json OUT.json] [--md OUT.md]

int8 activations apply only when decoding on runner's CPU kernels (at most 16 rows a forward),
so every window is fed one token at a time (teacher-forced): model.setup_cache(1, L), then
model(tokens[:, i:i+1], [i]) for i = 0..L-2, whose logits predict token i + 1.

Variants, each a recipe plus overrides, built in this process by runner.pipeline.build:
  bf16                 recipes/smollm2-135m.yaml dtype=bfloat16        (no quantization: the reference)
  int4 act=float       recipes/smollm2-135m-fast.yaml quant.activations=float quant.kv_cache=float
  int4 act=int8        recipes/smollm2-135m-fast.yaml quant.kv_cache=float  (activations: int8)
(the fast recipe's int8 KV cache is set back to float: these isolate the activations; --variant
measures the cache, as docs/quantization.md's int8 KV cache section does)
--variant replaces them (repeat it); the first two are the references every variant is compared with.

Per variant, over all predicted positions of all windows:
  - perplexity: exp of the mean negative log-likelihood of the text's next token;
  - top-1 agreement: the fraction of positions whose argmax equals the first / second variant's;
  - KL: the mean KL(p_first || p_variant) and KL(p_second || p_variant), in nats, from float32
    log-softmaxes (the second isolates int8 activations from the weights' quantization);
  - tok/s: forwards a second of the teacher-forced loop, median over windows (a side figure:
    one short warm-up per variant; --threads 1 by default, as on a shared machine).
Every variant's int4 layers are checked to quantize their activations exactly as its recipe's
quant.activations says (Int4Linear.int8_x).

Evaluation text: benchmarks/quant_quality.py's, the Python Language Reference topics of
pydoc_data.topics in sorted order, each encoded on its own (no BOS), concatenated and cut into
consecutive windows.
"""
from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from quant_quality import topic_tokens  # noqa: E402

from runner import pipeline  # noqa: E402
from runner.config.schema import QuantActivations  # noqa: E402
from runner.quant.linear import Int4Linear  # noqa: E402

DEFAULT_VARIANTS = [
    "bf16=recipes/smollm2-135m.yaml dtype=bfloat16",
    "int4 act=float=recipes/smollm2-135m-fast.yaml quant.activations=float quant.kv_cache=float",
    "int4 act=int8=recipes/smollm2-135m-fast.yaml quant.kv_cache=float",
]


@dataclass
class Variant:
    label: str
    recipe: str  # path, relative to the repository root or absolute
    overrides: list[str]


@dataclass
class Result:
    variant: Variant
    perplexity: float = float("nan")
    top1_vs: dict = field(default_factory=dict)  # reference label -> agreement
    kl_vs: dict = field(default_factory=dict)  # reference label -> mean KL(p_ref || p), nats
    kl_max: dict = field(default_factory=dict)  # reference label -> the largest per-position KL
    tokens_per_second: list = field(default_factory=list)  # one per window
    int4_layers: int = 0
    int8_x_layers: int = 0
    kernels: list = field(default_factory=list)  # the int4 layers' kernels
    build_seconds: float = float("nan")


def parse_variant(text: str) -> Variant:
    """Split 'LABEL=RECIPE overrides' at the recipe: the first word ending in .yaml/.yml after '='."""
    words = text.split()
    for i, word in enumerate(words):
        if "=" in word and word.rsplit("=", 1)[1].endswith((".yaml", ".yml")):
            before, recipe = word.rsplit("=", 1)
            label = " ".join(words[:i] + [before])
            return Variant(label, recipe, words[i + 1:])
    raise SystemExit(f"--variant {text!r}: expected 'LABEL=RECIPE.yaml [key=value ...]'")


# --- text -------------------------------------------------------------------------------


def windows_of(tokenizer, windows: int, window_len: int) -> tuple[torch.Tensor, dict]:
    """LongTensor [windows, window_len] of consecutive evaluation tokens, and which topics they came from."""
    from pydoc_data.topics import topics

    ids, used = topic_tokens(tokenizer, sorted(topics), windows * window_len)
    info = {"source": "pydoc_data.topics (sorted, each encoded alone, no BOS)", "python": sys.version.split()[0],
            "topics": [used[0], used[-1], len(used)]}
    return torch.tensor(ids[:windows * window_len]).view(windows, window_len), info


# --- model ------------------------------------------------------------------------------


def build(variant: Variant, threads: int | None) -> pipeline.Pipeline:
    path = Path(variant.recipe)
    if not path.is_absolute():
        path = common.ROOT / path
    extra = [f"threads={threads}"] if threads else []
    recipe = common.recipe(["generate.temperature=0", "draft.kind=none", *variant.overrides, *extra], path)
    return pipeline.build(recipe, str(path), common.note)


def check_activations(built: pipeline.Pipeline, result: Result) -> None:
    """Count the int4 layers and those on int8 activations; stop unless they are what the recipe says."""
    layers = [m for m in built.model.modules() if isinstance(m, Int4Linear)]
    result.int4_layers = len(layers)
    result.int8_x_layers = sum(bool(m.int8_x) for m in layers)
    result.kernels = sorted({m.kernel for m in layers})
    want_int8 = built.recipe.quant.activations is QuantActivations.int8
    if want_int8 and not (layers and result.int8_x_layers == len(layers)):
        raise SystemExit(f"{result.variant.label}: quant.activations is int8, but only {result.int8_x_layers} of "
                         f"{len(layers)} int4 layers quantize their activations")
    if not want_int8 and result.int8_x_layers:
        raise SystemExit(f"{result.variant.label}: quant.activations is float, but {result.int8_x_layers} int4 layers "
                         "quantize their activations")
    if want_int8 and any(k == "fallback" for k in result.kernels):
        raise SystemExit(f"{result.variant.label}: int4 layers on the fallback kernel: int8 activations would not apply")


@torch.no_grad()
def teacher_forced(model, window: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Float32 logits [L - 1, vocab] of window [L] fed one token a forward, and the loop's seconds."""
    length = window.numel()
    tokens = window.view(1, length)
    model.setup_cache(1, length)
    logits = []
    start = time.perf_counter()
    for i in range(length - 1):
        logits.append(model(tokens[:, i:i + 1], torch.arange(i, i + 1))[0, -1])
    seconds = time.perf_counter() - start
    return torch.stack(logits).float(), seconds


# --- measurements -----------------------------------------------------------------------


def evaluate(built: pipeline.Pipeline, windows: torch.Tensor, result: Result,
             references: dict[str, list[torch.Tensor]], argmaxes: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Fill result's figures against the earlier variants: `references` holds the log-probabilities
    per window of the first two, `argmaxes` every one's argmaxes (this one's added). Returns this
    variant's log-probabilities per window."""
    model = built.model
    teacher_forced(model, windows[0, :9])  # warm-up: kernels' first calls, allocations
    nll, count, logps, tops = 0.0, 0, [], []
    kl = dict.fromkeys(references, 0.0)
    kl_max = dict.fromkeys(references, 0.0)
    for w, window in enumerate(windows):
        logits, seconds = teacher_forced(model, window)
        result.tokens_per_second.append(logits.shape[0] / seconds)
        logp = torch.log_softmax(logits, dim=-1)  # [L - 1, vocab]
        nll -= logp.gather(1, window[1:, None]).sum().item()
        count += logp.shape[0]
        tops.append(logp.argmax(-1))
        for label, reference in references.items():
            ref = reference[w]
            per_position = (ref.exp() * (ref - logp)).sum(-1)  # KL(p_ref || p) at each position
            kl[label] += per_position.sum().item()
            kl_max[label] = max(kl_max[label], per_position.max().item())
        logps.append(logp)
        common.note(f"  {result.variant.label}: window {w + 1}/{len(windows)}, {result.tokens_per_second[-1]:.1f} tok/s")
    result.perplexity = math.exp(nll / count)
    result.kl_vs = {label: total / count for label, total in kl.items()}
    result.kl_max = kl_max
    top = torch.stack(tops)
    argmaxes[result.variant.label] = top
    result.top1_vs = {label: (top == other).float().mean().item() for label, other in argmaxes.items()}
    return logps


# --- report -----------------------------------------------------------------------------


def report(args, info: dict, text_info: dict, results: list[Result], seconds: float) -> list[str]:
    first, second = results[0].variant.label, results[min(1, len(results) - 1)].variant.label
    md = ["# int8 activations: quality, teacher-forced token by token", "",
          f"`python {' '.join(shlex.quote(a) for a in sys.argv)}`; {seconds / 60:.1f} min in all.", ""]
    md += common.machine_lines(info) + [""]
    header = ["variant", "perplexity", f"top-1 vs {first}", f"top-1 vs {second}", f"KL vs {first}",
              f"KL vs {second}", "tok/s"]
    rows = [[r.variant.label, f"{r.perplexity:.3f}", percent(r.top1_vs.get(first)), percent(r.top1_vs.get(second)),
             common.fmt(r.kl_vs.get(first, 0.0 if r.variant.label == first else None), ".5f"),
             common.fmt(r.kl_vs.get(second, 0.0 if r.variant.label == second else None), ".5f"),
             f"{common.median(r.tokens_per_second):.1f}"] for r in results]
    md += common.table(header, rows) + [""]
    md += [
        f"- {args.windows} windows x {args.window_len} tokens ({args.windows * (args.window_len - 1)} predictions) of "
        f"{text_info['source']}, Python {text_info['python']}, topics {text_info['topics'][0]!r}..{text_info['topics'][1]!r}.",
        "- Each window fed one token a forward (teacher-forced decoding), logits in float32; KL vs X: KL(p_X || p_variant) "
        "in nats, mean over positions (n/a: X comes later); tok/s: forwards a second, median over windows.",
    ]
    md += [f"- {r.variant.label}: " + " ".join([f"`{r.variant.recipe}`", *r.variant.overrides]) + f"; int4 layers {r.int4_layers} "
           f"({r.int8_x_layers} on int8 activations), kernels {'/'.join(r.kernels) or '-'}"
           + "".join(f"; max per-position KL vs {label} {value:.4f}" for label, value in r.kl_max.items())
           for r in results]
    return md


def percent(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2%}"


def as_json(args, info: dict, text_info: dict, results: list[Result], seconds: float) -> dict:
    return {
        "machine": info,
        "settings": {"windows": args.windows, "window_len": args.window_len, "threads": args.threads,
                     "predictions": args.windows * (args.window_len - 1), "text": text_info, "seconds": seconds},
        "variants": [{
            "label": r.variant.label, "recipe": r.variant.recipe, "overrides": r.variant.overrides,
            "perplexity": r.perplexity, "top1_agreement": r.top1_vs, "kl": r.kl_vs,
            "kl_max_position": r.kl_max, "tokens_per_second_median": common.median(r.tokens_per_second),
            "tokens_per_second": r.tokens_per_second, "int4_layers": r.int4_layers, "int8_x_layers": r.int8_x_layers,
            "kernels": r.kernels, "build_seconds": r.build_seconds,
        } for r in results],
    }


# --- main -------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", action="append", help="'LABEL=RECIPE.yaml [key=value ...]' (repeat; default: the three above)")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--window-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (recipe override; 0: the recipe's). 1 by default: on a shared 2-core machine "
                         "2-thread timings are unreliable")
    ap.add_argument("--json")
    ap.add_argument("--md")
    args = ap.parse_args()
    variants = [parse_variant(v) for v in args.variant or DEFAULT_VARIANTS]
    start = time.perf_counter()
    info = common.machine()

    results, windows, text_info, references, argmaxes = [], None, None, {}, {}
    for variant in variants:
        common.note(f"{variant.label}: building")
        t = time.perf_counter()
        built = build(variant, args.threads)
        result = Result(variant, build_seconds=time.perf_counter() - t)
        check_activations(built, result)
        if windows is None:
            windows, text_info = windows_of(built.tokenizer, args.windows, args.window_len)
        logps = evaluate(built, windows, result, references, argmaxes)
        if len(references) < 2:  # the first two are the references
            references[variant.label] = logps
        common.note(f"{variant.label}: perplexity {result.perplexity:.3f}, "
                    + ", ".join(f"KL vs {k} {v:.5f}" for k, v in result.kl_vs.items()))
        results.append(result)
        del built, logps

    info["torch_threads"] = torch.get_num_threads()  # as the recipes set them
    info["load_average_end"] = common.load_average()
    seconds = time.perf_counter() - start
    md = report(args, info, text_info, results, seconds)
    common.write_outputs(md, as_json(args, info, text_info, results, seconds), args.json, args.md)


if __name__ == "__main__":
    main()
