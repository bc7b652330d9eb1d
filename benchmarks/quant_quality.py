"""Quality and decode speed of runner's quantization modes, on SmolLM2-135M by default.

    python benchmarks/quant_quality.py [--json OUT.json] [--md OUT.md] [options]

Per mode (quant.mode, quant.groupsize):
  quality, in float32 (the quantized layers run their exact dequantize-then-matmul fallback):
    - perplexity on --windows windows of --window-len tokens, each scored on its own by runner
      eval's batched scoring (runner.eval.scoring.score: 4 windows a forward, right-padded),
      predicting tokens 2..L of each (`runner eval` reports lm-eval's word and byte perplexities:
      benchmarks/eval_quality.py);
    - top-1 agreement: the fraction of all positions whose argmax equals the float model's;
    - weight error: ||W - W_q|| / ||W|| over all quantized layers, against the float model's weights.
  decode speed, greedy, EOS ignored so every run makes --new-tokens tokens, warmed up once,
  median of --runs runs interleaved across modes (so a load spike hits every mode alike):
    - bfloat16: the float32 model of the quality pass cast to bfloat16 and re-packed for the
      kernels the recipe's `kernels` key picks (runner's CPU kernels by default);
    - float32: the quality pass's models as they are (runner's kernels by default).

Evaluation text: the Python Language Reference topics shipped with every CPython
(pydoc_data.topics, the text of `help('TOPIC')`), topics in sorted order from the first,
each encoded on its own (no BOS), concatenated, cut into consecutive windows.
GPTQ calibration text: the same topics taken from the LAST in reverse order, disjoint
from the evaluation topics (checked), written to a temporary file for quant.calibration.path.
"""
from __future__ import annotations

import argparse
import copy
import gc
import hashlib
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from runner import decoders, pipeline, quant  # noqa: E402
from runner.quant import int4, int8  # noqa: E402
from runner.quant.linear import Int4Linear, Int8Linear  # noqa: E402
from runner.tokenizers.chat import render_chat  # noqa: E402
from runner.transforms.runner_ops import use_runner_ops  # noqa: E402

DEFAULT_MODES = "none,int8,int4:32,int4:64,int4-gptq:32,int4-gptq:64"


@dataclass
class Mode:
    mode: str  # quant.mode
    groupsize: int | None  # int4 modes only
    extra: tuple[str, ...] = ()  # more recipe overrides, e.g. quant.output=int8

    @property
    def label(self) -> str:
        label = self.mode if self.groupsize is None else f"{self.mode} g{self.groupsize}"
        return " ".join([label] + [e.removeprefix("quant.") for e in self.extra])

    def overrides(self) -> list[str]:
        out = [f"quant.mode={self.mode}"]
        if self.groupsize is not None:
            out.append(f"quant.groupsize={self.groupsize}")
        return out + list(self.extra)


@dataclass
class Result:
    mode: Mode
    build_seconds: float = float("nan")
    model_bytes: int = 0  # float32 model
    bf16_bytes: int = 0  # its bfloat16 copy
    weight_rel_error: float = float("nan")
    perplexity: float = float("nan")
    next_token_accuracy: float = float("nan")
    top1_agreement: float = float("nan")
    kernels: dict = field(default_factory=dict)  # dtype -> sorted kernel names used
    speed: dict = field(default_factory=dict)  # dtype -> {"runs": [...], "median": x, "new_tokens": n}
    matches_float: dict = field(default_factory=dict)  # dtype -> greedy tokens equal to the float model's, from the start


def parse_modes(text: str) -> list[Mode]:
    """'none,int8,int4:32,int4:32+quant.output=int8' -> modes: mode[:groupsize][+key=value ...]."""
    modes = []
    for item in text.split(","):
        head, *extra = item.strip().split("+")
        name, _, group = head.partition(":")
        modes.append(Mode(name, int(group) if group else None, tuple(extra)))
    if not modes or modes[0].mode != "none":
        raise SystemExit("--modes must start with none: the float model is the reference for agreement and error")
    return modes


# --- text -------------------------------------------------------------------------------


def topic_tokens(tokenizer, keys: list[str], need: int) -> tuple[list[int], list[str]]:
    """Tokens of the topics `keys` in order, each encoded alone, until at least `need`."""
    from pydoc_data.topics import topics

    ids, used = [], []
    for key in keys:
        if len(ids) >= need:
            break
        ids += tokenizer.encode(topics[key] + "\n\n", bos=False)
        used.append(key)
    if len(ids) < need:
        raise SystemExit(f"pydoc_data.topics holds {len(ids)} tokens; {need} are needed")
    return ids, used


