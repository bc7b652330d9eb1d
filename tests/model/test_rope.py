"""runner.model.rope against transformers' own rotary embeddings, forward by forward over a generation
that crosses the length where dynamic and longrope change their frequencies."""
import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, Phi3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

from runner.config.schema import RopeScaling
from runner.model.rope import Rope, frequencies

PROPERTY = settings(max_examples=50, deadline=None)
TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")
thetas = st.floats(2.0, 6.0).map(lambda e: 10**e)
factors = st.floats(1.0, 16.0)


@pytest.fixture(autouse=True, scope="module")
def quiet_transformers():
    """HF warns about keys a config does not expect (e.g. a longrope factor that differs from the ratio)."""
    before = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(before)


@st.composite
def cases(draw, kind=None, dim=None):
    """(rotary dim, theta, scaling or None, max_position_embeddings, HF's rope_parameters, the length
    past which the frequencies change), for `kind` or a type drawn from TYPES, `dim` or one drawn."""
    kind = kind or draw(st.sampled_from(TYPES))
    dim, theta = dim or 2 * draw(st.integers(4, 64)), draw(thetas)
    original = draw(st.integers(16, 64))
    max_pos = original * draw(st.integers(1, 8)) if kind != "dynamic" else original
    fields, hf = {}, {}
    if kind in ("linear", "dynamic", "llama3", "yarn"):
        fields["factor"] = draw(factors)
    if kind in ("llama3", "yarn", "longrope"):
        fields["original_max_position_embeddings"] = original
    if kind == "llama3":
        fields["low_freq_factor"] = draw(st.floats(0.25, 4.0))
        fields["high_freq_factor"] = fields["low_freq_factor"] + draw(st.floats(0.1, 8.0))
    if kind == "yarn":
        fields.update(beta_fast=draw(st.floats(8.0, 64.0)), beta_slow=draw(st.floats(0.5, 4.0)),
                      truncate=draw(st.booleans()))
        if draw(st.booleans()):
            fields.update(mscale=draw(st.floats(0.5, 2.0)), mscale_all_dim=draw(st.floats(0.5, 2.0)))
    if kind in ("yarn", "longrope") and draw(st.booleans()):
        fields["attention_factor"] = draw(st.floats(0.5, 2.0))
    if kind == "longrope":
        divisors = st.lists(st.floats(1.0, 8.0), min_size=dim // 2, max_size=dim // 2)
        fields.update(short_factor=draw(divisors), long_factor=draw(divisors))
        # Phi-3's configs leave factor out and HF takes max_position_embeddings / original instead;
        # a loader fills it in so.
        given_factor = draw(st.none() | factors)
        if given_factor is not None:
            hf["factor"] = given_factor
        fields["factor"] = max_pos / original if given_factor is None else given_factor
    hf.update(fields)
    scaling = None if kind == "default" else RopeScaling(type=kind, **fields)
    changes_at = max_pos if kind == "dynamic" else original
    return dim, theta, scaling, max_pos, dict(rope_type=kind, rope_theta=theta, **hf), changes_at


def hf_rotary(head_dim: int, max_pos: int, rope_parameters: dict, partial: float = 1.0) -> torch.nn.Module:
    """transformers' own rotary embedding: Phi-3's for default and longrope (it carries
    original_max_position_embeddings outside rope_parameters, and honours a partial factor for
    default), Llama's for the other types."""
    rope_parameters = dict(rope_parameters, partial_rotary_factor=partial)
    if rope_parameters["rope_type"] in ("default", "longrope"):
        original = rope_parameters.get("original_max_position_embeddings", max_pos)
        config = Phi3Config(hidden_size=head_dim, num_attention_heads=1, max_position_embeddings=max_pos,
                            original_max_position_embeddings=original, rope_parameters=rope_parameters)
        return Phi3RotaryEmbedding(config)
    config = LlamaConfig(hidden_size=head_dim, num_attention_heads=1, head_dim=head_dim,
                         max_position_embeddings=max_pos, rope_parameters=rope_parameters)
    return LlamaRotaryEmbedding(config)


def generation(prompt: int, end: int) -> list[torch.Tensor]:
    """Each forward's positions: a prefill of `prompt` tokens, then one token a step up to `end`."""
    return [torch.arange(prompt)] + [torch.tensor([p]) for p in range(prompt, end)]


def assert_matches(cos_sin: torch.Tensor, hf_cos: torch.Tensor, hf_sin: torch.Tensor) -> None:
    assert cos_sin.dtype == torch.float32
    torch.testing.assert_close(cos_sin[..., 0, :], hf_cos, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(cos_sin[..., 1, :], hf_sin, rtol=1e-6, atol=1e-7)


@PROPERTY
@given(case=cases(), data=st.data())
def test_frequencies_match_transformers(case, data):
    dim, theta, scaling, max_pos, params, changes_at = case
    config = hf_rotary(dim, max_pos, params).config
    init = ROPE_INIT_FUNCTIONS.get(params["rope_type"], Phi3RotaryEmbedding.compute_default_rope_parameters)
    seq_len = data.draw(st.none() | st.integers(1, 3 * changes_at))
    expected, expected_factor = init(config, None, seq_len=seq_len)
    inv_freq, attention_factor = frequencies(dim, theta, scaling, max_pos, seq_len)
    assert inv_freq.shape == (dim // 2,) and inv_freq.dtype == torch.float32
    torch.testing.assert_close(inv_freq, expected, rtol=1e-6, atol=0)
    assert attention_factor == pytest.approx(expected_factor, rel=1e-12)
    if params["rope_type"] == "dynamic" and seq_len is not None:  # as HF's per-forward update passes it
        as_tensor = torch.tensor(seq_len)
        expected, _ = init(config, None, seq_len=as_tensor)
        torch.testing.assert_close(frequencies(dim, theta, scaling, max_pos, as_tensor)[0], expected, rtol=1e-6, atol=0)


@PROPERTY
@given(case=cases(), data=st.data())
def test_each_forward_of_a_generation_matches_transformers(case, data):
    """A prefill then decode steps past where dynamic and longrope switch; for dynamic, a second
    generation on the same HF module whose prompt is shorter than max_position_embeddings (HF's
    reset back to the original frequencies)."""
    dim, theta, scaling, max_pos, params, changes_at = case
    end = changes_at + data.draw(st.integers(2, 24))
    prompts = [data.draw(st.integers(1, end - 1))]
    offsets = data.draw(st.none() | st.lists(st.integers(0, 8), min_size=1, max_size=3))  # None: input_pos [T]
    if params["rope_type"] == "dynamic":  # reaching no further than max_pos - 1: HF resets
        prompts.append(data.draw(st.integers(1, max_pos - 1 - max(offsets or [0]))))
    rope = Rope(dim, theta, scaling, max_pos)
    rope.setup(end + 8, torch.device("cpu"))
    # Each row as HF's rotary embedding sees that sequence alone (HF takes seq_len over a batch;
    # runner keeps a row independent of its batch-mates).
    hfs = [hf_rotary(dim, max_pos, params) for _ in offsets or [0]]
    x = torch.zeros(1)  # HF reads only its device and dtype
    for prompt in prompts:
        for pos in generation(prompt, end):
            input_pos = pos[None] if offsets is None else pos + torch.tensor(offsets)[:, None]  # [B, T]
            cos_sin = rope(input_pos[0] if offsets is None else input_pos)  # [T] or [B, T]
            assert cos_sin.shape == (*input_pos.shape[offsets is None:], 2, dim)
            rows = cos_sin[None] if offsets is None else cos_sin
            for hf, row_pos, row in zip(hfs, input_pos, rows):
                hf_cos, hf_sin = hf(x, row_pos[None])
                assert_matches(row, hf_cos.view(row[..., 0, :].shape), hf_sin.view(row[..., 1, :].shape))


@PROPERTY
@given(kind=st.sampled_from(TYPES), data=st.data(), head_dim=st.sampled_from([16, 32, 64, 96, 128]),
       partial=st.sampled_from([0.25, 0.5, 0.75]))
def test_partial_rotary_is_a_smaller_dim(kind, data, head_dim, partial):
    """HF turns int(head_dim * partial_rotary_factor) dimensions; Rope built with that dim agrees."""
    dim = int(head_dim * partial)
    _, theta, scaling, max_pos, params, changes_at = data.draw(cases(kind, dim))
    hf, rope = hf_rotary(head_dim, max_pos, params, partial), Rope(dim, theta, scaling, max_pos)
    rope.setup(changes_at + 4, torch.device("cpu"))
    for pos in generation(changes_at - 2, changes_at + 4):
        hf_cos, hf_sin = hf(torch.zeros(1), pos[None])
        assert_matches(rope(pos), hf_cos[0], hf_sin[0])


@pytest.mark.parametrize("kind", ["dynamic", "longrope"])
def test_compiles_into_one_graph_without_recompiling_across_the_switch(kind):
    """No host sync and no branch on a position: a decode step traces once (fullgraph) and gives
    eager's values on both sides of the length where the frequencies change."""
    torch._dynamo.reset()
    dim, theta, scaling, max_pos, _, changes_at = _fixed_case(kind)
    rope = Rope(dim, theta, scaling, max_pos)
    rope.setup(changes_at + 4, torch.device("cpu"))
    compiled = torch.compile(rope, fullgraph=True, dynamic=False)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for p in range(changes_at - 2, changes_at + 3):
            pos = torch.tensor([[p], [p - 1]])
            torch.testing.assert_close(compiled(pos), rope(pos), rtol=1e-5, atol=1e-5)


def _fixed_case(kind: str):
    dim, theta, max_pos = 16, 10000.0, 32
    if kind == "dynamic":
        return dim, theta, RopeScaling(type="dynamic", factor=4.0), max_pos, None, max_pos
    scaling = RopeScaling(type="longrope", factor=4.0, original_max_position_embeddings=8,
                          short_factor=[1.0 + i / 8 for i in range(8)], long_factor=[2.0 + i for i in range(8)])
    return dim, theta, scaling, max_pos, None, 8


def test_tables_stay_out_of_the_state_dict_and_follow_to():
    scaling = RopeScaling(type="longrope", factor=4.0, original_max_position_embeddings=8,
                          short_factor=[1.0] * 4, long_factor=[2.0] * 4)
    rope = Rope(8, 10000.0, scaling, 32)
    rope.setup(16, torch.device("cpu"))
    assert rope.state_dict() == {}
    assert rope.to(torch.device("meta"))(torch.arange(3)).device.type == "meta"


def test_refusals():
    with pytest.raises(ValueError, match=r"longrope's short_factor needs one entry per frequency \(4\), got 3"):
        Rope(8, 10000.0, RopeScaling(type="longrope", short_factor=[1.0] * 3, long_factor=[1.0] * 4), 32)
    with pytest.raises(ValueError, match="rotary dim must be even"):
        Rope(7, 10000.0, None, 32)
    with pytest.raises(RuntimeError, match=r"Rope.setup\(max_len, device\) must run before the first forward"):
        Rope(8, 10000.0, None, 32)(torch.arange(2))
