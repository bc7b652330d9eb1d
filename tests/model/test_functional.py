"""The model's pure functions against direct formulas and against transformers' own RoPE scaling."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from runner.config.schema import RopeScaling
from runner.model import functional as fn, rope

PROPERTY = settings(max_examples=50, deadline=None)
seeds = st.integers(0, 2**32 - 1)
head_dims = st.integers(1, 64).map(lambda half: 2 * half)
thetas = st.floats(2.0, 6.0).map(lambda e: 10**e)


def randn(*shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@PROPERTY
@given(dim=st.integers(1, 64), eps=st.sampled_from([1e-6, 1e-5, 1e-2]), seed=seeds)
def test_rms_norm_is_the_formula(dim, eps, seed):
    x, weight = randn(3, 5, dim, seed=seed), randn(dim, seed=seed + 1)
    x64 = x.double()
    expected = x64 / (x64.pow(2).mean(-1, keepdim=True) + eps).sqrt() * weight.double()
    torch.testing.assert_close(fn.rms_norm(x, weight, eps).double(), expected, rtol=1e-5, atol=1e-6)


def test_rms_norm_keeps_bf16():
    x, weight = randn(2, 7, 48, seed=0, dtype=torch.bfloat16), randn(48, seed=1, dtype=torch.bfloat16)
    out = fn.rms_norm(x, weight, 1e-5)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), fn.rms_norm(x.float(), weight.float(), 1e-5), rtol=2e-2, atol=2e-2)


@PROPERTY
@given(head_dim=head_dims, theta=thetas)
def test_rope_frequencies_unscaled(head_dim, theta):
    expected = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    torch.testing.assert_close(rope.frequencies(head_dim, theta)[0].double(), expected, rtol=1e-6, atol=0)


@PROPERTY
@given(
    head_dim=head_dims, theta=thetas, factor=st.floats(1.0, 64.0), low=st.floats(0.25, 4.0),
    gap=st.floats(0.1, 8.0), original=st.integers(1, 16384),
)
def test_rope_frequencies_scaled_match_transformers(head_dim, theta, factor, low, gap, original):
    scaling = RopeScaling(factor=factor, low_freq_factor=low, high_freq_factor=low + gap,
                          original_max_position_embeddings=original)
    config = LlamaConfig(hidden_size=head_dim, num_attention_heads=1, head_dim=head_dim, rope_parameters=dict(
        rope_type="llama3", rope_theta=theta, factor=factor, low_freq_factor=low, high_freq_factor=low + gap,
        original_max_position_embeddings=original))
    expected, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](config, None)
    assert attention_factor == 1.0
    torch.testing.assert_close(rope.frequencies(head_dim, theta, scaling)[0], expected, rtol=1e-5, atol=0)


@PROPERTY
@given(head_dim=head_dims, theta=thetas, positions=st.lists(st.integers(0, 99), min_size=1, max_size=8), seed=seeds)
def test_apply_rope_rotates_each_pair_by_its_position_angle(head_dim, theta, positions, seed):
    half, pos = head_dim // 2, torch.tensor(positions)
    inv_freq = rope.frequencies(head_dim, theta)[0]
    x = randn(2, 3, len(positions), head_dim, seed=seed)  # [B, H, T, D]
    out = fn.apply_rope(x, rope.table(inv_freq, 100)[pos])

    # "Rotate half" pairs dimension i with i + D/2: as a complex number, it turns by pos * inv_freq[i].
    pairs, turned = torch.complex(x[..., :half], x[..., half:]), torch.complex(out[..., :half], out[..., half:])
    angle = torch.outer(pos.double(), inv_freq.double())  # [T, D/2]
    expected = pairs.to(torch.complex128) * torch.polar(torch.ones_like(angle), angle)
    torch.testing.assert_close(turned.to(torch.complex128), expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(turned.abs(), pairs.abs(), rtol=1e-5, atol=1e-6)


@PROPERTY
@given(start=st.integers(0, 20), length=st.integers(1, 20), spare=st.integers(0, 5))
def test_causal_mask_sees_the_cache_up_to_each_position(start, length, spare):
    input_pos = torch.arange(start, start + length)
    cache_len = start + length + spare
    mask = fn.causal_mask(input_pos, cache_len)
    assert mask.shape == (length, cache_len) and mask.dtype == torch.bool
    for t, p in enumerate(input_pos.tolist()):
        assert mask[t].tolist() == [slot <= p for slot in range(cache_len)]


def test_rope_cache_layout():
    inv_freq = torch.tensor([1.0, 0.1])
    cache = rope.table(inv_freq, 3)  # [3, 2, 4]
    assert cache.shape == (3, 2, 4)
    angles = torch.tensor([[0.0, 0.0], [1.0, 0.1], [2.0, 0.2]]).repeat(1, 2)
    torch.testing.assert_close(cache[:, 0], angles.cos())
    torch.testing.assert_close(cache[:, 1], angles.sin())
