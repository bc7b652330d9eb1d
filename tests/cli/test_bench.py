"""`runner bench` reports figures (never asserted as speeds): the table and the JSON hold them."""
from __future__ import annotations

import json

from click.testing import CliRunner

from runner.cli import cli


def test_bench_writes_a_table_and_json_with_the_hf_ratio(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNNER_HOME", str(tmp_path / "home"))
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(cli, ["bench", "recipes/tiny-random.yaml", "recipes/tiny-random.yaml", "dtype=bfloat16",
                                      "threads=1", "--runs", "2", "--tokens", "8", "--vs", "hf", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.count("| tiny-random dtype=bfloat16 threads=1 |") == 2
    data = json.loads(out.read_text())
    assert len(data["results"]) == 2
    for row in data["results"]:
        assert len(row["decode_tokens_per_s"]) == 2 and all(rate > 0 for rate in row["decode_tokens_per_s"])
        assert row["vs_hf_ratio"] == row["decode_tokens_per_s_median"] / row["hf_decode_tokens_per_s"]
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
    assert data["vs_hf_ratio"] is None
