"""`runner bench` reports figures (never asserted as speeds): the table and the JSON hold them."""
from __future__ import annotations

import json
import statistics

import pytest
from click.testing import CliRunner

from runner.cli import cli


def test_bench_writes_a_table_and_json_with_the_hf_ratio(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNNER_HOME", str(tmp_path / "home"))
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(cli, ["bench", "recipes/tiny-random.yaml", "recipes/tiny-random.yaml", "dtype=bfloat16",
                                      "threads=1", "--runs", "2", "--tokens", "8", "--vs", "hf", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.count("| tiny-random dtype=bfloat16 threads=1 |") == 2
    assert "decode after" not in result.output  # one prompt length: no context ratio, twin labels or not
    data = json.loads(out.read_text())
    assert len(data["results"]) == 2
    for row in data["results"]:
        assert len(row["decode_tokens_per_s"]) == 2 and all(rate > 0 for rate in row["decode_tokens_per_s"])
        assert row["vs_hf_ratio"] == row["decode_tokens_per_s_median"] / row["hf_decode_tokens_per_s"]
        assert row["hf_decode_tokens_per_s"] > 0 and row["baselines"] == {"hf": row["hf_decode_tokens_per_s"]}
        assert row["model_bytes"] >= row["bytes_per_token"] > 0
        # bfloat16: two bytes per weight, plus norms
        assert row["model_bytes"] < 2 * 170_000 * 1.1  # tiny-llama: about 170k weights of 2 bytes


def test_bench_with_one_recipe_puts_its_figures_at_the_top(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNNER_HOME", str(tmp_path / "home"))
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(cli, ["bench", "recipes/tiny-random.yaml", "threads=1", "--runs", "1", "--tokens", "4",
                                      "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["decode_tokens_per_s_median"] == data["results"][0]["decode_tokens_per_s_median"]
    assert "vs_hf_ratio" not in data and "| vs HF" not in result.output


def test_bench_plots_the_figures(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")  # the [plot] extra, which the test extra brings in
    monkeypatch.setenv("RUNNER_HOME", str(tmp_path / "home"))
    out = tmp_path / "bench.png"
    result = CliRunner().invoke(cli, ["bench", "recipes/tiny-random.yaml", "threads=1", "--runs", "2", "--tokens", "4",
                                      "--plot", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_vs_llamacpp_needs_a_gguf_source(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNNER_HOME", str(tmp_path / "home"))
    result = CliRunner().invoke(cli, ["bench", "recipes/tiny-random.yaml", "threads=1", "--runs", "1", "--tokens", "4",
                                      "--vs", "llamacpp"])
    assert result.exit_code == 2
    # Without llama-cpp-python the message says how to install it; with it, that a GGUF source is needed.
    assert "--vs llamacpp" in result.output and ("llama-cpp-python" in result.output or "GGUF" in result.output)
    assert "Traceback" not in result.output


def test_bench_takes_a_prompt_of_n_tokens_and_reports_prefill_against_the_gemm_rate(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNNER_HOME", str(tmp_path / "home"))
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(cli, ["bench", "recipes/tiny-random.yaml", "threads=1", "--runs", "1", "--tokens", "4",
                                      "--prompt-tokens", "100", "--roofline", "--vs", "hf", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["prompt_tokens"] == 100 and data["prompt"] is None
    assert data["gemm_gflop_s_by_dtype"]["float32"] == data["gemm_gflop_s"] > 0 and data["hf_prefill_tokens_per_s"] > 0
    # prefill's flops: two per weight of every linear layer per prompt token
    assert data["prefill_gflop_s"] == pytest.approx(
        statistics.median(data["prefill_tokens_per_s"]) * 2 * data["matmul_params"] / 1e9)
    assert "GFLOP/s" in result.output


@pytest.mark.parametrize("prompt", ["def f(x):\n    return {'a': [1, 2]}\n# done: yes", "null", "- a\n- b", "x: y"])
def test_bench_prompt_is_text_as_typed(tmp_path, monkeypatch, prompt):
    monkeypatch.setenv("RUNNER_HOME", str(tmp_path / "home"))
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(cli, ["bench", "recipes/tiny-random.yaml", "threads=1", "--runs", "1", "--tokens", "2",
                                      "--prompt", prompt, "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["prompt"] == prompt


def test_bench_times_several_prompt_lengths_in_turn_and_reports_each_against_the_shortest(tmp_path, monkeypatch):
    from runner import generate as generating

    monkeypatch.setenv("RUNNER_HOME", str(tmp_path / "home"))
    lengths = []
    generate = generating.generate

    def spy(built, prompt, *args, **kwargs):
        lengths.append(len(prompt))
        return generate(built, prompt, *args, **kwargs)

    monkeypatch.setattr(generating, "generate", spy)
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(cli, ["bench", "recipes/tiny-random.yaml", "threads=1", "--runs", "3", "--tokens", "4",
                                      "--prompt-tokens", "5,40", "--json", str(out)])
    assert result.output.count("decode after 40 prompt tokens") == 1
    assert result.exit_code == 0, result.output
    # A warm-up of each length, then the timed runs alternate: both lengths see the same minutes.
    assert lengths == [5, 40] + [5, 40] * 3
    data = json.loads(out.read_text())
    assert data["prompt_tokens"] == [5, 40]
    rows = data["results"]
    assert [r["prompt_tokens"] for r in rows] == [5, 40] and [r["label"] for r in rows] == [
        "tiny-random threads=1 @5", "tiny-random threads=1 @40"]
    assert all(len(r["decode_tokens_per_s"]) == 3 for r in rows)
    assert [r["recipe"] for r in data["decode_over_shortest_prompt"]] == ["tiny-random threads=1"]
    ratio = data["decode_over_shortest_prompt"][0]["ratios"]
    assert ratio["5"] == {"median": 1.0, "best": 1.0}
    assert ratio["40"]["median"] == pytest.approx(rows[1]["decode_tokens_per_s_median"]
                                                  / rows[0]["decode_tokens_per_s_median"])
    assert ratio["40"]["best"] == pytest.approx(max(rows[1]["decode_tokens_per_s"]) / max(rows[0]["decode_tokens_per_s"]))
    assert "decode after 40 prompt tokens" in result.output and "of after 5" in result.output


@pytest.mark.parametrize("bad", ["0", "5,x", "5,5", "-3"])
def test_bench_refuses_prompt_lengths_that_are_not_different_positive_numbers(tmp_path, monkeypatch, bad):
    monkeypatch.setenv("RUNNER_HOME", str(tmp_path / "home"))
    result = CliRunner().invoke(cli, ["bench", "recipes/tiny-random.yaml", "--prompt-tokens", bad])
    assert result.exit_code == 2 and "--prompt-tokens" in result.output and "Traceback" not in result.output