def corpus(tokenizer, windows: int, window_len: int, cal_tokens: int) -> tuple[torch.Tensor, str, dict]:
    """Evaluation windows LongTensor [windows, window_len], the calibration text, and what was used."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    ids, eval_keys = topic_tokens(tokenizer, keys, windows * window_len)
    # Calibration: from the other end, with 10% to spare (a joined text tokenizes a little differently).
    _, cal_keys = topic_tokens(tokenizer, keys[::-1], int(cal_tokens * 1.1) + 64)
    overlap = set(eval_keys) & set(cal_keys)
    if overlap:
        raise SystemExit(f"evaluation and calibration text overlap ({len(overlap)} topics); lower --windows or the calibration size")
    cal_text = "\n\n".join(topics[k] for k in cal_keys)
    eval_text = "".join(topics[k] + "\n\n" for k in eval_keys)
    info = {
        "source": "pydoc_data.topics (Python Language Reference topics shipped with CPython)",
        "python": sys.version.split()[0],
        "eval_topics": [eval_keys[0], eval_keys[-1], len(eval_keys)],
        "eval_sha256": hashlib.sha256(eval_text.encode()).hexdigest(),
        "calibration_topics": [cal_keys[0], cal_keys[-1], len(cal_keys)],
        "calibration_sha256": hashlib.sha256(cal_text.encode()).hexdigest(),
    }
    return torch.tensor(ids[:windows * window_len]).view(windows, window_len), cal_text, info


# --- measurements -----------------------------------------------------------------------


def evaluate(model: torch.nn.Module, windows: torch.Tensor) -> tuple[float, float, torch.Tensor]:
    """Perplexity, next-token accuracy and argmaxes [N, L - 1] over windows [N, L], each scored on
    its own (runner eval's batched scoring: the first token is the context, tokens 2..L are predicted)."""
    from runner.eval.scoring import score

    n, length = windows.shape
    argmax: list[torch.Tensor] = []
    scored = score(model, [(w[:1].tolist(), w[1:].tolist()) for w in windows], batch_size=4, argmax=argmax)
    top = torch.stack(argmax)  # [N, L - 1]: position i predicts token i + 1
    count = n * (length - 1)
    nll = -sum(logprob for logprob, _ in scored)
    return math.exp(nll / count), (top == windows[:, 1:]).sum().item() / count, top


def quantized_layers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """name -> the fp32 weight [out, in] each quantized linear stands for."""
    out = {}
    for name, layer in model.named_modules():
        if isinstance(layer, Int8Linear):
            out[name] = int8.dequantize(layer.weight, layer.scales)
        elif isinstance(layer, Int4Linear):
            out[name] = int4.dequantize(int4.unpack(layer.weight), layer.scales, layer.zeros)
    return out


def weight_error(model: torch.nn.Module, reference: torch.nn.Module) -> float:
    """||W - W_q|| / ||W|| summed over every quantized linear (nan when none is quantized)."""
    err = ref = 0.0
    for name, wq in quantized_layers(model).items():
        tied = name == "output" and reference.output is None
        w = (reference.tok_embeddings if tied else reference.get_submodule(name)).weight.detach().float()
        err += (w - wq).pow(2).sum().item()
        ref += w.pow(2).sum().item()
    return math.sqrt(err / ref) if ref else float("nan")


def kernels_of(model: torch.nn.Module, dtype: torch.dtype) -> list[str]:
    """The kernels the quantized layers run in `dtype` (the fallback when they refuse it)."""
    names = set()
    for layer in model.modules():
        if isinstance(layer, (Int8Linear, Int4Linear)):
            kernel = layer.KERNELS[layer.kernel]
            names.add(layer.kernel if kernel.dtypes is None or dtype in kernel.dtypes else "fallback")
    return sorted(names)


def to_bfloat16(model: torch.nn.Module, recipe) -> torch.nn.Module:
    """A bf16 copy, packed for the kernels the recipe's `kernels` key picks in bf16, as a bf16
    recipe would run (casting rounds scales to nearest: speed only)."""
    model = copy.deepcopy(model).to(torch.bfloat16)
    if quant.is_quantized(model):
        quant.pack_for(model, "cpu")
    use_runner_ops(model, recipe.kernels, torch.device("cpu"), "benchmarks/quant_quality.py")
    return model


def measure_speed(models: dict[str, torch.nn.Module], recipe, prompt: list[int], new_tokens: int, runs: int,
                  warmup_tokens: int) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """Decode tokens/s per model: a short warm-up each, then `runs` rounds over all models in turn."""
    built = {label: decoders.build(recipe, model) for label, model in models.items()}
    for decoder in built.values():
        decoder.generate(prompt, warmup_tokens, frozenset())
    rates, outputs = {label: [] for label in built}, {}
    for r in range(runs):
        for label, decoder in built.items():
            outputs[label], stats = decoder.generate(prompt, new_tokens, frozenset())
            rates[label].append(stats.tokens_per_second)
        common.note(f"  speed round {r + 1}/{runs}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items()))
    return rates, outputs


# --- report -----------------------------------------------------------------------------


def expectations(results: list[Result]) -> list[str]:
    """The issue's expectations, each checked against this run's numbers."""
    by = {r.mode.label: r for r in results}
    base = by["none"]
    lines = []

    def verdict(ok: bool) -> str:
        return "holds" if ok else "DOES NOT hold"

    if "int8" in by:
        rel = by["int8"].perplexity / base.perplexity - 1
        lines.append(f"- int8 perplexity within 1% of float: {verdict(abs(rel) <= 0.01)} "
                     f"({by['int8'].perplexity:.3f} vs {base.perplexity:.3f}, {rel:+.2%}).")
    for r in results:
        if r.mode.mode == "int4-gptq" and f"int4 g{r.mode.groupsize}" in by:
            rtn = by[f"int4 g{r.mode.groupsize}"]
            lines.append(f"- GPTQ better than round-to-nearest at g{r.mode.groupsize}: "
                         f"{verdict(r.perplexity < rtn.perplexity)} (perplexity {r.perplexity:.3f} vs {rtn.perplexity:.3f}; "
                         f"top-1 agreement {r.top1_agreement:.2%} vs {rtn.top1_agreement:.2%}; "
                         f"weight error {r.weight_rel_error:.4f} vs {rtn.weight_rel_error:.4f}).")
        if r.mode.mode == "int4" and r.weight_rel_error < 1e-6:
            lines.append(f"- Note: int4 g{r.mode.groupsize} reproduces the float weights exactly (weight error "
                         f"{r.weight_rel_error:.1e}): the checkpoint's block weights already lie on a {r.mode.groupsize}-wide "
                         f"min/max 4-bit grid, so no method can beat round-to-nearest there.")
    for dtype in ("bfloat16", "float32"):
        speed = {label: r.speed[dtype]["median"] for label, r in by.items() if dtype in r.speed}
        if "int8" in speed and "none" in speed:
            lines.append(f"- int8 faster than {dtype}: {verdict(speed['int8'] > speed['none'])} "
                         f"({speed['int8']:.1f} vs {speed['none']:.1f} tokens/s, x{speed['int8'] / speed['none']:.2f}).")
        for label, value in speed.items():
            if label.startswith("int4 ") and "int8" in speed:
                lines.append(f"- {label} faster than int8 in {dtype}: {verdict(value > speed['int8'])} "
                             f"({value:.1f} vs {speed['int8']:.1f} tokens/s, x{value / speed['int8']:.2f}).")
    return lines


def report(args, info: dict, text_info: dict, results: list[Result], prompt_len: int, seconds: float) -> list[str]:
    md = ["# Quantization: quality and decode speed", "",
          f"Recipe `{args.recipe}`; `python {' '.join(sys.argv)}`; {seconds / 60:.1f} min in all.", ""]
    md += common.machine_lines(info) + [""]
    header = ["mode", "MB fp32", "MB bf16", "weight error", "perplexity", "vs float", "top-1 agreement", "next-token acc.",
              "bf16 tok/s", "bf16 x float", "fp32 tok/s", "fp32 x float", "bf16 greedy = float"]
    base = results[0]
    rows = []
    for r in results:
        bf, fp = r.speed.get("bfloat16"), r.speed.get("float32")
        bf0, fp0 = base.speed.get("bfloat16"), base.speed.get("float32")
        same = r.matches_float.get("bfloat16")
        rows.append([
            r.mode.label, f"{r.model_bytes / 1e6:.1f}", f"{r.bf16_bytes / 1e6:.1f}" if r.bf16_bytes else "n/a",
            common.fmt(r.weight_rel_error, ".4f"),
            common.fmt(r.perplexity, ".3f"), f"{r.perplexity / base.perplexity - 1:+.2%}",
            f"{r.top1_agreement:.2%}", f"{r.next_token_accuracy:.2%}",
            common.fmt(bf["median"] if bf else None, ".1f"),
            common.fmt(bf["median"] / bf0["median"] if bf and bf0 else None, ".2f"),
            common.fmt(fp["median"] if fp else None, ".1f"),
            common.fmt(fp["median"] / fp0["median"] if fp and fp0 else None, ".2f"),
            f"{same}/{args.new_tokens}" if same is not None else "n/a",
        ])
    md += common.table(header, rows) + [""]
    fp_tokens = args.fp32_new_tokens
    md += [
        "How to read it:",
        f"- Quality in float32 on {args.windows} windows x {args.window_len} tokens "
        f"({args.windows * (args.window_len - 1)} predictions) of {text_info['source']}, Python {text_info['python']}, "
        f"topics {text_info['eval_topics'][0]!r}..{text_info['eval_topics'][1]!r} ({text_info['eval_topics'][2]} topics, "
        f"sha256 {text_info['eval_sha256'][:12]}); GPTQ calibrated on {args.cal_samples} x {args.cal_len} tokens of "
        f"the disjoint topics {text_info['calibration_topics'][0]!r}..{text_info['calibration_topics'][1]!r} "
        f"(reverse order, sha256 {text_info['calibration_sha256'][:12]}).",
        "- weight error: ||W - W_q|| / ||W|| over the quantized linears (the output layer stays float: quant.output=keep);"
        " top-1 agreement: positions whose argmax equals the float model's; next-token acc.: argmax equals the text's next token.",
        f"- Speed: greedy decode of the recipe's chat prompt ({prompt_len} tokens), EOS ignored, "
        f"{args.new_tokens} new tokens in bf16, {fp_tokens} in fp32 (the fp32 int4 fallback is slow), decode tokens/s "
        f"(runner's Stats: tokens after the first / their time), median of {args.runs} runs after a {args.warmup_tokens}-token warm-up, the modes "
        f"interleaved run by run; torch threads = {args.threads} (a shared 2-core machine makes 2-thread timings unreliable).",
        "- bf16 models are the float32 ones cast to bfloat16 and re-packed (int4-gptq thus keeps its fp32-calibrated levels); "
        "bf16 greedy = float: how many of the greedy tokens equal the bf16 float model's, from the start.",
        "- kernels used: " + "; ".join(f"{r.mode.label}: " + ", ".join(f"{d} {'/'.join(k) or '-'}" for d, k in r.kernels.items())
                                       for r in results if quant_mode(r)),
        "- GPTQ build time (fp32, quantization included): " + ", ".join(
            f"{r.mode.label} {r.build_seconds:.0f} s" for r in results if r.mode.mode == "int4-gptq") + ".",
        "",
        "## Expectations", "",
    ]
    md += expectations(results)
    return md


def quant_mode(result: Result) -> bool:
    return result.mode.mode != "none"


# --- main -------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default=str(common.RECIPE))
    ap.add_argument("--modes", default=DEFAULT_MODES,
                    help="comma-separated mode[:groupsize][+key=value...], none first (e.g. int4:32+quant.output=int8)")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--window-len", type=int, default=512)
    ap.add_argument("--cal-samples", type=int, default=32, help="GPTQ quant.calibration.samples")
    ap.add_argument("--cal-len", type=int, default=256, help="GPTQ quant.calibration.seq_len")
    ap.add_argument("--new-tokens", type=int, default=128, help="bf16 decode length")
    ap.add_argument("--fp32-new-tokens", type=int, default=32, help="fp32 decode length")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup-tokens", type=int, default=8, help="tokens each model decodes once before timing")
    ap.add_argument("--fp32-speed-modes", default="none,int8,int4:32",
                    help="modes whose fp32 decode speed is measured ('all', or '' for none)")
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    ap.add_argument("--md")
    args = ap.parse_args()
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    info = common.machine()
    modes = parse_modes(args.modes)
    fp32_speed = {m.label for m in modes} if args.fp32_speed_modes == "all" else \
        {m.label for m in parse_modes("none," + args.fp32_speed_modes)} if args.fp32_speed_modes else set()
    recipe_path = Path(args.recipe)
    base = ["dtype=float32", f"threads={args.threads}", "generate.temperature=0", "draft.kind=none"]

    results, reference, windows, float_argmax = [], None, None, None
    speed32, speed16 = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        cal_path = Path(tmp) / "calibration.txt"
        for mode in modes:
            extra = []
            if mode.mode == "int4-gptq":
                extra = [f"quant.calibration.path={cal_path}", f"quant.calibration.samples={args.cal_samples}",
                         f"quant.calibration.seq_len={args.cal_len}"]
            recipe = common.recipe(base + mode.overrides() + extra, recipe_path)
            if windows is None:
                tokenizer = pipeline.build_tokenizer(recipe, str(recipe_path))
                windows, cal_text, text_info = corpus(tokenizer, args.windows, args.window_len,
                                                      args.cal_samples * args.cal_len)
                cal_path.write_text(cal_text, encoding="utf-8")
            common.note(f"{mode.label}: building (float32)")
            t = time.perf_counter()
            p = pipeline.build(recipe, str(recipe_path))
            result = Result(mode, build_seconds=time.perf_counter() - t, model_bytes=quant.model_bytes(p.model))
            model = p.model
            if reference is None:
                reference = model
            else:
                result.weight_rel_error = weight_error(model, reference)
            common.note(f"{mode.label}: built in {result.build_seconds:.0f} s; evaluating")
            result.perplexity, result.next_token_accuracy, argmax = evaluate(model, windows)
            if float_argmax is None:
                float_argmax = argmax
            result.top1_agreement = (argmax == float_argmax).float().mean().item()
            common.note(f"{mode.label}: perplexity {result.perplexity:.3f}, top-1 agreement {result.top1_agreement:.2%}")
            result.kernels["float32"] = kernels_of(model, torch.float32)
            if not args.no_speed:
                bf16 = to_bfloat16(model, recipe)
                result.kernels["bfloat16"] = kernels_of(bf16, torch.bfloat16)
                speed16[mode.label] = bf16
                if mode.label in fp32_speed:
                    speed32[mode.label] = model
                result.bf16_bytes = quant.model_bytes(bf16)
            del p, model
            gc.collect()
            results.append(result)

    prompt = []
    if not args.no_speed:
        speed_recipe = common.recipe(base, recipe_path)
        tokenizer = pipeline.build_tokenizer(speed_recipe, str(recipe_path))
        prompt = tokenizer.encode(render_chat(tokenizer, speed_recipe.generate.prompt, str(recipe_path)),
                                  bos=False, allow_special=True)
        by_label = {r.mode.label: r for r in results}
        for dtype, models, new_tokens in (("bfloat16", speed16, args.new_tokens), ("float32", speed32, args.fp32_new_tokens)):
            if not models:
                continue
            common.note(f"decode speed, {dtype}: {', '.join(models)}")
            rates, outputs = measure_speed(models, speed_recipe, prompt, new_tokens, args.runs, args.warmup_tokens)
            for label, runs in rates.items():
                by_label[label].speed[dtype] = {"runs": runs, "median": common.median(runs), "new_tokens": new_tokens}
                by_label[label].matches_float[dtype] = common.common_prefix(outputs[label], outputs["none"])

    info["load_average_end"] = common.load_average()
    seconds = time.perf_counter() - start
    md = report(args, info, text_info, results, len(prompt), seconds)
    data = {
        "machine": info, "args": vars(args), "command": " ".join(sys.argv), "text": text_info, "seconds": seconds,
        "prompt_tokens": len(prompt),
        "results": [{"mode": r.mode.mode, "groupsize": r.mode.groupsize, "label": r.mode.label,
                     "build_seconds": r.build_seconds, "model_bytes": r.model_bytes, "bf16_bytes": r.bf16_bytes,
                     "weight_rel_error": r.weight_rel_error, "perplexity": r.perplexity,
                     "next_token_accuracy": r.next_token_accuracy, "top1_agreement": r.top1_agreement,
                     "kernels": r.kernels, "speed": r.speed, "greedy_tokens_equal_to_float": r.matches_float}
                    for r in results],
        "expectations": expectations(results),
    }
    common.write_outputs(md, data, args.json, args.md)


if __name__ == "__main__":
    main()
