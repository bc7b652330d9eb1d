"""The `runner` command line: run, show, init, list.

Output is checked in-process with click's CliRunner; exit codes and the absence of a
traceback are checked on the real entry point (`python -m runner`) in a subprocess.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from runner.cli import cli
from runner.config.specs import known_specs, load_spec
from runner.config.schema import DType, TokenizerKind

REPO = Path(__file__).resolve().parents[2]
TINY = "recipes/tiny-random.yaml"
COMMANDS = ("run", "show", "init", "list")


@pytest.fixture(scope="module")
def runner_home(tmp_path_factory) -> Path:
    """One RUNNER_HOME per module, so tiny-random's checkpoint is written once."""
    return tmp_path_factory.mktemp("runner-home")


@pytest.fixture
def invoke(runner_home, monkeypatch):
    """Run the CLI in-process from the repository root, with RUNNER_HOME in a tmp dir."""
    monkeypatch.chdir(REPO)

    def call(*args: str):
        return CliRunner().invoke(cli, list(args), env={"RUNNER_HOME": str(runner_home)}, catch_exceptions=True)

    return call


def runner_process(*args: str, home: Path | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "RUNNER_HOME": str(home)} if home else dict(os.environ)
    return subprocess.run([sys.executable, "-m", "runner", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


# --- show ----------------------------------------------------------------------------------


def test_show_prints_the_resolved_recipe_with_overrides(invoke, runner_home):
    result = invoke("show", TINY, "generate.max_new_tokens=7", "generate.top_k=null")
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.output)
    assert "  max_new_tokens: 7" in result.output.splitlines()
    assert shown["generate"]["max_new_tokens"] == 7
    assert shown["generate"]["top_k"] is None
    assert shown["model"]["arch"] == yaml.safe_load((REPO / "specs" / "tiny-llama.yaml").read_text()) | {
        "head_dim": None, "rope_scaling": None, "n_experts": None, "n_experts_per_token": 2, "sliding_window": None,
        "global_every": None, "family": "llama", "qkv_bias": False, "qk_norm": False, "norm_offset": 0.0,
        "scale_embeddings": False, "activation": "silu", "sandwich_norms": False, "query_pre_attn_scalar": None,
        "attn_logit_softcap": None, "final_logit_softcap": None, "rope_local_theta": None, "partial_rotary_factor": 1.0}
    assert shown["model"]["checkpoint"] == str(runner_home / "tiny-random" / "model.pth")
    assert shown["tokenizer"]["path"] == str(REPO / "recipes" / "assets" / "tiny-sp.model")


def test_show_refuses_a_bad_recipe(invoke):
    result = invoke("show", TINY, "generate.temprature=1")
    assert result.exit_code != 0
    assert "generate.temperature" in str(result.exception)


# --- errors on the real entry point: exit code 2, a message, no traceback -------------------


def test_a_typo_exits_2_with_a_suggestion_and_no_traceback(runner_home):
    proc = runner_process(TINY, "generate.temprature=1", home=runner_home)
    assert proc.returncode == 2
    assert "generate.temprature" in proc.stderr
    assert "generate.temperature" in proc.stderr
    assert TINY in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_every_problem_is_one_error_line(runner_home):
    proc = runner_process("show", TINY, "generate.temprature=1", "generate.top_kk=2", "devic=cpu", home=runner_home)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 3
    for key in ("generate.temprature", "generate.top_kk", "devic"):
        assert sum(key + ":" in line for line in errors) == 1


@pytest.mark.parametrize("args", [["--debug", "show", TINY, "generate.temprature=1"],
                                  ["--debug", TINY, "generate.temprature=1"]], ids=["show", "run"])
def test_debug_shows_the_traceback(runner_home, args):
    proc = runner_process(*args, home=runner_home)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr
    assert "ConfigError" in proc.stderr
    assert "generate.temprature" in proc.stderr


def test_a_missing_recipe_exits_2(tmp_path):
    proc = runner_process("show", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2
    assert "nope.yaml" in proc.stderr and "not found" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_missing_tokenizer_is_reported_before_any_work(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base: {REPO / TINY}\ntokenizer: {{path: missing.model}}\n")
    proc = runner_process(str(recipe), home=tmp_path / "home")
    assert proc.returncode == 2
    assert "tokenizer.path" in proc.stderr and str(tmp_path / "missing.model") in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "home").exists()  # no checkpoint was written for a run that cannot start


def test_a_usage_error_exits_2(runner_home):
    proc = runner_process("show", home=runner_home)
    assert proc.returncode == 2
    assert "RECIPE" in proc.stderr
    assert "Traceback" not in proc.stderr


# --- help and list -------------------------------------------------------------------------


def test_help_lists_every_command(invoke):
    result = invoke("--help")
    assert result.exit_code == 0
    listed = result.output.split("Commands:", 1)[1]
    for command in COMMANDS:
        assert f"  {command} " in listed
    assert "Example" in result.output


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_help_shows_an_example(invoke, command):
    result = invoke(command, "--help")
    assert result.exit_code == 0, result.output
    assert "Example" in result.output
    example = result.output.split("Example", 1)[1]
    assert f"runner {command}" in example or (command == "run" and "runner recipes/" in example)


def test_list_shows_the_specs_and_tokenizers(invoke):
    result = invoke("list")
    assert result.exit_code == 0, result.output
    rows = dict(line.split(": ", 1) for line in result.output.splitlines())
    assert rows["specs"].split(", ") == known_specs() == sorted(p.stem for p in (REPO / "specs").glob("*.yaml"))
    assert sorted(rows["tokenizers"].split(", ")) == sorted(k.value for k in TokenizerKind)
    assert rows["dtypes"].split(", ") == [d.value for d in DType]
    assert rows["kernels"].split(", ") == ["auto", "runner", "torch"]


# --- init ----------------------------------------------------------------------------------


def expected_numel(spec) -> int:
    """Parameter count of a LLaMA block stack, from the spec alone (independent of tensor names)."""
    d, hd = spec.dim, spec.head_size
    attention = d * (spec.n_heads + 2 * spec.kv_heads) * hd + spec.n_heads * hd * d
    feed_forward = 3 * d * spec.intermediate_size
    per_layer = attention + feed_forward + 2 * d
    head = 0 if spec.tie_embeddings else spec.vocab_size * d
    return spec.vocab_size * d + spec.n_layers * per_layer + d + head


def test_init_writes_a_plain_checkpoint_of_the_spec(invoke, tmp_path):
    out = tmp_path / "nested" / "model.pth"
    result = invoke("init", "tiny-llama", str(out))
    assert result.exit_code == 0, result.output
    assert str(out) in result.output

    payload = torch.load(out, weights_only=True)
    spec = load_spec("tiny-llama")
    assert payload["spec"] == dataclasses.asdict(spec)
    state = payload["state_dict"]
    assert all(isinstance(t, torch.Tensor) and t.dtype == torch.float32 for t in state.values())
    assert sum(t.numel() for t in state.values()) == expected_numel(spec)

    from runner.model.llama import Transformer
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(spec).state_dict().items()}
    assert {k: t.shape for k, t in state.items()} == shapes
    assert state["tok_embeddings.weight"].shape == (spec.vocab_size, spec.dim)
    assert [f.name for f in out.parent.iterdir()] == ["model.pth"]  # no partial file left beside it


def test_init_is_seeded(invoke, tmp_path):
    paths = {}
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        paths[name] = tmp_path / f"{name}.pth"
        assert invoke("init", "tiny-llama", str(paths[name]), "--seed", seed).exit_code == 0
    a, b, c = (torch.load(paths[n], weights_only=True)["state_dict"] for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["tok_embeddings.weight"], c["tok_embeddings.weight"])


def test_init_of_an_unknown_spec_exits_2_listing_the_known_ones(tmp_path):
    proc = runner_process("init", "llama-9", str(tmp_path / "m.pth"))
    assert proc.returncode == 2
    assert "llama-9" in proc.stderr
    assert all(name in proc.stderr for name in known_specs())
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "m.pth").exists()


