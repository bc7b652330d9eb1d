"""runner's CPU kernels (the C++ files beside this one), built once per machine, instruction set
and torch version, and the ops that use them.

They are compiled on first use into one library (unity.cpp includes the others: one translation
unit, so calls between op families inline as before the split), with the host compiler, for one *target*: the
best instruction set the CPU reports (TARGETS, best first), never -march=native, so what a
library needs is known and recorded beside it. The build is cached under
RUNNER_HOME/kernels/<target>-<hash>; a library is loaded only after checking that this CPU has
every feature its target needs, so a cache copied from another machine is refused with a note,
never run into an illegal instruction.

The kernels register as torch ops (torch.ops.runner.*), with fake implementations so
torch.compile can trace them. KernelOps, one per model, has the signatures of the reference
math in runner.model.functional and uses a kernel where one applies (CPU, float32 or bfloat16:
the GEMV kernels for a few rows at a time, RoPE and the cache write for prompts), the reference
elsewhere.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from runner.kernels import gemm
from runner.kernels.shm_reduce import ShmGroup
from runner.model import functional
from runner.paths import runner_home

_HERE = Path(__file__).parent
SOURCES = tuple(sorted(_HERE.glob("*.cpp")))  # every file the library is built from (ops.cpp registers the ops)
HEADERS = tuple(sorted(_HERE.glob("*.h")))  # what they share: in the cache key with them
UNITY = _HERE / "unity.cpp"  # includes the others: one translation unit, so calls across files inline
# -ffp-contract=fast: a * b + c may be one fused multiply-add (C++17 mode turns that off).
FLAGS = ["-O3", "-fopenmp", "-ffp-contract=fast"]
MAX_ROWS = 16  # the GEMV kernel serves up to this many rows (decode, speculative verify); GEMMs go to torch
DTYPES = (torch.float32, torch.bfloat16)
TARGET_VARIABLE = "RUNNER_KERNELS_TARGET"  # build for this target instead of the best one (tests, CI)

# x86-64 microarchitecture levels, as /proc/cpuinfo names their features.
_V3 = frozenset({"avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "movbe", "abm", "xsave"})
_V4 = _V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}


@dataclass(frozen=True)
class Target:
    name: str
    flags: tuple[str, ...]  # what the compiler may use
    needs: frozenset[str]  # the CPU features those flags assume
    vectorised: bool  # every kernel has a vector path here (auto uses the kernels only then)


_X86 = platform.machine().lower() in ("x86_64", "amd64")
TARGETS = (  # best first
    # Every CPU with AVX512-BF16 (Cooper Lake, Sapphire Rapids, Zen 4) has AVX512-VNNI as well.
    Target("avx512-bf16", ("-march=x86-64-v4", "-mavx512bf16", "-mavx512vnni", "-mtune=native"),
           _V4 | {"avx512_bf16", "avx512_vnni"}, True),
    Target("avx512", ("-march=x86-64-v4", "-mtune=native"), _V4, True),
    Target("avx2", ("-march=x86-64-v3", "-mtune=native"), _V3, True),
    Target("generic", ("-march=x86-64", "-mtune=generic") if _X86 else (), frozenset(), False),
) if _X86 else (Target("generic", (), frozenset(), False),)

_loaded: Target | None = None  # the target of the library in this process, once loaded


class KernelsUnavailable(RuntimeError):
    """The kernels could not be built or loaded here; the message says why in one line."""


def cpu_features() -> frozenset[str]:
    """The instruction-set features this CPU (and its OS) report: /proc/cpuinfo's flags on Linux,
    torch's CPU probe elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    probes = {"avx2": _V3, "avx512": _V4, "avx512_bf16": _V4 | {"avx512_bf16"}}
    return frozenset().union(*(features for name, features in probes.items()
                               if getattr(torch.cpu, f"_is_{name}_supported", lambda: False)()))


def choose_target(features: frozenset[str] | None = None) -> Target:
    """The best target this CPU runs, or the one RUNNER_KERNELS_TARGET names (checked)."""
    features = cpu_features() if features is None else features
    wanted = os.environ.get(TARGET_VARIABLE)
    if wanted:
        target = next((t for t in TARGETS if t.name == wanted), None)
        if target is None:
            raise KernelsUnavailable(f"{TARGET_VARIABLE}={wanted} is not a target here; "
                                     f"targets: {', '.join(t.name for t in TARGETS)}")
        _check_cpu(target, features)
        return target
    return next(t for t in TARGETS if t.needs <= features)


