"""transforms.quantize: each mode quantizes a tiny model as it says (none leaves it as it is)."""
import pytest
import torch

from runner import quant, transforms
from runner.config.errors import ConfigError
from runner.config.schema import ModelSpec, QuantCalibration, QuantMode, QuantSection
from runner.model.llama import Linear
from runner.quant.linear import Int4Linear, Int8Linear
from tests.quant.helpers import float_model, logits, prompts

SPEC = ModelSpec(dim=64, n_layers=1, n_heads=4, vocab_size=64, intermediate_size=64, max_seq_len=64)
EXPECTED = {QuantMode.none: Linear, QuantMode.int8: Int8Linear, QuantMode.int4: Int4Linear,
            QuantMode.int4_gptq: Int4Linear}


@pytest.mark.parametrize("mode", [m for m in QuantMode if m is not QuantMode.gguf], ids=lambda m: m.value)
def test_each_mode_quantizes_and_packs_for_the_models_device(mode):
    section = QuantSection(mode=mode, groupsize=32, calibration=QuantCalibration(path="x", samples=4, seq_len=16))
    model = float_model(SPEC, 0, torch.bfloat16)
    calibration = prompts(SPEC, 0, batch=4, length=16) if quant.needs_calibration(section) else None
    model = transforms.quantize(model, section, "r.yaml", calibration=calibration)
    wqkv = model.layers[0].attention.wqkv
    assert type(wqkv) is EXPECTED[mode]
    if mode is not QuantMode.none:
        assert wqkv.kernel == "cpu"  # bf16 on the CPU: torch's kernel, packed by the transform
    assert logits(model, prompts(SPEC, 1)).dtype == torch.bfloat16


def test_gguf_does_not_quantize_a_float_model_and_says_what_it_does():
    with pytest.raises(ConfigError, match="draft.quant.mode: gguf runs a GGUF file's quantized blocks as stored"):
        transforms.quantize(float_model(SPEC, 0), QuantSection(mode=QuantMode.gguf), "r.yaml", key="draft.quant")


def test_errors_name_the_sections_key():
    with pytest.raises(ConfigError) as caught:
        transforms.quantize(float_model(SPEC, 0), QuantSection(mode=QuantMode.int4, groupsize=128), "r.yaml",
                            key="draft.quant")
    assert caught.value.problems[0].key == "draft.quant.groupsize"


def test_metadata_round_trips_the_layout_keys_and_a_quantized_model_is_not_quantized_twice():
    section = QuantSection(mode=QuantMode.int4_gptq, groupsize=64, calibration=QuantCalibration(path="wiki.txt"))
    data = quant.metadata(section)
    assert data["mode"] == "int4-gptq" and data["layout"] == 1
    back = quant.from_metadata(data)
    assert (back.mode, back.groupsize, back.output, back.embedding) == (section.mode, 64, section.output, section.embedding)
    model = quant.quantize(float_model(SPEC, 0), QuantSection(mode=QuantMode.int8))
    assert quant.is_quantized(model) and not quant.is_quantized(float_model(SPEC, 0))
    with pytest.raises(ValueError, match="already quantized"):
        quant.quantize(model, QuantSection(mode=QuantMode.int8))
