"""runner.config.specs: which spec a model section takes (named, from the checkpoint's folder, or
declared by the checkpoint through the declared_spec hook), and load_spec on its own."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import yaml

from runner import recipes
from runner.config.errors import ConfigError
from runner.config.resolve import resolve
from runner.config.schema import RopeScaling
from runner.config.specs import known_specs, load_spec

REPO = Path(__file__).resolve().parents[2]
TINY = yaml.safe_load((REPO / "specs" / "tiny-llama.yaml").read_text())
# The spec is chosen before paths are made relative to the recipe: checkpoints here are absolute.
NO_SPEC = """\
model:
  checkpoint: {checkpoint}
tokenizer:
  kind: sentencepiece
  path: tok.model
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def no_spec(tmp_path) -> Path:
    """A recipe naming no spec, whose checkpoint exists in a folder that names none."""
    write(tmp_path / "weights" / "model.pth", "")
    return write(tmp_path / "r.yaml", NO_SPEC.format(checkpoint=tmp_path / "weights" / "model.pth"))


class Declares:
    """A declared_spec hook that records the checkpoints it is asked about."""

    def __init__(self, fields=None, error=None):
        self.fields, self.error, self.asked = fields, error, []

    def __call__(self, checkpoint: Path):
        self.asked.append(checkpoint)
        if self.error is not None:
            raise self.error
        return self.fields


def test_the_checkpoint_declares_the_spec_through_the_hook(tmp_path, no_spec):
    hook = Declares(dict(TINY, dim=32))
    arch = resolve(no_spec, declared_spec=hook).model.arch
    assert hook.asked == [tmp_path / "weights" / "model.pth"]
    assert (arch.dim, arch.n_layers, arch.vocab_size) == (32, TINY["n_layers"], TINY["vocab_size"])


def test_the_recipe_and_the_command_line_win_over_what_the_checkpoint_declares(tmp_path, no_spec):
    recipe = write(tmp_path / "child.yaml", "base: r.yaml\nmodel:\n  arch: {n_layers: 1}\n")
    arch = resolve(recipe, ["model.arch.vocab_size=1000"], declared_spec=Declares(TINY)).model.arch
    assert (arch.n_layers, arch.vocab_size, arch.dim) == (1, 1000, TINY["dim"])


def test_declared_fields_may_be_dataclasses(no_spec):
    scaling = RopeScaling(factor=4.0)
    assert resolve(no_spec, declared_spec=Declares(dict(TINY, rope_scaling=scaling))).model.arch.rope_scaling == scaling


@pytest.mark.parametrize("hook", [None, Declares(None), Declares(error=ConfigError([]))],
                         ids=["no hook", "declares none", "not a format that declares"])
def test_without_a_declared_spec_the_recipe_must_name_one(no_spec, hook):
    with pytest.raises(ConfigError) as info:
        resolve(no_spec, declared_spec=hook)
    [p] = info.value.problems
    assert p.key == "model.spec" and "the checkpoint declares no spec" in p.message
    assert all(name in p.message for name in known_specs())


def test_the_hook_is_not_asked_when_the_spec_is_named_or_the_folder_names_one(tmp_path):
    hook = Declares(dict(TINY, dim=32))
    write(tmp_path / "weights" / "model.pth", "")
    no_spec = NO_SPEC.format(checkpoint=tmp_path / "weights" / "model.pth")
    named = write(tmp_path / "named.yaml", no_spec.replace("model:\n", "model:\n  spec: tiny-llama\n"))
    write(tmp_path / "stories15M" / "model.pth", "")
    by_folder = write(tmp_path / "folder.yaml", no_spec.replace("weights/", "stories15M/"))
    assert resolve(named, declared_spec=hook).model.arch.dim == TINY["dim"]
    assert resolve(by_folder, declared_spec=hook).model.arch.dim != 32
    assert hook.asked == []


def test_the_hook_is_not_asked_about_a_missing_checkpoint(tmp_path):
    hook = Declares(TINY)
    with pytest.raises(ConfigError, match="model.spec"):
        resolve(write(tmp_path / "r.yaml", NO_SPEC.format(checkpoint=tmp_path / "model.pth")), declared_spec=hook)
    assert hook.asked == []


def test_the_draft_model_asks_the_hook_for_its_own_checkpoint(tmp_path, no_spec):
    write(tmp_path / "draft" / "model.pth", "")
    recipe = write(tmp_path / "d.yaml", f"base: r.yaml\ndraft:\n  kind: model\n  model:\n    checkpoint: {tmp_path / 'draft' / 'model.pth'}\n")
    hook = Declares(TINY)
    assert resolve(recipe, declared_spec=hook).draft.model.arch == resolve(no_spec, declared_spec=hook).model.arch
    assert set(hook.asked) == {tmp_path / "weights" / "model.pth", tmp_path / "draft" / "model.pth"}


def test_recipes_load_reads_the_spec_the_checkpoint_declares(tmp_path):
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 192, "vocab_size": 512}
    write(tmp_path / "hf" / "config.json", json.dumps(config))
    recipe = write(tmp_path / "r.yaml", NO_SPEC.format(checkpoint=tmp_path / "hf"))
    arch = recipes.load(recipe).model.arch
    assert (arch.dim, arch.n_layers, arch.n_kv_heads, arch.vocab_size) == (64, 2, 2, 512)
    with pytest.raises(ConfigError, match="model.spec"):
        resolve(recipe)  # the config package knows no checkpoint format


# --- load_spec -------------------------------------------------------------------------------


def test_load_spec_by_name_and_by_path():
    assert load_spec("tiny-llama") == load_spec("TINY-LLAMA") == load_spec(str(REPO / "specs" / "tiny-llama.yaml"))
    assert load_spec("tiny-llama").dim == TINY["dim"]


@pytest.mark.parametrize("edit, key, part", [
    ("dimm: 3\n", "model.arch.dimm", "did you mean model.arch.dim?"),
    ("rope_scaling: 5\n", "model.arch.rope_scaling", "must be a section of keys"),
    ("max_seq_len: many\n", "model.arch.max_seq_len", "many"),
    ("n_kv_heads: 3\n", "model.arch.n_kv_heads", "must divide n_heads (4)"),
])
def test_a_bad_spec_names_its_file_and_key(tmp_path, edit, key, part):
    lines = [l for l in (REPO / "specs" / "tiny-llama.yaml").read_text().splitlines(keepends=True)
             if not l.startswith(edit.split(":")[0] + ":")]
    path = write(tmp_path / "bad.yaml", "".join(lines) + edit)
    with pytest.raises(ConfigError) as info:
        load_spec(str(path))
    [p] = info.value.problems
    assert (p.source, p.key) == (str(path), key)
    assert part in str(p)


def test_a_spec_missing_a_required_field_names_it(tmp_path):
    path = write(tmp_path / "bad.yaml", "dim: 64\nn_layers: 2\nn_heads: 4\nvocab_size: 512\n")
    with pytest.raises(ConfigError) as info:
        load_spec(str(path))
    assert [(p.source, p.key, p.message) for p in info.value.problems] == [
        (str(path), "model.arch.intermediate_size", "is required but has no value")]


def test_an_unknown_spec_lists_the_known_ones(tmp_path):
    for name in ("llama-9", str(tmp_path / "missing.yaml")):
        with pytest.raises(ConfigError) as info:
            load_spec(name)
        [p] = info.value.problems
        assert (p.source, p.key, p.value) == (name, "spec", name)
        assert all(known in p.message for known in known_specs())
