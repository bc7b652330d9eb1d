"""`runner eval` end to end on the tiny random recipe, and its bad input: exit code 2, one line
per problem, no traceback."""
from __future__ import annotations

import json
import sys

import pytest

from runner.cli import main
from tests.eval.conftest import TINY

pytest.importorskip("lm_eval", reason="the eval extra (lm-eval) is part of the test extra")


def run(capsys, monkeypatch, home, *args):
    monkeypatch.setenv("RUNNER_HOME", str(home))
    with pytest.raises(SystemExit) as exit_:
        main(["eval", *args])
        sys.exit(0)
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


def one_error(code, err) -> str:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_shipped_tasks_print_a_table_and_write_json(capsys, monkeypatch, runner_home, tmp_path):
    out_json = tmp_path / "r.json"
    code, out, err = run(capsys, monkeypatch, runner_home, TINY, "model.arch.max_seq_len=64", "--tasks",
                         "pydoc_perplexity,basic_knowledge_mc,basic_facts_qa", "--limit", "2", "--json", str(out_json))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[1] == "| task | metric | value | stderr |"
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:2]) for line in lines[3:]}
    assert {("pydoc_perplexity", "word_perplexity"), ("pydoc_perplexity", "bits_per_byte"),
            ("basic_knowledge_mc", "acc"), ("basic_knowledge_mc", "acc_norm"),
            ("basic_facts_qa", "exact_match (strip)")} <= rows
    data = json.loads(out_json.read_text())
    assert data["recipe"]["model"]["arch"]["max_seq_len"] == 64
    assert data["n-samples"]["basic_knowledge_mc"]["effective"] == 2
    assert 0 <= data["results"]["basic_knowledge_mc"]["acc,none"] <= 1


def test_an_unknown_task_lists_the_available_ones(capsys, monkeypatch, runner_home):
    line = one_error(*run(capsys, monkeypatch, runner_home, TINY, "--tasks", "basic_knowledge_mc,hellaswag")[::2])
    assert "--tasks" in line and "'hellaswag'" in line and "unknown task" in line
    for shipped in ("basic_facts_qa", "basic_knowledge_mc", "pydoc_perplexity"):
        assert shipped in line


def test_a_task_whose_data_file_is_missing(capsys, monkeypatch, runner_home, tmp_path):
    (tmp_path / "mine.yaml").write_text("task: mine\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                        "    test: gone.jsonl\noutput_type: loglikelihood_rolling\ntest_split: test\n"
                                        "doc_to_text: ''\ndoc_to_target: '{{text}}'\n")
    line = one_error(*run(capsys, monkeypatch, runner_home, TINY, "--tasks", "mine", "--include-path",
                          str(tmp_path))[::2])
    assert "data file is missing" in line and str(tmp_path / "gone.jsonl") in line


def test_an_included_task_with_local_data_runs(capsys, monkeypatch, runner_home, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "d.jsonl").write_text("".join(json.dumps({"text": f"doc {i} is here"}) + "\n" for i in range(3)))
    (tmp_path / "mine.yaml").write_text("task: mine\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                        "    test: data/d.jsonl\noutput_type: loglikelihood_rolling\ntest_split: test\n"
                                        "doc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n"
                                        "  - metric: bits_per_byte\n")
    code, out, err = run(capsys, monkeypatch, runner_home, TINY, "--tasks", "mine", "--include-path", str(tmp_path))
    assert code == 0, err
    assert "| mine | bits_per_byte |" in out


def test_limit_zero(capsys, monkeypatch, runner_home):
    line = one_error(*run(capsys, monkeypatch, runner_home, TINY, "--tasks", "basic_knowledge_mc", "--limit", "0")[::2])
    assert "--limit" in line and "(got 0)" in line


def test_without_lm_eval_it_names_the_extra(capsys, monkeypatch, runner_home):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    line = one_error(*run(capsys, monkeypatch, runner_home, TINY, "--tasks", "basic_knowledge_mc")[::2])
    assert "lm-eval: is not installed" in line and ".[eval]" in line


@pytest.mark.tp
def test_under_tensor_parallelism_rank_0_reports_what_one_process_does(runner_home):
    """Every rank runs the same forwards (lm-eval splits no requests); one table is printed."""
    import subprocess

    args = [sys.executable, "-m", "runner", "eval", TINY, "--tasks", "basic_knowledge_mc", "--limit", "6"]
    env = {**__import__("os").environ, "RUNNER_HOME": str(runner_home)}
    one = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    two = subprocess.run(args + ["parallel.world_size=2"], capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    table = [line for line in one.stdout.splitlines() if line.startswith("| basic_knowledge_mc")]
    assert len(table) == 2 and [line for line in two.stdout.splitlines() if line.startswith("| basic")] == table
