"""Progress bars: on a terminal they show (quantize's layers, bench's runs), piped they never
do, and --quiet hides them."""
import subprocess
import sys
from pathlib import Path

import pexpect

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "recipes" / "tiny-random.yaml")


def quantize(tmp_path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "runner", *flags, "quantize", TINY, "quant.mode=int8", "--out", str(tmp_path / "q.pth")]


def on_a_terminal(command: list[str]) -> str:
    child = pexpect.spawn(command[0], command[1:], cwd=str(ROOT), encoding="utf-8", timeout=120)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    return child.before


def test_a_terminal_sees_the_quantize_bar_run_to_its_end(tmp_path):
    shown = on_a_terminal(quantize(tmp_path))
    layers = 2 * 4  # tiny-llama: 2 layers x (wqkv, wo, w13, w2); the output layer stays float by default
    assert f"quant: quantizing layers [{'#' * 25}] {layers}/{layers}" in shown
    assert "wrote" in shown


def test_piped_output_and_quiet_have_no_bars(tmp_path):
    piped = subprocess.run(quantize(tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0
    assert "[#" not in piped.stderr and "\r" not in piped.stderr
    quiet = on_a_terminal(quantize(tmp_path, "--quiet"))
    assert "[#" not in quiet and "wrote" in quiet


def test_bench_shows_its_timed_runs_on_a_terminal():
    shown = on_a_terminal([sys.executable, "-m", "runner", "bench", TINY, "--runs", "3", "--tokens", "4"])
    assert f"timed runs [{'#' * 25}] 3/3" in shown
