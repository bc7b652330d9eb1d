"""What `runner bench` measures of one recipe, and how it shows it: a Markdown table, a bar chart."""
from __future__ import annotations

import statistics
import textwrap
from dataclasses import asdict, dataclass, field

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
    threads: int | None = None  # the recipe's threads; None: torch's count, adapted to the load on the CPU
    threads_at_end: int | None = None  # torch's count when the timed runs ended (one process only)

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


def context_ratios(label: str, rows: list[Figures]) -> dict:
    """One recipe's rows at several prompt lengths: its decode speed after each length over that
    after the shortest, of the medians and of the best runs (on a machine whose speed swings from
    minute to minute, the best runs are the least disturbed): {"recipe": label, "ratios":
    {prompt tokens: {"median": ratio, "best": ratio}}}."""
    shortest = min(rows, key=lambda r: r.prompt_tokens)
    return {"recipe": label, "ratios": {
        r.prompt_tokens: {"median": r.median / shortest.median,
                          "best": max(r.decode_tokens_per_s) / max(shortest.decode_tokens_per_s)} for r in rows}}


def threads_ratio(own: Figures, one: Figures) -> dict:
    """A recipe's decode at its own threads over its decode at threads=1 (medians): {"recipe":
    own's label, "own": tok/s, "threads_1": tok/s, "ratio": own over threads_1}."""
    return {"recipe": own.label, "own": own.median, "threads_1": one.median, "ratio": own.median / one.median}


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