# --- end to end on the tiny random model ---------------------------------------------------


def text_and_stats(output: str) -> tuple[list[str], list[str]]:
    lines = output.splitlines()
    return [l for l in lines if "tokens/s" not in l], [l for l in lines if "tokens/s" in l]


def test_run_generates_and_reports(invoke):
    result = invoke(TINY, "generate.max_new_tokens=12")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Once upon a time")
    text, stats = text_and_stats(result.stdout)
    assert len(stats) == 1 and stats[0].startswith("12 tokens | ")
    assert "".join(text) != "Once upon a time"  # something was generated


def test_greedy_output_is_identical_across_runs(invoke):
    outputs = [invoke(TINY, "generate.temperature=0", "generate.max_new_tokens=16").output for _ in range(2)]
    assert text_and_stats(outputs[0])[0] == text_and_stats(outputs[1])[0]
    assert text_and_stats(outputs[0])[1]  # the stats line is there (and is allowed to differ)


def test_num_samples_prints_each_sample_and_each_is_reproducible_alone(invoke):
    seed = 1234
    both = invoke(TINY, "generate.num_samples=2", "generate.max_new_tokens=12", f"generate.seed={seed}")
    assert both.exit_code == 0, both.output
    text, stats = text_and_stats(both.stdout)
    assert len(stats) == 1 and "2 rows decoded together" in stats[0]  # decoded as one batch
    assert text[0] == "--- sample 1/2" and "--- sample 2/2" in text
    i = text.index("--- sample 2/2")
    samples = [text[1:i], text[i + 1:]]
    assert all(s[0].startswith("Once upon a time") for s in samples)
    # Sample i is seeded with generate.seed + i, so each can be regenerated on its own.
    for k, sample in enumerate(samples):
        alone = invoke(TINY, "generate.max_new_tokens=12", f"generate.seed={seed + k}")
        assert text_and_stats(alone.stdout)[0] == sample


def test_the_entry_point_runs_the_tiny_recipe(runner_home):
    proc = runner_process(TINY, "generate.max_new_tokens=4", home=runner_home)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Once upon a time")
    assert "tokens/s" in proc.stdout
    assert "Traceback" not in proc.stderr
