"""runner's CPU kernels (cpu.cpp), built once per machine and torch version, and the ops that use them.

The kernels are compiled on first use with the host compiler for the host CPU (-march=native:
AVX512-BF16 where the machine has it) and cached under RUNNER_HOME/kernels. They register as
torch ops (torch.ops.runner.*), with fake implementations so torch.compile can trace them.

KernelOps has the signatures of the reference math in runner.model.functional and uses a kernel
where one applies (CPU, float32 or bfloat16, a few rows at a time), the reference elsewhere.
"""
from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path

import torch
import torch.nn.functional as F

from runner.model import functional

SOURCE = Path(__file__).with_name("cpu.cpp")
FLAGS = ["-O3", "-march=native", "-fopenmp"]
MAX_ROWS = 16  # the GEMV kernel serves up to this many rows (decode, speculative verify); GEMMs go to torch
DTYPES = (torch.float32, torch.bfloat16)

_loaded: str | None = None  # the kernels' instruction set, once loaded


class KernelsUnavailable(RuntimeError):
    """The kernels could not be built or loaded here; the message says why in one line."""


def build_dir() -> Path:
    from runner.sources import runner_home

    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + torch.__version__.encode()
                         + (sysconfig.get_config_var("SOABI") or "").encode()).hexdigest()[:12]
    return runner_home() / "kernels" / key


def load(note=None) -> str:
    """Build (once) and load the kernels; returns the instruction set they use (e.g. avx512-bf16)."""
    global _loaded
    if _loaded is not None:
        return _loaded
    from torch.utils import cpp_extension

    where = build_dir()
    fresh = not any(where.glob("*.so"))
    if fresh and note is not None:
        note(f"kernels: building runner's CPU kernels into {where} (once)")
    where.mkdir(parents=True, exist_ok=True)
    # The ninja wheel's binary sits beside this interpreter's scripts, on PATH or not (a venv's
    # runner called without activating it).
    scripts = sysconfig.get_path("scripts")
    if scripts and scripts not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")
    try:
        cpp_extension.load("runner_kernels", [str(SOURCE)], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
                           build_directory=str(where), is_python_module=False, verbose=False)
    except Exception as e:  # a missing compiler or ninja, a failed build: all say the same to the user
        raise KernelsUnavailable(_summary(e)) from None
    _register_fakes()
    _loaded = torch.ops.runner.isa()
    return _loaded


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
    def _(x, w, scales):
        return x.new_empty(*x.shape[:-1], w.shape[0])

    @torch.library.register_fake("runner::int4_linear")
    def _(x, w, scales, zeros, groupsize):
        return x.new_empty(*x.shape[:-1], w.shape[0])

    @torch.library.register_fake("runner::rms_norm")
    def _(x, w, eps):
        return torch.empty_like(x)

    @torch.library.register_fake("runner::swiglu")
    def _(gate_up):
        return gate_up.new_empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2)

    @torch.library.register_fake("runner::attend")
    def _(qkv, cos_sin, k_cache, v_cache, input_pos, n_heads, n_kv_heads):
        return qkv.new_empty(1, qkv.shape[1], n_heads * k_cache.shape[-1])


def loaded() -> bool:
    return _loaded is not None


def _fits(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in DTYPES


class KernelOps:
    """functional's ops, with runner's kernels where they apply."""

    @staticmethod
    def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if _fits(x) and w.dtype == x.dtype and x.numel() <= MAX_ROWS * x.shape[-1]:
            return torch.ops.runner.linear(x, w)
        return F.linear(x, w)

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

    @staticmethod
    def attend(qkv, cos_sin, cache, input_pos, mask, n_heads: int, n_kv_heads: int) -> torch.Tensor:
        if _fits(qkv) and qkv.shape[0] == 1 and qkv.shape[1] <= MAX_ROWS and cache.k.dtype == qkv.dtype:
            return torch.ops.runner.attend(qkv, cos_sin, cache.k, cache.v, input_pos, n_heads, n_kv_heads)
        return functional.attend(qkv, cos_sin, cache, input_pos, mask, n_heads, n_kv_heads)
