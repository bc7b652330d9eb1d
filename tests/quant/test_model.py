"""Quantizing whole Transformers (runner/quant/model.py, plan.py, calibrate.py)."""
import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from runner import quant
from runner.config.errors import ConfigError
from runner.config.schema import (ModelSpec, QuantCalibration, QuantEmbedding, QuantMode, QuantOutput,
                                  QuantSection)
from runner.model.llama import Transformer
from runner.quant.linear import Int4Linear, Int8Embedding, Int8Linear
from tests.quant.helpers import float_model, logits, prompts
from tests.quant.strategies import tiny_specs

CPU = torch.device("cpu")


@st.composite
def sections(draw, modes=(QuantMode.int8, QuantMode.int4)):
    return QuantSection(mode=draw(st.sampled_from(modes)), groupsize=32,
                        output=draw(st.sampled_from(list(QuantOutput))),
                        embedding=draw(st.sampled_from(list(QuantEmbedding))))


@settings(max_examples=50, deadline=None)
@given(tiny_specs(), st.integers(0, 2**16), sections(modes=(QuantMode.int8,)))
def test_int8_keeps_the_float_models_top1_on_random_prompts(spec, seed, section):
    reference = float_model(spec, seed)
    quantized = quant.quantize(float_model(spec, seed), section)
    quant.pack_for(quantized, CPU)
    tokens = prompts(spec, seed)
    agree = (logits(quantized, tokens).argmax(-1) == logits(reference, tokens).argmax(-1)).float().mean()
    assert agree >= 0.9  # every linear int8 (and output, embedding as drawn); 40 random models: >= 0.96


@settings(max_examples=50, deadline=None)
@given(tiny_specs(), st.integers(0, 2**16), sections(), st.sampled_from([torch.float32, torch.bfloat16]))
def test_a_saved_quantized_state_dict_loads_into_the_skeleton_and_gives_the_same_logits(spec, seed, section, dtype):
    model = quant.quantize(float_model(spec, seed, dtype), section)
    quant.pack_for(model, CPU)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    with torch.device("meta"):
        skeleton = quant.quantized_skeleton(Transformer(spec), section)
    skeleton.load_state_dict(state, assign=True)
    assert quant.pack_for(skeleton, CPU) == quant.pack_for(model, CPU)
    tokens = prompts(spec, seed)
    assert torch.equal(logits(skeleton, tokens), logits(model, tokens))


def test_a_bf16_model_with_an_int8_embedding_looks_up_bf16_rows_within_half_a_step():
    """The int8 rows come back in bf16 (fp32 rows would meet bf16 layers) and stand for the float
    rows: within half the row's int8 step (max |row| / 127), plus bf16 rounding of scale and result."""
    spec = ModelSpec(dim=64, n_layers=1, n_heads=4, vocab_size=96, intermediate_size=64, max_seq_len=64)
    reference = float_model(spec, 0, torch.bfloat16)
    model = quant.quantize(float_model(spec, 0, torch.bfloat16),
                           QuantSection(mode=QuantMode.int8, embedding=QuantEmbedding.int8))
    embedding = model.tok_embeddings
    assert isinstance(embedding, Int8Embedding) and embedding.weight.dtype == torch.int8
    tokens = prompts(spec, 0)
    rows, want = embedding(tokens), reference.tok_embeddings(tokens).float()  # [B, T, dim]
    assert rows.dtype == torch.bfloat16
    step = reference.tok_embeddings.weight.float().abs().amax(-1)[tokens][..., None] / 127  # [B, T, 1]
    assert ((rows.float() - want).abs() <= 0.52 * step + 2**-8 * want.abs()).all()
    out = logits(model, tokens)
    assert out.dtype == torch.bfloat16
    assert (out.argmax(-1) == logits(reference, tokens).argmax(-1)).float().mean() >= 0.9  # measured: 0.96


def test_layers_are_replaced_as_the_section_says():
    spec = ModelSpec(dim=64, n_layers=2, n_heads=4, vocab_size=96, intermediate_size=64, max_seq_len=64)
    model = quant.quantize(float_model(spec, 0), QuantSection(mode=QuantMode.int4, groupsize=32,
                                                                output=QuantOutput.int8, embedding=QuantEmbedding.int8))
    assert all(isinstance(model.get_submodule(f"layers.{i}.{name}"), Int4Linear) for i in range(2)
               for name in ("attention.wqkv", "attention.wo", "feed_forward.w13", "feed_forward.w2"))
    assert isinstance(model.output, Int8Linear) and isinstance(model.tok_embeddings, Int8Embedding)
    assert model.layers[0].attention.wqkv.groupsize == 32


