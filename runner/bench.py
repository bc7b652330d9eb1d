"""`runner bench`: decode speed, latency, memory and bandwidth of recipes, measured in one run.

Figures, never assertions: tests check correctness, this measures speed. Every recipe runs the
same prompt and length after a warm-up (which also compiles compiled steps); medians over N runs.
"""
from __future__ import annotations

import importlib.util
import statistics
import textwrap
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from runner import pipeline
from runner.config.schema import Recipe


# The baselines --vs can time, and their names in tables and JSON keys (vs_<key>_ratio).
BASELINES = {"hf": "HF eager", "hf-compile": "HF static+compile", "llamacpp": "llama.cpp"}


@dataclass
class Figures:
    label: str
    decode_tokens_per_s: list[float] = field(default_factory=list)
    time_to_first_token_s: list[float] = field(default_factory=list)
    prefill_tokens_per_s: list[float] = field(default_factory=list)
    model_bytes: int = 0
    bytes_per_token: int = 0  # weights read per decoded token
    peak_memory_bytes: int = 0
    compile_seconds: float = 0.0
    baselines: dict[str, float] = field(default_factory=dict)  # --vs name -> its decode tokens/s
    baseline_prefill: dict[str, float] = field(default_factory=dict)  # --vs name -> its prompt tokens/s
    prompt_tokens: int = 0
    matmul_params: int = 0  # weights a token multiplies (every linear layer): 2 flops each
    gemm_gflop_s: float = 0.0  # torch's GEMM rate in this recipe's dtype (--roofline); 0: not measured
    rank_peak_memory_bytes: list[int] = field(default_factory=list)  # tensor parallelism: each rank's peak RSS

    @property
    def median(self) -> float:
        return statistics.median(self.decode_tokens_per_s)

    @property
    def bandwidth_gb_s(self) -> float:
        return self.bytes_per_token * self.median / 1e9

    def ratio(self, baseline: str) -> float:
        return self.median / self.baselines[baseline]

    @property
    def prefill(self) -> float:
        return statistics.median(self.prefill_tokens_per_s)

    def prefill_gflops(self) -> float:
        return self.prefill * 2 * self.matmul_params / 1e9

    def as_dict(self) -> dict:
        out = asdict(self)
        out.update(decode_tokens_per_s_median=self.median, effective_bandwidth_gb_s=self.bandwidth_gb_s)
        for name, rate in self.baselines.items():
            key = name.replace("-", "_")
            out[f"{key}_decode_tokens_per_s"] = rate
            out[f"vs_{key}_ratio"] = self.ratio(name)
        for name, rate in self.baseline_prefill.items():
            out[f"{name.replace('-', '_')}_prefill_tokens_per_s"] = rate
        out["prefill_gflop_s"] = self.prefill_gflops()
        return out


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


def measure(recipe: Recipe, recipe_file: str, label: str, runs: int, new_tokens: int, note=None,
            prompt_tokens: Sequence[int] = (), bar=None) -> tuple[list[Figures], pipeline.Pipeline, list[list[int]]]:
    """Build the recipe's pipeline, warm it up, then time `runs` greedy-or-sampled generations of
    the recipe's prompt, or of a prompt of each length in `prompt_tokens`: one Figures (and prompt)
    each. Several lengths take their runs in turn, a run of each per round, so that a long prompt
    and a short one are timed over the same minutes of a machine whose speed drifts."""
    built = pipeline.build(recipe, recipe_file, note, bar)
    # Fitted longest first: the first sets the cache's size, which every length then shares.
    cut = {n: long_prompt(built, n) for n in prompt_tokens}
    for n in sorted(cut, reverse=True):
        pipeline.fit_prompt(built, cut[n], recipe_file)
    prompts = [cut[n] for n in prompt_tokens] or [pipeline.encode_prompt(built, recipe_file)]
    rows = [Figures(f"{label} @{len(p)}" if len(prompts) > 1 else label, prompt_tokens=len(p)) for p in prompts]
    compiled = 0.0  # seconds, so far: warm_up reports the compiled steps' total
    for figures, prompt in zip(rows, prompts):
        total = pipeline.warm_up(built, prompt)
        figures.compile_seconds, compiled = total - compiled, total
        if not total:
            pipeline.generate(built, prompt)  # warm caches and allocator
    show = bar(f"bench: {label}: timed runs") if bar else (lambda done, total: None)
    for i in range(runs):
        for figures, prompt in zip(rows, prompts):
            _, stats = pipeline.generate(built, prompt, sample_index=i)
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


def context_ratios(label: str, rows: list[Figures]) -> dict:
    """One recipe's rows at several prompt lengths: its decode speed after each length over that
    after the shortest, of the medians and of the best runs (on a machine whose speed swings from
    minute to minute, the best runs are the least disturbed): {"recipe": label, "ratios":
    {prompt tokens: {"median": ratio, "best": ratio}}}."""
    shortest = min(rows, key=lambda r: r.prompt_tokens)
    return {"recipe": label, "ratios": {
        r.prompt_tokens: {"median": r.median / shortest.median,
                          "best": max(r.decode_tokens_per_s) / max(shortest.decode_tokens_per_s)} for r in rows}}


