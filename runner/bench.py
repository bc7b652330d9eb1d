"""`runner bench`: decode speed, latency, memory and bandwidth of recipes, measured in one run.

Figures, never assertions: tests check correctness, this measures speed. Every recipe runs the
same prompt and length after a warm-up (which also compiles compiled steps); medians over N runs.
"""
from __future__ import annotations

import statistics
from pathlib import Path
import time
from dataclasses import asdict, dataclass, field

import torch

from runner import pipeline
from runner.config.schema import Recipe


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
    vs_hf_ratio: float | None = None
    hf_decode_tokens_per_s: float | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.decode_tokens_per_s)

    @property
    def bandwidth_gb_s(self) -> float:
        return self.bytes_per_token * self.median / 1e9

    def as_dict(self) -> dict:
        out = asdict(self)
        out.update(decode_tokens_per_s_median=self.median, effective_bandwidth_gb_s=self.bandwidth_gb_s)
        return out


def measure(recipe: Recipe, recipe_file: str, label: str, runs: int, new_tokens: int,
            note=None) -> tuple[Figures, pipeline.Pipeline, list[int]]:
    """Build the recipe's pipeline, warm it up, then time `runs` greedy-or-sampled generations."""
    built = pipeline.build(recipe, recipe_file, note)
    prompt = pipeline.encode_prompt(built, recipe_file)
    figures = Figures(label)
    figures.compile_seconds = pipeline.warm_up(built, prompt)
    if not figures.compile_seconds:
        pipeline.generate(built, prompt)  # warm caches and allocator
    for i in range(runs):
        _, stats = pipeline.generate(built, prompt, sample_index=i)
        figures.decode_tokens_per_s.append(stats.tokens_per_second)
        figures.time_to_first_token_s.append(stats.time_to_first_token)
        figures.prefill_tokens_per_s.append(stats.prompt_tokens / stats.time_to_first_token)
        figures.peak_memory_bytes = max(figures.peak_memory_bytes, stats.peak_memory_bytes)
    figures.model_bytes, figures.bytes_per_token = weight_bytes(built.model)
    return figures, built, prompt


def weight_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes the model holds, bytes one decode step reads): the embedding table is read one row
    per token, unless the output layer reads it whole (tied embeddings)."""
    tensors = {id(t): t for t in model.state_dict(keep_vars=True).values()}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    embedding = model.tok_embeddings.weight
    tied = model.output is None or getattr(model.output, "weight", None) is embedding
    return total, total if tied else total - embedding.numel() * embedding.element_size()


def hf_decode_speed(built: pipeline.Pipeline, prompt: list[int], new_tokens: int, runs: int) -> float:
    """HF transformers' greedy `generate` decode tokens/s on the same weights, dtype, threads and prompt.

    Decode rate = (n - 1) / (time(n tokens) - time(1 token)), so prefill is excluded as in ours.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from runner.loaders import load_state_dict, stored_quant
    from runner.loaders.hf_layout import hf_config, to_hf

    recipe = built.recipe
    path = Path(recipe.model.checkpoint)
    if stored_quant(path) is not None:
        raise ValueError("--vs hf needs a float checkpoint (HF runs the float weights)")
    spec = recipe.model.arch
    state = to_hf(load_state_dict(path, spec), spec)
    dtype = built.model.norm.weight.dtype
    hf = LlamaForCausalLM(LlamaConfig(**hf_config(spec), dtype=dtype)).to(dtype).eval()
    hf.load_state_dict(state, strict=False)
    if spec.tie_embeddings:
        hf.tie_weights()
    ids = torch.tensor([prompt])

    def timed(n: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                        do_sample=False, pad_token_id=0)
        return time.perf_counter() - start

    timed(4)  # warm-up
    rates = []
    for _ in range(runs):
        rates.append((new_tokens - 1) / (timed(new_tokens) - timed(1)))
    return statistics.median(rates)


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


def table(rows: list[Figures], roofline: float | None) -> str:
    """A Markdown comparison table."""
    head = ["recipe", "decode tok/s (median [min, max])", "TTFT ms", "prefill tok/s", "model MB", "GB/s",
            "peak MiB", "compile s", "vs HF"]
    if roofline:
        head.insert(6, "of roofline")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.label, f"{r.median:.1f} [{min(r.decode_tokens_per_s):.1f}, {max(r.decode_tokens_per_s):.1f}]",
                 f"{statistics.median(r.time_to_first_token_s) * 1000:.0f}",
                 f"{statistics.median(r.prefill_tokens_per_s):.0f}", f"{r.model_bytes / 1e6:.0f}",
                 f"{r.bandwidth_gb_s:.1f}", f"{r.peak_memory_bytes / 2**20:.0f}", f"{r.compile_seconds:.1f}",
                 "" if r.vs_hf_ratio is None else f"{r.vs_hf_ratio:.2f}x ({r.hf_decode_tokens_per_s:.1f} tok/s)"]
        if roofline:
            cells.insert(6, f"{r.bandwidth_gb_s / roofline:.0%}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
