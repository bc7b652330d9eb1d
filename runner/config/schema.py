"""The recipe schema: one frozen dataclass per section, merged onto by omegaconf.

Ranges and cross-field rules live in each section's `problems()` so that the
resolver can gather every problem of a recipe before raising.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from omegaconf import MISSING


class DType(Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class TokenizerKind(Enum):
    sentencepiece = "sentencepiece"
    tiktoken = "tiktoken"
    gguf = "gguf"  # the vocabulary inside a llama.cpp .gguf file (gpt2-style BPE)
    hf = "hf"  # a Hugging Face tokenizer.json (byte-level BPE), or a folder holding one


class QuantMode(Enum):
    none = "none"
    int8 = "int8"  # weight-only, symmetric, one scale per output channel
    int4 = "int4"  # weight-only, asymmetric, a scale and a zero per quant.groupsize inputs
    int4_gptq = "int4-gptq"  # int4's layout, rounded by GPTQ on calibration activations
    gguf = "gguf"  # a GGUF file's quantized tensors as stored, each in its own type (runner.quant.gguf)

    @property
    def is_int4(self) -> bool:
        """int4 or int4-gptq: the modes that store int4 levels in groups of quant.groupsize."""
        return self in (QuantMode.int4, QuantMode.int4_gptq)


class QuantOutput(Enum):
    """How the output (logits) layer is stored when the rest is quantized."""

    keep = "keep"  # the model's float dtype
    int8 = "int8"
    same = "same"  # as quant.mode


class QuantActivations(Enum):
    """What the int4 layers' weights meet when decoding on runner's CPU kernels."""

    float = "float"  # the activations as they are (the model's dtype)
    int8 = "int8"  # quantized to int8 per group of quant.groupsize inputs, as llama.cpp does: integer dot products


class QuantKVCache(Enum):
    """What the KV cache stores."""

    float = "float"  # keys and values in the model's dtype
    int8 = "int8"  # int8 with a scale per position and key head (half a bf16 cache's bytes); queries are
    # rounded to int8 per head for the scores, as llama.cpp does with a q8_0 cache


class QuantEmbedding(Enum):
    keep = "keep"
    int8 = "int8"


ROPE_TYPES = ("llama3", "linear", "dynamic", "yarn", "longrope")
ACTIVATIONS = ("silu", "gelu_tanh")
FAMILIES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling, each type as HF transformers defines it (absent: plain RoPE).

    llama3: Llama-3.1's long wavelengths slowed by `factor`, blended between the two band edges.
    linear: every frequency divided by `factor`. dynamic: NTK scaling, RoPE's base raised once a
    forward reaches past original_max_position_embeddings. yarn: YaRN's blend of interpolated and
    extrapolated frequencies with an attention factor. longrope (Phi-3): per-frequency divisors,
    short_factor within original_max_position_embeddings and long_factor beyond.
    """

    type: str = "llama3"
    factor: float = 8.0
    original_max_position_embeddings: int = 8192
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    mscale: Optional[float] = None  # yarn (DeepSeek's variant)
    mscale_all_dim: Optional[float] = None  # yarn (DeepSeek's variant)
    truncate: bool = True  # yarn: round the correction range to whole dimensions
    attention_factor: Optional[float] = None  # yarn, longrope: cos and sin scaled by it; None: the type's formula
    short_factor: Optional[list[float]] = None  # longrope: one divisor per frequency
    long_factor: Optional[list[float]] = None  # longrope

    def problems(self) -> list[tuple[str, object, str]]:
        out = []
        if self.type not in ROPE_TYPES:
            out.append(("rope_scaling.type", self.type, f"must be one of {', '.join(ROPE_TYPES)}"))
        if self.factor <= 0:
            out.append(("rope_scaling.factor", self.factor, "must be > 0"))
        if self.original_max_position_embeddings < 1:
            out.append(("rope_scaling.original_max_position_embeddings", self.original_max_position_embeddings, "must be >= 1"))
        if self.type == "longrope" and (self.short_factor is None or self.long_factor is None):
            out.append(("rope_scaling.short_factor", self.short_factor, "longrope needs short_factor and long_factor"))
        return out


