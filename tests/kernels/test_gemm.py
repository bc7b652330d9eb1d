"""Prompt-shaped matmuls in bf16: computed in fp32 tiles where the CPU has no bf16 dot product
(runner.kernels.prompt_dtype), and either way within bf16's tolerance of a float64 reference."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from runner import kernels
from runner.kernels import MAX_ROWS, KernelOps, gemm


@pytest.fixture(scope="module", autouse=True)
def _loaded():
    try:
        kernels.load()
    except kernels.KernelsUnavailable as e:
        pytest.skip(f"runner's kernels cannot be built here: {e}")


def _target(native: bool) -> kernels.Target:
    needs = frozenset({"avx512_bf16", "avx512f"}) if native else frozenset({"avx2", "fma"})
    return kernels.Target("avx512-bf16" if native else "avx2", (), needs, True)


@pytest.mark.parametrize("native", [False, True])
def test_bf16_prompts_run_in_fp32_only_without_bf16_dot_products(monkeypatch, native):
    monkeypatch.setattr(kernels, "_loaded", _target(native))
    assert kernels.native_bf16() is native
    assert kernels.prompt_dtype(torch.bfloat16) == (torch.bfloat16 if native else torch.float32)
    assert kernels.prompt_dtype(torch.float32) == torch.float32


def test_this_cpus_choice_follows_its_features():
    has_dot = "avx512_bf16" in kernels.cpu_features() and kernels.choose_target().name == "avx512-bf16"
    assert kernels.prompt_dtype(torch.bfloat16) == (torch.bfloat16 if has_dot else torch.float32)


def _bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # fp32 sums of K products (each exact: bf16 x bf16 fits fp32), then one rounding to bf16.
    m = x.double().abs() @ w.double().abs().T
    return m * (x.shape[-1] * 2.0 ** -23 + torch.finfo(torch.bfloat16).eps) + torch.finfo(torch.bfloat16).tiny


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("rows,k,n", [(MAX_ROWS + 1, 64, 96), (77, 576, 300), (130, 128, 1000)])
def test_a_bf16_prompt_linear_is_within_bf16_tolerance(monkeypatch, native, rows, k, n):
    monkeypatch.setattr(kernels, "_loaded", dataclasses.replace(kernels._loaded, needs=_target(native).needs))
    g = torch.Generator().manual_seed(rows * k + n)
    x = torch.randn(1, rows, k, generator=g).bfloat16()
    w = (torch.randn(n, k, generator=g) / k ** 0.5).bfloat16()
    y = KernelOps.linear(x, w)
    assert y.dtype == torch.bfloat16 and y.shape == (1, rows, n)
    err = (y[0].double() - x[0].double() @ w.double().T).abs()
    assert (err <= _bound(x[0], w)).all(), f"max error {err.max():.3g}"


def test_fp32_tiles_give_the_whole_layers_product(monkeypatch):
    # Tiles of 256 rows (TILE_BYTES=1) must give the one-tile product column for column: each
    # output column's sum is the same GEMM's either way.
    monkeypatch.setattr(kernels, "_loaded", dataclasses.replace(kernels._loaded, needs=_target(False).needs))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 64, generator=g).bfloat16()
    w = torch.randn(600, 64, generator=g).bfloat16()
    whole = gemm.linear(x, w, torch.float32)
    assert torch.equal(whole, torch.nn.functional.linear(x.float(), w.float()).bfloat16())
    monkeypatch.setattr(gemm, "TILE_BYTES", 1)
    assert torch.equal(gemm.linear(x, w, torch.float32), whole)
    assert torch.equal(KernelOps.linear(x, w), whole)


def test_fp32_prompts_stay_torchs_own_gemm():
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(33, 48, generator=g), torch.randn(20, 48, generator=g)
    assert torch.equal(KernelOps.linear(x, w), torch.nn.functional.linear(x, w))
