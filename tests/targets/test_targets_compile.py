"""Every kernel target compiles, including those this CPU cannot run.

A machine builds and tests only the targets its CPU has (CI reruns tests/kernels for avx2 and
generic); code written for AVX2 also compiles into the AVX-512 builds, where runner's portable
vectors are twice as wide, so a 256-bit cast that is fine on AVX2 can break only there. This
compiles the library's one translation unit for each target the CPU lacks, with the flags
runner.kernels builds it with, checking syntax and types only (no object code, nothing run).
"""
from __future__ import annotations

import shutil
import subprocess
import sysconfig

import pytest
from torch.utils.cpp_extension import include_paths

from runner import kernels

FOREIGN = [t for t in kernels.TARGETS if not t.needs <= kernels.cpu_features()]


@pytest.mark.skipif(shutil.which("g++") is None, reason="runner's kernels build with g++")
@pytest.mark.parametrize("target", FOREIGN or [None], ids=lambda t: t.name if t else "none-foreign")
def test_a_target_this_cpu_lacks_still_compiles(target):
    if target is None:
        return  # this CPU has every target's features: each is built and tested for real
    flags = [f for f in target.flags if f != "-mtune=native"]  # tuning for this CPU changes no types
    command = ["g++", "-std=c++20", "-fsyntax-only", *kernels.FLAGS, *flags,
               *(f"-I{p}" for p in include_paths()), f"-I{sysconfig.get_paths()['include']}",
               "-DTORCH_EXTENSION_NAME=runner_kernels", str(kernels.UNITY)]
    result = subprocess.run(command, capture_output=True, text=True)
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert result.returncode == 0, f"{target.name}: " + "\n".join(errors[:10])
