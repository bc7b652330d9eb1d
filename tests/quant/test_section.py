"""The quant section of a recipe: its keys, enums and rules (QuantSection.problems)."""
import pytest

from runner.config.errors import ConfigError
from runner.config.resolve import resolve_data
from runner.config.schema import QuantCalibration, QuantEmbedding, QuantMode, QuantOutput, QuantSection

BASE = {"model": {"arch": {"dim": 64, "n_layers": 1, "n_heads": 4, "vocab_size": 32, "intermediate_size": 64},
                  "checkpoint": "-"},
        "tokenizer": {"kind": "tiktoken", "path": "-"}}


def keys(section: QuantSection) -> list[str]:
    return [key for key, _, _ in section.problems()]


def test_every_mode_by_its_value_in_a_recipe():
    for mode in QuantMode:
        quant = {"mode": mode.value, "calibration": {"path": "wiki.txt"}}
        assert resolve_data({**BASE, "quant": quant}, "r.yaml").quant.mode is mode


def test_defaults_are_valid_and_unquantized():
    assert QuantSection().mode is QuantMode.none and QuantSection().problems() == []


@pytest.mark.parametrize("groupsize", [32, 64, 128, 256])
def test_int4_groupsizes_the_kernels_take(groupsize):
    assert QuantSection(mode=QuantMode.int4, groupsize=groupsize).problems() == []


def test_other_groupsizes_are_refused_for_int4_modes_only():
    assert keys(QuantSection(mode=QuantMode.int4, groupsize=48)) == ["groupsize"]
    assert "groupsize" in keys(QuantSection(mode=QuantMode.int4_gptq, groupsize=512,
                                            calibration=QuantCalibration(path="x")))
    assert QuantSection(mode=QuantMode.int8, groupsize=48).problems() == []


def test_gptq_needs_a_calibration_text_and_sane_settings():
    assert keys(QuantSection(mode=QuantMode.int4_gptq)) == ["calibration.path"]
    bad = QuantSection(mode=QuantMode.int4_gptq, damping=0.0, block_size=0,
                       calibration=QuantCalibration(path="x", samples=0, seq_len=0))
    assert keys(bad) == ["calibration.samples", "calibration.seq_len", "damping", "block_size"]


def test_per_layer_choices_need_a_mode():
    section = QuantSection(output=QuantOutput.int8, embedding=QuantEmbedding.int8)
    assert keys(section) == ["output", "embedding"]
    assert QuantSection(mode=QuantMode.int8, output=QuantOutput.same, embedding=QuantEmbedding.int8).problems() == []


def test_a_recipe_gathers_every_quant_problem_under_its_dotted_key():
    with pytest.raises(ConfigError) as caught:
        resolve_data({**BASE, "quant": {"mode": "int4-gptq", "groupsize": 100}}, "r.yaml")
    assert sorted(p.key for p in caught.value.problems) == ["quant.calibration.path", "quant.groupsize"]


def test_an_unknown_mode_is_refused_when_the_recipe_resolves():
    with pytest.raises(ConfigError) as caught:
        resolve_data({**BASE, "quant": {"mode": "int3"}}, "r.yaml")
    assert caught.value.problems[0].key == "quant.mode"