def test_a_tied_model_keeps_a_float_output_when_only_the_embedding_is_quantized():
    spec = ModelSpec(dim=64, n_layers=1, n_heads=4, vocab_size=96, intermediate_size=64, max_seq_len=64,
                     tie_embeddings=True)
    float_weight = float_model(spec, 3).tok_embeddings.weight.detach().clone()
    model = quant.quantize(float_model(spec, 3), QuantSection(mode=QuantMode.int8, embedding=QuantEmbedding.int8))
    assert isinstance(model.tok_embeddings, Int8Embedding)
    assert type(model.output) is torch.nn.Linear and torch.equal(model.output.weight, float_weight)


def test_model_bytes_counts_the_stored_layout():
    spec = ModelSpec(dim=64, n_layers=1, n_heads=4, vocab_size=96, intermediate_size=64, max_seq_len=64)
    model = float_model(spec, 0)
    linear = 64 * 192 + 64 * 64 + 64 * 128 + 64 * 64  # wqkv, wo, w13, w2 weights
    assert quant.model_bytes(model) == 4 * (linear + 2 * 96 * 64 + 3 * 64)
    quant.quantize(model, QuantSection(mode=QuantMode.int4, groupsize=32))
    quant.pack_for(model, CPU)  # kernel layouts are not counted: they are not what a checkpoint stores
    per_group = 2 * 4  # a scale and a zero, fp32
    assert quant.model_bytes(model) == linear // 2 + linear // 32 * per_group + 4 * (2 * 96 * 64 + 3 * 64)


def test_a_groupsize_that_does_not_divide_a_layer_names_the_key_the_layer_and_the_valid_sizes():
    spec = ModelSpec(dim=96, n_layers=1, n_heads=2, vocab_size=50, intermediate_size=128, max_seq_len=64)
    section = QuantSection(mode=QuantMode.int4, groupsize=64)
    with pytest.raises(ConfigError) as caught:
        quant.quantize(float_model(spec, 0), section, source="r.yaml")
    [problem] = caught.value.problems
    assert problem.source == "r.yaml" and problem.key == "quant.groupsize" and problem.value == 64
    assert "layers.0.attention.wqkv" in problem.message and "sizes that fit this model: 32" in problem.message
    with pytest.raises(ConfigError):
        quant.quantized_skeleton(float_model(spec, 0), section)


# --- GPTQ ---------------------------------------------------------------------------------

GPTQ_SPEC = ModelSpec(dim=64, n_layers=2, n_heads=4, vocab_size=128, intermediate_size=96, max_seq_len=64)


def gptq_section(**kw) -> QuantSection:
    return QuantSection(mode=QuantMode.int4_gptq, groupsize=32, output=QuantOutput.same,
                        calibration=QuantCalibration(path="calibration.txt", samples=8, seq_len=32), **kw)


@pytest.mark.parametrize("seed", [0, 1])
def test_gptq_model_fits_its_calibration_text_better_than_round_to_nearest(seed):
    tokens = prompts(GPTQ_SPEC, seed, batch=8, length=32)
    reference = logits(float_model(GPTQ_SPEC, seed), tokens)
    calls = []
    gptq_model = quant.quantize(float_model(GPTQ_SPEC, seed), gptq_section(), tokens, lambda d, t: calls.append((d, t)))
    rtn_model = quant.quantize(float_model(GPTQ_SPEC, seed), QuantSection(mode=QuantMode.int4, groupsize=32,
                                                                          output=QuantOutput.same))
    gptq_error = (logits(gptq_model, tokens) - reference).norm()
    rtn_error = (logits(rtn_model, tokens) - reference).norm()
    assert gptq_error < 0.9 * rtn_error  # 8 random seeds: rtn / gptq between 1.32 and 1.48
    assert calls == [(i, 9) for i in range(1, 10)]  # 2 blocks x 4 linears + output, in order


def test_gptq_handles_tied_embeddings_and_an_int8_embedding():
    spec = ModelSpec(**{**GPTQ_SPEC.__dict__, "tie_embeddings": True})
    tokens = prompts(spec, 5, batch=8, length=32)
    model = quant.quantize(float_model(spec, 5), gptq_section(embedding=QuantEmbedding.int8), tokens)
    assert isinstance(model.output, Int4Linear) and isinstance(model.tok_embeddings, Int8Embedding)
    assert model.cache_len == 0  # calibration left the model's own caches alone


def test_calibration_tokens_are_consecutive_windows_and_too_short_a_text_is_a_config_error():
    section = gptq_section()
    ids = list(range(300))
    windows = quant.calibration_tokens(ids, section, "r.yaml")
    assert windows.shape == (8, 32) and windows[1, 0] == 32
    with pytest.raises(ConfigError) as caught:
        quant.calibration_tokens(ids[:100], section, "r.yaml")
    assert caught.value.problems[0].key == "quant.calibration.samples"


def test_calibration_longer_than_the_model_is_a_config_error():
    tokens = torch.zeros(2, 65, dtype=torch.long)
    with pytest.raises(ConfigError) as caught:
        quant.quantize(float_model(GPTQ_SPEC, 0), gptq_section(), tokens)
    assert caught.value.problems[0].key == "quant.calibration.seq_len"