def weight_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes the model holds, bytes one decode step reads): the embedding table is read one row
    per token, unless the output layer reads it whole (tied embeddings); of a mixture of experts'
    stacked experts a token reads the n_experts_per_token it is routed to."""
    tensors = {id(t): (name, t) for name, t in model.state_dict(keep_vars=True).items()}
    total = sum(t.numel() * t.element_size() for _, t in tensors.values())
    spec = model.spec
    experts = sum(t.numel() * t.element_size() for name, t in tensors.values() if ".experts." in name)
    unread = experts - experts * spec.n_experts_per_token // spec.n_experts if spec.moe else 0
    embedding = model.tok_embeddings.weight
    tied = model.output is None or getattr(model.output, "weight", None) is embedding
    return total, total - unread - (0 if tied else embedding.numel() * embedding.element_size())


class _Clock:
    """A generation streamer that notes when each new token arrives (the first put is the prompt)."""

    def __init__(self):
        self.times: list[float] = []
        self.prompt_seen = False
        self.start = time.perf_counter()

    def put(self, value) -> None:
        if self.prompt_seen:
            self.times.append(time.perf_counter())
        self.prompt_seen = True

    def end(self) -> None:
        pass

    def decode_rate(self) -> float:
        """Tokens/s after the first token, as ours are counted (prefill excluded)."""
        return (len(self.times) - 1) / (self.times[-1] - self.times[0])

    def prefill_rate(self, prompt_tokens: int) -> float:
        return prompt_tokens / (self.times[0] - self.start)


def hf_decode_speed(built: pipeline.Pipeline, prompt: list[int], new_tokens: int, runs: int,
                    compiled: bool = False) -> tuple[float, float]:
    """HF transformers' greedy `generate` on the same weights, dtype, threads and prompt: decode
    tokens/s and prompt tokens/s (medians).

    compiled: with a static cache and torch.compile (what HF offers for speed); compiling happens
    in the warm-up and is not counted.
    """
    try:
        import transformers
        from transformers import CompileConfig
    except ImportError:
        raise ValueError("needs HF transformers: pip install 'runner[hf]'") from None

    from runner.loaders import load_state_dict, stored_quant
    from runner.loaders.hf_layout import hf_class, hf_config, to_hf

    recipe = built.recipe
    path = Path(recipe.model.checkpoint)
    if stored_quant(path) is not None:
        raise ValueError("--vs hf needs a float checkpoint (HF runs the float weights)")
    spec = recipe.model.arch
    state = to_hf(load_state_dict(path, spec), spec)
    dtype = built.model.norm.weight.dtype
    model_class = getattr(transformers, hf_class(spec))  # Llama, Mistral (a window) or Mixtral (experts)
    config_class = getattr(transformers, hf_class(spec).replace("ForCausalLM", "Config"))
    hf = model_class(config_class(**hf_config(spec), dtype=dtype)).to(dtype).eval()
    hf.load_state_dict(state, strict=False)
    if spec.tie_embeddings:
        hf.tie_weights()
    ids = torch.tensor([prompt])
    options = {}
    if compiled:
        # HF compiles generate's forward by itself only on accelerators; this asks for it on the CPU too.
        config = CompileConfig()
        config._compile_all_devices = True  # a class attribute, not an argument
        options = {"cache_implementation": "static", "compile_config": config}

    def rate() -> tuple[float, float]:
        clock = _Clock()
        with torch.inference_mode():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, streamer=clock, **options)
        return clock.decode_rate(), clock.prefill_rate(len(prompt))

    rate()  # warm-up (and compile)
    return _medians([rate() for _ in range(runs)])


def _medians(pairs: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)


def llamacpp_decode_speed(built: pipeline.Pipeline, recipe_file: str, prompt: list[int], new_tokens: int,
                          runs: int, note=None) -> tuple[float, float]:
    """llama.cpp's (llama-cpp-python) greedy decode and prompt tokens/s on the recipe's GGUF source,
    same prompt and threads.

    It runs in a child process, apart from torch's thread pool. Should llama.cpp crash there (its
    AMX weight repacking does in some sandboxes), it runs again without repacking, and says so.
    """
    import json
    import subprocess
    import sys

    if importlib.util.find_spec("llama_cpp") is None:
        raise ValueError("needs llama-cpp-python: pip install 'runner[llamacpp]'")
    from runner import sources

    source = built.recipe.model.source
    if source is None or not source.lower().endswith(".gguf"):
        raise ValueError(f"runs the recipe's GGUF model.source, but that is {source!r}")
    job = {"gguf": str(sources.fetch(source, recipe_file)), "prompt": prompt, "new_tokens": new_tokens,
           "runs": runs, "threads": torch.get_num_threads()}
    for repack in (True, False):
        done = subprocess.run([sys.executable, "-m", "runner.bench", json.dumps(job | {"repack": repack})],
                              capture_output=True, text=True)
        if done.returncode == 0:
            decode, prefill = json.loads(done.stdout.strip().splitlines()[-1])
            return decode, prefill
        if done.returncode > 0:  # an error, not a crash: running it again would not help
            break
        if repack and note is not None:
            note(f"bench: llama.cpp crashed (signal {-done.returncode}); running it again without weight repacking")
    raise ValueError(f"llama.cpp failed: {(done.stderr.strip().splitlines() or ['exit ' + str(done.returncode)])[-1]}")


def _llamacpp_rate(job: dict) -> tuple[float, float]:
    import llama_cpp.llama as llama_module
    from llama_cpp import Llama

    if not job["repack"]:
        defaults = llama_module.llama_cpp.llama_model_default_params

        def without_repacking():
            params = defaults()
            params.use_extra_bufts = False
            return params

        llama_module.llama_cpp.llama_model_default_params = without_repacking
    prompt, new_tokens = job["prompt"], job["new_tokens"]
    llm = Llama(model_path=job["gguf"], n_ctx=len(prompt) + new_tokens + 8, n_threads=job["threads"],
                n_threads_batch=job["threads"], verbose=False)

    def rate() -> tuple[float, float]:
        llm.reset()  # else generate reuses the prompt cached by the run before, and skips its prefill
        times, start = [], time.perf_counter()
        for _ in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
            times.append(time.perf_counter())
            if len(times) == new_tokens:
                break
        return (len(times) - 1) / (times[-1] - times[0]), len(prompt) / (times[0] - start)

    rate()  # warm-up
    return _medians([rate() for _ in range(job["runs"])])


def cpu_name() -> str:
    """The CPU's model name, for the figures' caption."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """The machine's read bandwidth in GB/s: torch sums a `gib` GiB tensor (median of repeats)."""
    x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    x.sum()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - start)
    return x.numel() * 4 / statistics.median(times) / 1e9