def _check_cpu(target: Target, features: frozenset[str]) -> None:
    missing = sorted(target.needs - features)
    if missing:
        raise KernelsUnavailable(f"the {target.name} kernels need CPU features this CPU lacks: {', '.join(missing)}")


def build_dir(target: Target) -> Path:
    # Every file the build reads, by name and content: a change to any of them is a new build.
    files = b"".join(path.name.encode() + b"\0" + path.read_bytes() + b"\0" for path in SOURCES + HEADERS)
    key = hashlib.sha256(files + " ".join(FLAGS + list(target.flags)).encode()
                         + " ".join(sorted(target.needs)).encode() + torch.__version__.encode()
                         + (sysconfig.get_config_var("SOABI") or "").encode()).hexdigest()[:12]
    return runner_home() / "kernels" / f"{target.name}-{key}"


def load(note=None) -> str:
    """Build (once) and load the kernels; returns their target's name (e.g. avx512-bf16)."""
    global _loaded
    if _loaded is not None:
        return _loaded.name
    target = choose_target()
    where = build_dir(target)
    record = where / "target.json"  # what the library beside it was built for
    if record.exists():
        try:
            built = json.loads(record.read_text())
            needs = Target(built["name"], (), frozenset(built["needs"]), False)
        except (OSError, ValueError, KeyError, TypeError):
            raise KernelsUnavailable(f"{record} is unreadable, so the library beside it cannot be checked; "
                                     f"remove {where} to rebuild it") from None
        _check_cpu(needs, cpu_features())
    elif note is not None:
        note(f"kernels: building runner's CPU kernels ({target.name}) into {where} (once)")
    where.mkdir(parents=True, exist_ok=True)
    # The ninja wheel's binary sits beside this interpreter's scripts, on PATH or not (a venv's
    # runner called without activating it).
    scripts = sysconfig.get_path("scripts")
    if scripts and scripts not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")
    from torch.utils import cpp_extension

    try:
        cpp_extension.load("runner_kernels", [str(UNITY)], extra_cflags=FLAGS + list(target.flags),
                           extra_ldflags=["-fopenmp"], build_directory=str(where), is_python_module=False,
                           verbose=False)
    except Exception as e:  # a missing compiler or ninja, a failed build: all say the same to the user
        raise KernelsUnavailable(_summary(e)) from None
    if not record.exists():
        record.write_text(json.dumps({"name": target.name, "needs": sorted(target.needs)}))
    _register_fakes()
    _loaded = target
    return target.name


def native_bf16() -> bool:
    """Whether the loaded kernels' CPU has bf16 dot-product instructions (AVX512-BF16), which
    torch's bf16 GEMM needs to run at its fp32 GEMM's rate or better."""
    return _loaded is not None and "avx512_bf16" in _loaded.needs


def prompt_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a prompt's GEMM runs in for activations in `dtype`: fp32 for bf16 on a CPU
    without bf16 dot products (torch's bf16 GEMM runs several times slower than its fp32 GEMM
    there), else `dtype` itself."""
    return torch.float32 if dtype == torch.bfloat16 and not native_bf16() else dtype


def vectorised() -> bool:
    """Whether the loaded kernels have a vector path for every op on this CPU."""
    return _loaded is not None and _loaded.vectorised


def _summary(error: Exception) -> str:
    """The compiler's first error line, not the build's whole output."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    first = next((line for line in lines if "error:" in line), lines[0][:200] if lines else "")
    return f"{type(error).__name__}: {first[:300]}"


