"""runner.config.layers and runner.config.validate on their own: YAML files, overrides and origins,
and the checks that take any schema class (a spec's, not only a recipe's)."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from runner.config.errors import ConfigError
from runner.config.layers import COMMAND_LINE, Origins, load_yaml, nest, override_layer, recipe_layers
from runner.config.schema import ModelSpec, Recipe
from runner.config.validate import container_problems, is_text, merge_typed, shape_problems, valid_keys


def test_a_key_twice_in_one_mapping_is_an_error_at_its_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("generate:\n  seed: 1\n  seed: 2\n")
    with pytest.raises(ConfigError) as info:
        load_yaml(path)
    [p] = info.value.problems
    assert p.source == f"{path}:3:3" and "'seed' appears twice" in p.message


def test_the_schema_checks_sections_only_when_given(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("generate: [1, 2]\n")
    assert OmegaConf.to_container(load_yaml(path)) == {"generate": [1, 2]}
    with pytest.raises(ConfigError, match="generate: must be a section of keys"):
        load_yaml(path, Recipe)


def test_the_base_chain_comes_outermost_first(tmp_path):
    (tmp_path / "a.yaml").write_text("device: cpu\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ndtype: bfloat16\n")
    (tmp_path / "c.yaml").write_text("base: b.yaml\n")
    layers = recipe_layers(tmp_path / "c.yaml", Recipe)
    assert [name for name, _ in layers] == [str(tmp_path / n) for n in ("a.yaml", "b.yaml", "c.yaml")]
    assert all("base" not in cfg for _, cfg in layers)


def test_overrides_of_text_keys_are_the_text_as_typed():
    name, cfg = override_layer(["generate.prompt=null", "generate.max_new_tokens=7"], "r.yaml", Recipe)
    assert name == "r.yaml" + COMMAND_LINE
    assert OmegaConf.to_container(cfg) == {"generate": {"prompt": "null", "max_new_tokens": 7}}


def test_origins_name_the_last_layer_that_set_a_key_or_its_section():
    layers = [("base.yaml", nest("generate.seed", 1)), ("r.yaml", nest("generate.top_k", 5)),
              ("r.yaml" + COMMAND_LINE, OmegaConf.create({}))]
    origin = Origins(layers)
    assert (origin("generate.seed"), origin("generate.top_k"), origin("generate.nope")) == ("base.yaml", "r.yaml", "r.yaml")
    assert origin("device") == "r.yaml"  # set nowhere: the recipe file itself
    assert (origin.layer_of("generate.seed"), origin.layer_of("generate.top_k"), origin.layer_of("device")) == (0, 1, -1)


# --- validate: the schema is an argument -------------------------------------------------------


def test_the_checks_take_any_schema_class():
    assert "rope_scaling.factor" in valid_keys(ModelSpec) and "model.arch.dim" in valid_keys(Recipe)
    assert is_text(Recipe, "model.checkpoint") and not is_text(Recipe, "model.arch.dim") and not is_text(ModelSpec, "dim")
    [p] = container_problems(ModelSpec, {"rope_scaling": [1]}, "s.yaml")
    assert (p.source, p.key, p.message) == ("s.yaml", "rope_scaling", "must be a section of keys")


def test_shape_problems_suggest_from_the_schema_given_and_report_under_the_prefix():
    [p] = shape_problems(ModelSpec, {"dimm": 3}, lambda key: "s.yaml")
    assert (p.key, p.message) == ("dimm", "unknown key; did you mean dim?")
    [p] = shape_problems(ModelSpec, {"dimm": 3}, lambda key: "s.yaml", "model.arch.")
    assert (p.key, p.message) == ("model.arch.dimm", "unknown key; did you mean model.arch.dim?")


def test_merge_typed_reports_and_drops_each_wrong_value():
    seen = []
    cfg, problems = merge_typed(ModelSpec, {"dim": "wide", "n_layers": 2, "norm_eps": "tiny"},
                                lambda key: seen.append(key) or "s.yaml", "model.arch.")
    assert sorted(p.key for p in problems) == ["model.arch.dim", "model.arch.norm_eps"]
    assert sorted(seen) == ["model.arch.dim", "model.arch.norm_eps"]
    assert cfg.n_layers == 2 and OmegaConf.is_missing(cfg, "dim")


def test_a_path_given_as_a_recipe_names_the_closest_recipe(tmp_path):
    (tmp_path / "tiny-random.yaml").write_text("")
    with pytest.raises(ConfigError, match=f"did you mean {tmp_path / 'tiny-random.yaml'}"):
        load_yaml(tmp_path / "tiny-randm.yaml")


def test_a_base_that_interpolates_a_missing_key_is_a_recipe_error(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("base: ${missing}\n")
    with pytest.raises(ConfigError) as info:
        recipe_layers(path, Recipe)
    [p] = info.value.problems
    assert p.key == "base" and "must be the path of another recipe" in p.message and "missing" in p.message