@dataclass(frozen=True)
class ModelSpec:
    """A LLaMA-family architecture, as declared by specs/NAME.yaml."""

    dim: int = MISSING
    n_layers: int = MISSING
    n_heads: int = MISSING
    vocab_size: int = MISSING
    intermediate_size: int = MISSING
    n_kv_heads: Optional[int] = None  # None: same as n_heads (MHA)
    head_dim: Optional[int] = None  # None: dim // n_heads
    max_seq_len: int = 2048
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    tie_embeddings: bool = False
    # Mixture of experts (Mixtral): n_experts SwiGLU feed-forwards per layer, each token routed to
    # n_experts_per_token of them. None: one dense feed-forward.
    n_experts: Optional[int] = None
    n_experts_per_token: int = 2
    # Keys older than this many positions are masked (Mistral); None: full causal attention.
    sliding_window: Optional[int] = None
    # With sliding_window, layer i attends globally when i + 1 is a multiple of this (Gemma 2: 2,
    # Gemma 3: 6); None: every layer windowed.
    global_every: Optional[int] = None
    # What the families beyond LLaMA add; each default is LLaMA's.
    family: str = "llama"  # HF's model_type for these weights: the names loaders and writers use
    qkv_bias: bool = False  # Qwen2: biases on q, k and v
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over each head's queries and keys, before RoPE
    norm_offset: float = 0.0  # Gemma: HF's norm weights are w in x * (offset + w); loaders fold it in
    scale_embeddings: bool = False  # Gemma: embeddings times sqrt(dim), rounded to the model's dtype
    activation: str = "silu"  # the feed-forward's gate: silu (SwiGLU) or gelu_tanh (Gemma's GeGLU)
    sandwich_norms: bool = False  # Gemma 2/3: RMSNorm after attention and the feed-forward as well as before
    query_pre_attn_scalar: Optional[int] = None  # scores scaled by its -1/2 power; None: head_dim's
    attn_logit_softcap: Optional[float] = None  # Gemma 2: scores become cap * tanh(scores / cap)
    final_logit_softcap: Optional[float] = None  # Gemma 2: logits likewise
    rope_local_theta: Optional[float] = None  # Gemma 3: windowed layers' RoPE base, unscaled; None: as global
    partial_rotary_factor: float = 1.0  # Phi-4-mini: RoPE turns this leading fraction of each head

    @property
    def moe(self) -> bool:
        return self.n_experts is not None

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or (self.dim // self.n_heads if self.n_heads > 0 else 0)  # n_heads < 1: reported apart

    @property
    def rotary_dim(self) -> int:
        """The leading dimensions of each head that RoPE turns (HF: int(head_dim * partial_rotary_factor))."""
        return int(self.head_size * self.partial_rotary_factor)

    def window(self, layer: int) -> int | None:
        """Layer `layer`'s sliding window, or None where it attends globally."""
        if self.sliding_window is None or self.global_every and (layer + 1) % self.global_every == 0:
            return None
        return self.sliding_window

    def local_rope(self, layer: int) -> bool:
        """Whether layer `layer` turns by the local RoPE (rope_local_theta, unscaled)."""
        return self.rope_local_theta is not None and self.window(layer) is not None

    def problems(self) -> list[tuple[str, object, str]]:
        out = []
        for key in ("dim", "n_layers", "n_heads", "vocab_size", "intermediate_size", "max_seq_len"):
            if getattr(self, key) < 1:
                out.append((key, getattr(self, key), "must be >= 1"))
        if self.n_heads >= 1 and self.n_heads % self.kv_heads:
            out.append(("n_kv_heads", self.n_kv_heads, f"must divide n_heads ({self.n_heads})"))
        if self.head_dim is None and self.n_heads >= 1 and self.dim % self.n_heads:
            out.append(("n_heads", self.n_heads, f"must divide dim ({self.dim}) unless head_dim is set"))
        if self.head_size % 2:
            out.append(("head_dim", self.head_size, "must be even (RoPE rotates pairs)"))
        if self.norm_eps <= 0:
            out.append(("norm_eps", self.norm_eps, "must be > 0"))
        if self.rope_theta <= 0:
            out.append(("rope_theta", self.rope_theta, "must be > 0"))
        if self.n_experts is not None and self.n_experts < 1:
            out.append(("n_experts", self.n_experts, "must be >= 1, or null for a dense feed-forward"))
        elif self.n_experts is not None and not 1 <= self.n_experts_per_token <= self.n_experts:
            out.append(("n_experts_per_token", self.n_experts_per_token, f"must be 1 to n_experts ({self.n_experts})"))
        if self.sliding_window is not None and self.sliding_window < 1:
            out.append(("sliding_window", self.sliding_window, "must be >= 1, or null for full attention"))
        if self.global_every is not None and self.global_every < 1:
            out.append(("global_every", self.global_every, "must be >= 1, or null for every layer windowed"))
        if self.family not in FAMILIES:
            out.append(("family", self.family, f"must be one of {', '.join(FAMILIES)}"))
        if self.activation not in ACTIVATIONS:
            out.append(("activation", self.activation, f"must be one of {', '.join(ACTIVATIONS)}"))
        for key in ("query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap", "rope_local_theta"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                out.append((key, getattr(self, key), "must be > 0, or null"))
        if not 0 < self.partial_rotary_factor <= 1:
            out.append(("partial_rotary_factor", self.partial_rotary_factor, "must be in (0, 1]"))
        elif self.rotary_dim % 2:
            out.append(("partial_rotary_factor", self.partial_rotary_factor,
                        f"must turn an even number of each head's {self.head_size} dimensions"))
        if self.rope_scaling is not None:
            out += self.rope_scaling.problems()
        return out


@dataclass(frozen=True)
class ModelSection:
    spec: Optional[str] = None  # specs/NAME.yaml; None: the checkpoint folder's name
    checkpoint: str = MISSING
    source: Optional[str] = None  # where to get the checkpoint when it is missing
    arch: ModelSpec = field(default_factory=ModelSpec)  # the spec, merged in; any field overridable

    def problems(self) -> list[tuple[str, object, str]]:
        return [(f"arch.{key}", value, why) for key, value, why in self.arch.problems()]


@dataclass(frozen=True)
class TokenizerSection:
    kind: TokenizerKind = MISSING
    path: Optional[str] = None  # None: the file the model's source provides
    # tiktoken only: the regex that splits text before BPE (default: Llama-3's) and the
    # special tokens appended after the ranks (default: Llama-3's 256).
    pattern: Optional[str] = None
    special_tokens: Optional[list[str]] = None
    bos: Optional[str] = None  # token text; None: the tokenizer's own
    eos: Optional[str] = None

    def problems(self) -> list[tuple[str, object, str]]:
        return []


INT4_GROUPSIZES = (32, 64, 128, 256)  # what torch's int4 kernels accept


@dataclass(frozen=True)
class QuantCalibration:
    """GPTQ's calibration data: `samples` windows of `seq_len` tokens cut from a text file."""

    path: Optional[str] = None
    samples: int = 128
    seq_len: int = 512


@dataclass(frozen=True)
class QuantSection:
    mode: QuantMode = QuantMode.none
    groupsize: int = 128  # int4 modes: consecutive inputs sharing one scale and zero
    output: QuantOutput = QuantOutput.keep
    embedding: QuantEmbedding = QuantEmbedding.keep
    activations: QuantActivations = QuantActivations.float  # int4 modes (and their int8 output layer), decoding on runner's CPU kernels
    kv_cache: QuantKVCache = QuantKVCache.float  # any mode (none too), every device
    calibration: QuantCalibration = field(default_factory=QuantCalibration)  # int4-gptq only
    damping: float = 0.01  # int4-gptq: added to the Hessian's diagonal, times its mean
    block_size: int = 128  # int4-gptq: columns per lazy batch update (speed only)

    def problems(self) -> list[tuple[str, object, str]]:
        out = []
        int4 = self.mode.is_int4
        if int4 and self.groupsize not in INT4_GROUPSIZES:
            out.append(("groupsize", self.groupsize, f"must be one of {', '.join(map(str, INT4_GROUPSIZES))}"))
        if self.activations is not QuantActivations.float and not (int4 or self.mode is QuantMode.gguf):
            out.append(("activations", self.activations.value, "int8 applies to the int4 modes (int4, int4-gptq) "
                        "and gguf only"))
        if self.mode is QuantMode.gguf:
            for key, keep in (("output", QuantOutput.keep), ("embedding", QuantEmbedding.keep)):
                if getattr(self, key) is not keep:
                    out.append((key, getattr(self, key).value, "must be keep under quant.mode gguf: the output "
                                "layer and the embedding keep the file's own types"))
        if self.mode is QuantMode.none:
            for key, keep in (("output", QuantOutput.keep), ("embedding", QuantEmbedding.keep)):
                if getattr(self, key) is not keep:
                    out.append((key, getattr(self, key).value, "only applies when quant.mode is not none"))
        if self.mode is QuantMode.int4_gptq:
            if self.calibration.path is None:
                out.append(("calibration.path", None, "is required by int4-gptq: a text file to calibrate on"))
            for key in ("samples", "seq_len"):
                if getattr(self.calibration, key) < 1:
                    out.append((f"calibration.{key}", getattr(self.calibration, key), "must be >= 1"))
            if not 0 < self.damping < 1:
                out.append(("damping", self.damping, "must be in (0, 1): a fraction of the Hessian's mean diagonal"))
            if self.block_size < 1:
                out.append(("block_size", self.block_size, "must be >= 1"))
        return out


class DraftKind(Enum):
    none = "none"  # plain decoding
    model = "model"  # a second (smaller or quantized) model drafts
    ngram = "ngram"  # prompt lookup: drafts copied from earlier n-gram matches in the context


@dataclass(frozen=True)
class NGramSection:
    max_n: int = 3  # longest suffix n-gram looked up
    min_n: int = 1  # shortest


@dataclass(frozen=True)
class DraftSection:
    """Speculative decoding: what drafts tokens for the target to verify."""

    kind: DraftKind = DraftKind.none
    speculate_k: int = 5  # tokens drafted per target forward
    model: Optional[ModelSection] = None  # kind: model; e.g. ${model} with quant.mode int4
    quant: QuantSection = field(default_factory=QuantSection)  # the draft model's own quantization
    ngram: NGramSection = field(default_factory=NGramSection)

    def problems(self) -> list[tuple[str, object, str]]:
        out = []
        if self.kind is DraftKind.none:
            if self.model is not None:
                out.append(("kind", "none", "must be 'model' for draft.model to be used (or remove draft.model)"))
            return out
        if self.speculate_k < 1:
            out.append(("speculate_k", self.speculate_k, "must be >= 1"))
        if self.kind is DraftKind.model:
            if self.model is None:
                out.append(("model", None, "is required by draft.kind: model (e.g. ${model} to draft with the target itself, quantized)"))
            else:
                out += [(f"model.{key}", value, why) for key, value, why in self.model.problems()]
            out += [(f"quant.{key}", value, why) for key, value, why in self.quant.problems()]
        if self.kind is DraftKind.ngram and not 1 <= self.ngram.min_n <= self.ngram.max_n:
            out.append(("ngram.min_n", self.ngram.min_n, f"must be in [1, ngram.max_n={self.ngram.max_n}]"))
        return out


@dataclass(frozen=True)
class ParallelSection:
    world_size: int = 1  # tensor-parallel ranks; > 1 spawns them (or joins torchrun's)
    backend: Optional[str] = None  # torch.distributed backend; None: gloo on CPU, nccl on CUDA

    def problems(self) -> list[tuple[str, object, str]]:
        out = []
        if self.world_size < 1:
            out.append(("world_size", self.world_size, "must be >= 1"))
        if self.backend is not None and self.backend not in BACKENDS:
            out.append(("backend", self.backend, f"must be one of {', '.join(BACKENDS)}, or null for the device's"))
        return out


BACKENDS = ("gloo", "nccl")


def tp_problems(arch: ModelSpec, world_size: int, groupsize: int | None = None) -> list[tuple[str, object, str]]:
    """Why `arch` cannot be split over `world_size` ranks: whole heads per rank, whole kv heads per
    rank or whole groups of ranks per kv head (each rank of a group a copy of it: runner.sharders),
    an equal share of the feed-forward, and (int4, `groupsize`) input splits on group boundaries."""
    def splits(n: int) -> bool:
        kv = arch.kv_heads
        return (arch.n_heads % n == 0 and (kv % n == 0 or n % kv == 0) and arch.intermediate_size % n == 0
                and (groupsize is None or (arch.n_heads // n * arch.head_size % groupsize == 0
                                           and arch.intermediate_size // n % groupsize == 0)))

    if world_size <= 1 or splits(world_size):
        return []
    works = [1] + [n for n in range(2, 65) if splits(n)]
    why = (f"does not split n_heads={arch.n_heads}, n_kv_heads={arch.kv_heads} and "
           f"intermediate_size={arch.intermediate_size} into whole shares")
    if groupsize is not None:
        why += f" whose int4 input splits keep whole groups of {groupsize} (quant.groupsize)"
    return [("world_size", world_size, f"{why}; world sizes that work: {', '.join(map(str, works))}")]


class CompileMode(Enum):
    default = "default"
    reduce_overhead = "reduce-overhead"
    max_autotune = "max-autotune"
    max_autotune_no_cudagraphs = "max-autotune-no-cudagraphs"


class CompileFallback(Enum):
    none = "none"  # a compile failure stops the run with the compiler's error, summarised
    eager = "eager"  # a compile failure is reported and the run goes on in eager mode


@dataclass(frozen=True)
class CompileSection:
    """torch.compile of the model's forward, as a step transform."""

    decode: bool = False  # the one-token step (static shapes: compiled once)
    prefill: bool = False  # the prompt pass and speculative verification (dynamic shapes)
    mode: CompileMode = CompileMode.default
    fullgraph: bool = True  # a graph break is an error rather than a silent slowdown
    dynamic: Optional[bool] = None  # prefill's dynamic-shape setting; None: torch decides
    cache_dir: Optional[str] = None  # inductor's cache (TORCHINDUCTOR_CACHE_DIR); None: torch's default
    fallback: CompileFallback = CompileFallback.none

    def problems(self) -> list[tuple[str, object, str]]:
        return []


class Kernels(Enum):
    auto = "auto"  # runner's CPU kernels where they build and apply; torch's ops otherwise (with a note)
    runner = "runner"  # runner's CPU kernels, or stop with why they cannot be built
    torch = "torch"  # torch's ops only (the reference math)


@dataclass(frozen=True)
class GenerateSection:
    prompt: str = "Hello, my name is"
    prompt_file: Optional[str] = None  # the prompt's text from this file ("-": standard input), instead of prompt
    max_new_tokens: int = 200
    temperature: float = 0.8  # 0: greedy
    top_k: Optional[int] = 200  # None: no top-k filter
    top_p: float = 1.0  # 1: no nucleus filter
    min_p: float = 0.0  # 0: none; else drop tokens below min_p times the likeliest one's probability
    repetition_penalty: float = 1.0  # HF's, over prompt and output: a seen token's logit / it (x it if < 0)
    presence_penalty: float = 0.0  # OpenAI's, over the output: less this for a token that occurs
    frequency_penalty: float = 0.0  # OpenAI's: less this times the token's count in the output
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    seed: int = 1234
    num_samples: int = 1
    chat: bool = False  # wrap the prompt in the tokenizer's chat template as a user message
    system: Optional[str] = None  # a system message before the user's (chat template; `runner chat`)
    stop: list[str] = field(default_factory=list)  # generation ends where the text contains one (not printed)
    # Structured output: every sample is JSON this schema accepts (a mapping, or its JSON text;
    # {type: object} for any object). Checked when the tokenizer is built (runner.decoders.grammar).
    json_schema: Optional[Any] = None
    cache_len: Optional[int] = None  # None: prompt + max_new_tokens, capped at arch.max_seq_len
    # Several prompts decoded together, one batch row each (with num_samples rows per prompt);
    # empty: the one `prompt`.
    prompts: list[str] = field(default_factory=list)

    def problems(self) -> list[tuple[str, object, str]]:
        out = []
        if self.max_new_tokens < 1:
            out.append(("max_new_tokens", self.max_new_tokens, "must be >= 1"))
        if self.temperature < 0:
            out.append(("temperature", self.temperature, "must be >= 0 (0 is greedy)"))
        if self.top_k is not None and self.top_k < 1:
            out.append(("top_k", self.top_k, "must be >= 1, or null for no top-k filter"))
        if not 0 < self.top_p <= 1:
            out.append(("top_p", self.top_p, "must be in (0, 1]"))
        if not 0 <= self.min_p <= 1:
            out.append(("min_p", self.min_p, "must be in [0, 1] (0: none)"))
        if not 0 < self.repetition_penalty <= 100:
            out.append(("repetition_penalty", self.repetition_penalty, "must be > 0 (and at most 100; 1: none)"))
        for key in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, key) <= 2:
                out.append((key, getattr(self, key), "must be between -2 and 2 (0: none)"))
        bad = {token: bias for token, bias in self.logit_bias.items() if token < 0 or not -100 <= bias <= 100}
        if bad:
            out.append(("logit_bias", bad, "maps token ids (>= 0) to biases between -100 and 100"))
        if self.num_samples < 1:
            out.append(("num_samples", self.num_samples, "must be >= 1"))
        if any(not stop for stop in self.stop):
            out.append(("stop", list(self.stop), "stop strings must not be empty"))
        if any(not prompt for prompt in self.prompts):
            out.append(("prompts", list(self.prompts), "prompts must not be empty"))
        if self.cache_len is not None and self.cache_len < 2:
            out.append(("cache_len", self.cache_len, "must be >= 2, or null to size it from the prompt"))
        return out


@dataclass(frozen=True)
class Recipe:
    model: ModelSection = field(default_factory=ModelSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    quant: QuantSection = field(default_factory=QuantSection)
    draft: DraftSection = field(default_factory=DraftSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    compile: CompileSection = field(default_factory=CompileSection)
    generate: GenerateSection = field(default_factory=GenerateSection)
    device: str = "cpu"
    dtype: DType = DType.float32
    threads: Optional[int] = None  # torch intra-op threads; None: torch's default (one per core)
    kernels: Kernels = Kernels.auto  # the math of batch-1 decoding on CPU (runner.kernels)

    def problems(self) -> list[tuple[str, object, str]]:
        out = []
        for name in ("model", "tokenizer", "quant", "draft", "parallel", "compile", "generate"):
            out += [(f"{name}.{key}", value, why) for key, value, why in getattr(self, name).problems()]
        draft = self.draft.model
        if self.draft.kind is DraftKind.model and draft is not None and draft.arch.vocab_size != self.model.arch.vocab_size:
            out.append(("draft.model.arch.vocab_size", draft.arch.vocab_size,
                        f"must equal the target's vocabulary (model.arch.vocab_size={self.model.arch.vocab_size})"))
        int4 = self.quant.mode.is_int4
        out += [(f"parallel.{key}", value, why) for key, value, why in
                tp_problems(self.model.arch, self.parallel.world_size, self.quant.groupsize if int4 else None)]
        kind = self.device.split(":")[0]
        if kind not in ("cpu", "cuda", "mps"):
            out.append(("device", self.device, "must be cpu, cuda, cuda:N or mps"))
        if self.threads is not None and not 1 <= self.threads <= 4096:
            out.append(("threads", self.threads, "must be >= 1 (and at most 4096), or null for torch's default"))
        if not 0 <= self.generate.seed < 2**63:
            out.append(("generate.seed", self.generate.seed, "must be between 0 and 2**63 - 1"))
        vocab = self.model.arch.vocab_size
        outside = sorted(t for t in self.generate.logit_bias if isinstance(vocab, int) and t >= vocab)
        if outside:
            out.append(("generate.logit_bias", outside, f"token ids must be below the vocabulary's {vocab}"))
        adjusting = [key for key, off in (("repetition_penalty", 1.0), ("presence_penalty", 0.0),
                                          ("frequency_penalty", 0.0)) if getattr(self.generate, key) != off]
        adjusting += ["logit_bias"] * bool(self.generate.logit_bias)
        if self.draft.kind is not DraftKind.none and adjusting:
            out += [(f"generate.{key}", getattr(self.generate, key), f"depends on the text so far, which speculative "
                     f"decoding (draft.kind: {self.draft.kind.value}) does not track; use draft.kind: none")
                    for key in adjusting]
        cache = self.generate.cache_len
        if cache is not None and isinstance(self.model.arch.max_seq_len, int) and cache > self.model.arch.max_seq_len:
            out.append(("generate.cache_len", cache, f"must be at most model.arch.max_seq_len "
                                                      f"({self.model.arch.max_seq_len})"))
        return out