def _register_fakes() -> None:
    # What torch.compile's tracing sees: shapes and dtypes only.
    @torch.library.register_fake("runner::linear")
    def _(x, w):
        return x.new_empty(*x.shape[:-1], w.shape[0])

    @torch.library.register_fake("runner::int8_linear")
    def _(x, w, scales, int8_x=False):
        return x.new_empty(*x.shape[:-1], w.shape[0])

    @torch.library.register_fake("runner::int4_linear")
    def _(x, w, scales, zeros, groupsize, int8_x=False):
        return x.new_empty(*x.shape[:-1], w.shape[0])

    @torch.library.register_fake("runner::dequantize_int8")
    def _(w, scales):
        return scales.new_empty(w.shape)

    @torch.library.register_fake("runner::dequantize_int4")
    def _(w, scales, zeros, groupsize):
        return scales.new_empty(w.shape[0], 2 * w.shape[1])

    @torch.library.register_fake("runner::gguf_linear")
    def _(x, blocks, type, int8_x=False):
        return x.new_empty(x.shape[0], blocks.shape[0])

    # GGUF block types (GGMLQuantizationType) -> (values, bytes) per block, as gguf.h reads them.
    gguf_blocks = {2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 12: (256, 144),
                   13: (256, 176), 14: (256, 210)}

    @torch.library.register_fake("runner::dequantize_gguf")
    def _(blocks, type, dtype):
        values, size = gguf_blocks[type]
        return blocks.new_empty(blocks.shape[0], blocks.shape[1] // size * values, dtype=dtype)

    @torch.library.register_fake("runner::rms_norm")
    def _(x, w, eps):
        return torch.empty_like(x)

    @torch.library.register_fake("runner::swiglu")
    def _(gate_up):
        return gate_up.new_empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2)

    @torch.library.register_fake("runner::expert_linear")
    def _(x, w, ids):
        return x.new_empty(x.shape[0], w.shape[1])

    @torch.library.register_fake("runner::int8_expert_linear")
    def _(x, w, scales, ids):
        return x.new_empty(x.shape[0], w.shape[1])

    @torch.library.register_fake("runner::int4_expert_linear")
    def _(x, w, scales, zeros, groupsize, ids):
        return x.new_empty(x.shape[0], w.shape[1])

    @torch.library.register_fake("runner::attend")
    def _(qkv, cos_sin, k_cache, v_cache, input_pos, n_heads, n_kv_heads, window=0, k_scales=None, v_scales=None):
        return qkv.new_empty(qkv.shape[0], qkv.shape[1], n_heads * k_cache.shape[-1])

    @torch.library.register_fake("runner::rope_write")
    def _(qkv, cos_sin, k_cache, v_cache, input_pos, n_heads, n_kv_heads, k_scales=None, v_scales=None):
        return qkv.new_empty(1, n_heads, qkv.shape[1], k_cache.shape[-1])

    @torch.library.register_fake("runner::decode_layers")
    def _(x, norms, eps, weights, parts, groupsizes, cos_sin, k_caches, v_caches, k_scales, v_scales, input_pos,
          n_heads, n_kv_heads, window=0, int8_x=()):
        return torch.empty_like(x)

    @torch.library.register_fake("runner::decode_layers.all_reduce")
    def _(x, norms, eps, weights, parts, groupsizes, cos_sin, k_caches, v_caches, k_scales, v_scales, input_pos,
          n_heads, n_kv_heads, window, int8_x, segment, rank, world_size):
        return torch.empty_like(x)

    @torch.library.register_fake("runner::shm_all_reduce")
    def _(x, segment, rank, world_size):
        return x.new_empty(x.shape)

    @torch.library.register_fake("runner::shm_all_gather")
    def _(x, segment, rank, world_size):
        return x.new_empty(world_size, *x.shape)

    @torch.library.register_fake("runner::causal_attention")
    def _(q, k_cache, v_cache, input_pos, window=0, k_scales=None, v_scales=None):
        return q.new_empty(1, q.shape[2], q.shape[1] * q.shape[3])


def loaded() -> bool:
    return _loaded is not None