def gemm_rate(dtype: torch.dtype, size: int = 1024, repeats: int = 5) -> float:
    """torch's matmul rate in GFLOP/s for `dtype` on square `size` matrices (median of repeats)."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9


def table(rows: list[Figures], roofline: float | None) -> str:
    """A Markdown comparison table."""
    gemm = any(r.gemm_gflop_s for r in rows)
    compared = [name for name in BASELINES if any(name in r.baselines for r in rows)]
    head = ["recipe", "decode tok/s (median [min, max])", "TTFT ms", "prefill tok/s", "model MB", "GB/s",
            "peak MiB", "compile s", *(f"vs {BASELINES[name]}" for name in compared)]
    if gemm:
        head.insert(4, "prefill of GEMM")
    if roofline:
        head.insert(6 + bool(gemm), "of roofline")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.label, f"{r.median:.1f} [{min(r.decode_tokens_per_s):.1f}, {max(r.decode_tokens_per_s):.1f}]",
                 f"{statistics.median(r.time_to_first_token_s) * 1000:.0f}",
                 f"{r.prefill:.0f}", f"{r.model_bytes / 1e6:.0f}",
                 f"{r.bandwidth_gb_s:.1f}", _peak(r), f"{r.compile_seconds:.1f}",
                 *(f"{r.ratio(name):.2f}x ({r.baselines[name]:.1f} tok/s; prefill "
                   f"{r.baseline_prefill.get(name, float('nan')):.0f} tok/s)" if name in r.baselines else ""
                   for name in compared)]
        if gemm:
            cells.insert(4, f"{r.prefill_gflops() / r.gemm_gflop_s:.0%} of {r.gemm_gflop_s:.0f} GFLOP/s")
        if roofline:
            cells.insert(6 + bool(gemm), f"{r.bandwidth_gb_s / roofline:.0%}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _peak(r: Figures) -> str:
    """Peak MiB; under tensor parallelism, each rank's."""
    if r.rank_peak_memory_bytes:
        return " / ".join(f"{b / 2**20:.0f}" for b in r.rank_peak_memory_bytes) + " (per rank)"
    return f"{r.peak_memory_bytes / 2**20:.0f}"


def plot(rows: list[Figures], path: str, caption: str) -> None:
    """A bar chart of decode tokens/s (median, with min-max whiskers) per recipe and baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, values, lows, highs, colors = [], [], [], [], []
    for r in rows:
        labels.append(r.label)
        values.append(r.median)
        lows.append(r.median - min(r.decode_tokens_per_s))
        highs.append(max(r.decode_tokens_per_s) - r.median)
        colors.append("tab:blue")
        for name, rate in r.baselines.items():
            labels.append(f"{BASELINES[name]}\n({r.label})")
            values.append(rate)
            lows.append(0.0)
            highs.append(0.0)
            colors.append("tab:gray")
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(labels)), 4.5))
    bars = ax.bar(range(len(labels)), values, yerr=[lows, highs], color=colors, capsize=4)
    ax.bar_label(bars, fmt="%.1f")
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("decode tokens/s")
    ax.set_title(textwrap.fill(caption, 90), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":  # the llama.cpp baseline's child process: python -m runner.bench JOB_JSON
    import json
    import sys

    print(json.dumps(_llamacpp_rate(json.loads(sys.argv[1]))))