def _fits(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in DTYPES


@dataclass
class LayersPlan:
    """decode_layers' operands for a model's layers in one dtype, gathered once and kept: walking
    the modules for them on every step would cost more than a small model's step itself."""
    norms: list[torch.Tensor]
    weights: list[torch.Tensor]
    parts: list[int]
    groupsizes: list[int]
    int8_x: list[int]  # 1 where an int4 linear quantizes its activations to int8
    kv_caches: list  # each layer's KVCache
    k_caches: list[torch.Tensor]  # their tensors, [B, KVH, L, D] each
    v_caches: list[torch.Tensor]
    k_scales: list[torch.Tensor]  # an int8 cache's scales, [B, KVH, L] each; empty for a float cache
    v_scales: list[torch.Tensor]
    eps: float
    n_heads: int
    n_kv_heads: int
    window: int
    shared: ShmGroup | None  # under tensor parallelism: sums wo's and w2's outputs over the ranks
    # The operands above in one torch object (runner::LayerOperands), made at the first eager step:
    # a step that passes it converts four arguments from Python, not several hundred tensors.
    held: object | None = None

    def operands(self) -> tuple:
        """The operands decode_layers takes after x, cos_sin and input_pos, in the op's order."""
        return (self.norms, self.eps, self.weights, self.parts, self.groupsizes, self.k_caches, self.v_caches,
                self.k_scales, self.v_scales, self.n_heads, self.n_kv_heads, self.window, self.int8_x)


def _shared(module) -> ShmGroup | None:
    """The shared-memory all-reduce that follows a layer (runner.sharders.AllReduce holds it), if any."""
    found = [m for m in module.modules() if isinstance(m, ShmGroup)]
    return found[0] if len(found) == 1 else None


def _gather(model, dtype: torch.dtype) -> LayersPlan | None:
    if not model.plain_layers():
        return None
    norms, weights, parts, groupsizes, int8_x, kv_caches = [], [], [], [], [], []
    # Under tensor parallelism each layer's wo and w2 are followed by the one all-reduce.
    shared = _shared(model.layers[0].attention.wo)
    for block in model.layers:
        operands = block.kernel_operands(dtype)
        attention = block.attention
        cache = attention.kv_cache
        if operands is None or cache is None or cache.dtype != dtype:
            return None
        if _shared(attention.wo) is not shared or _shared(block.feed_forward.w2) is not shared:
            return None
        linears, sizes, flags = operands
        norms += [block.attention_norm.weight, block.ffn_norm.weight]
        for each in linears:
            weights += each
            parts.append(len(each))
        groupsizes += sizes
        int8_x += [int(flag) for flag in flags]
        kv_caches.append(cache)
    if len({cache.quantized for cache in kv_caches}) > 1:  # int8 caches beside float ones: each layer on its own
        return None
    first, scales = model.layers[0], kv_caches[0].quantized
    return LayersPlan(norms, weights, parts, groupsizes, int8_x, kv_caches, [c.k for c in kv_caches], [c.v for c in kv_caches],
                      [c.k_scales for c in kv_caches] if scales else [], [c.v_scales for c in kv_caches] if scales else [],
                      first.attention_norm.eps, first.attention.n_heads, first.attention.n_kv_heads,
                      first.attention.window or 0, shared)


class KernelOps:
    """functional's ops, with runner's kernels where they apply, one instance per model (a
    runner.model.llama.Transformer): `model.use_ops(KernelOps())`.

    It keeps the operands of the model's fused decode step (decode_layers) from one step to the
    next, until the model says its tensors changed (Transformer.operands_changed). It holds no
    reference to the model itself, which holds it: a dropped model is freed at once. The other
    ops keep nothing, so a lone layer may take them from the class itself.
    """

    def __init__(self):
        self._plans: dict[tuple[int, torch.dtype], LayersPlan | None] = {}

    def __deepcopy__(self, memo) -> KernelOps:
        # A copied model gathers its own operands (the held ones are a torch object, not copyable).
        return type(self)()

    def operands_changed(self) -> None:
        """Forget the gathered operands; the next decode step gathers them again."""
        self._plans.clear()

    def plan(self, model, dtype: torch.dtype) -> LayersPlan | None:
        """decode_layers' operands of `model` for activations in `dtype` (gathered now, or kept
        from an earlier step), or None where the layers need calls of their own."""
        if torch.compiler.is_compiling():  # traced once into the graph: nothing to keep
            return _gather(model, dtype)
        key = (id(model), dtype)
        if key not in self._plans:
            self._plans[key] = _gather(model, dtype)
        return self._plans[key]

    @staticmethod
    def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if not (_fits(x) and w.dtype == x.dtype):
            return F.linear(x, w)
        if x.numel() <= MAX_ROWS * x.shape[-1]:
            return torch.ops.runner.linear(x, w)
        return gemm.linear(x, w, prompt_dtype(x.dtype))

    @staticmethod
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if _fits(x) and weight.dtype == x.dtype:
            return torch.ops.runner.rms_norm(x, weight, eps)
        return functional.rms_norm(x, weight, eps)

    @staticmethod
    def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
        if _fits(gate_up):
            return torch.ops.runner.swiglu(gate_up)
        return functional.swiglu(gate_up)

    route = staticmethod(functional.route)
    geglu = staticmethod(functional.geglu)

    @classmethod
    def norm_heads(cls, qkv, q_weight, k_weight, eps: float, n_heads: int, n_kv_heads: int) -> torch.Tensor:
        return functional.norm_heads(qkv, q_weight, k_weight, eps, n_heads, n_kv_heads, cls.rms_norm)

    @staticmethod
    def expert_linear(x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if _fits(x) and w.dtype == x.dtype and x.shape[0] <= MAX_ROWS:
            return torch.ops.runner.expert_linear(x, w, ids)
        return functional.expert_linear(x, w, ids)

    def decode_layers(self, model, x: torch.Tensor, cos_sin: torch.Tensor, input_pos: torch.Tensor,
                      row) -> torch.Tensor | None:
        """A few tokens through every layer of `model` in one kernel call (the calls attend,
        linear and the rest would make one by one, in the same order, in one parallel region,
        with a tensor-parallel rank's shared-memory all-reduces), or None where one of them would
        not run: a mixture of experts, an all-reduce through gloo, a layer on another kernel or in
        another dtype."""
        if not (_fits(x) and x.shape[0] * x.shape[1] <= MAX_ROWS and cos_sin.shape[-1] == model.spec.head_size):
            return None
        plan = self.plan(model, x.dtype)
        if plan is None:
            return None
        k_caches, v_caches, k_scales, v_scales = plan.k_caches, plan.v_caches, plan.k_scales, plan.v_scales
        if row is not None:
            rows = [cache.row(row) for cache in plan.kv_caches]
            k_caches, v_caches = [r.k for r in rows], [r.v for r in rows]
            if k_scales:
                k_scales, v_scales = [r.k_scales for r in rows], [r.v_scales for r in rows]
        if not (k_caches[0].shape[0] == x.shape[0] and k_caches[0].is_contiguous()):
            return None
        if row is None and plan.shared is None and not torch.compiler.is_compiling():
            # Eager steps on the whole cache pass the held operands. A traced step keeps the op
            # whose schema names the caches it writes; a row's caches are views made per step.
            if plan.held is None:
                plan.held = torch.classes.runner.LayerOperands(*plan.operands())
            return torch.ops.runner.decode_layers.held(x, plan.held, cos_sin, input_pos)
        operands = (x, plan.norms, plan.eps, plan.weights, plan.parts, plan.groupsizes, cos_sin, k_caches, v_caches,
                    k_scales, v_scales, input_pos, plan.n_heads, plan.n_kv_heads, plan.window, plan.int8_x)
        if plan.shared is None:
            return torch.ops.runner.decode_layers(*operands)
        shared = plan.shared
        return torch.ops.runner.decode_layers.all_reduce(*operands, shared.segment, shared.rank, shared.world_size)

    @staticmethod
    def attend(qkv, cos_sin, cache, input_pos, mask, n_heads: int, n_kv_heads: int,
               window: int | None = None, scale: float | None = None, softcap: float | None = None) -> torch.Tensor:
        # runner's kernels scale scores by 1 / sqrt(D), cap none and turn whole heads.
        plain = scale is None and softcap is None and cos_sin.shape[-1] == cache.k.shape[-1]
        if not (plain and _fits(qkv) and cache.dtype == qkv.dtype and cache.k.shape[0] == qkv.shape[0]
                and cache.k.is_contiguous()):
            return functional.attend(qkv, cos_sin, cache, input_pos, mask, n_heads, n_kv_heads, window, scale, softcap)
        scales = (cache.k_scales, cache.v_scales)  # (None, None) for a float cache
        if qkv.shape[1] <= MAX_ROWS:  # a few tokens of each row (decode, verify), at shared or per-row positions
            return torch.ops.runner.attend(qkv, cos_sin, cache.k, cache.v, input_pos, n_heads, n_kv_heads, window or 0,
                                           *scales)
        if qkv.shape[0] > 1:  # prompts of several rows at once: torch's ops
            return functional.attend(qkv, cos_sin, cache, input_pos, mask, n_heads, n_kv_heads)
        input_pos = input_pos.reshape(-1)  # one row's positions, [T] or [1, T]
        # A prompt: RoPE and the cache write in one pass, where torch's ops cast, concatenate and
        # copy; then causal attention over the cache by positions, block by block, where torch's
        # flash attention runs well below its GEMM rate on these shapes.
        q = torch.ops.runner.rope_write(qkv, cos_sin, cache.k, cache.v, input_pos, n_heads, n_kv_heads, *scales)  # [1, H, T, D]
        return torch.ops.runner.causal_attention(q, cache.k, cache.v, input_pos, window or 0, *scales)
