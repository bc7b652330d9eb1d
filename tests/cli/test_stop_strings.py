"""Stop strings end generation where the streamed text first contains one, and are not printed
(the text stream's own properties: tests/tokenizers/test_text_stream.py)."""
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY = [str(ROOT / "recipes" / "tiny-random.yaml"), "generate.temperature=0", "generate.max_new_tokens=40"]


def run(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runner", *TINY, *overrides], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


STATS = re.compile(r"^(\d+) tokens \| .*\n\Z", re.M)


def text_of(result: subprocess.CompletedProcess) -> str:
    """The printed text: stdout before its statistics line (and the newline that ends the text)."""
    assert result.returncode == 0, result.stderr
    text = result.stdout[:STATS.search(result.stdout).start() - 1]
    return re.sub(r"\nspeculative \(k=.*\Z", "", text)  # a speculative run's statistics line before it


def ran(result: subprocess.CompletedProcess) -> int:
    """How many tokens were generated."""
    return int(STATS.search(result.stdout).group(1))


def test_generation_stops_at_a_string_cut_across_tokens_and_not_at_one_that_never_occurs():
    full = run()
    whole = text_of(full)
    prompt = "Once upon a time"
    generated = whole[len(prompt):]
    stop = generated[5:12]  # seven characters: several of this model's tokens
    assert len(stop.strip()) > 2 and generated.index(stop) == 5
    cut = run("generate.stop=" + json.dumps([stop]))  # JSON is YAML: any text, quoted
    assert text_of(cut) == prompt + generated[:5]
    assert ran(cut) < ran(full)  # it stopped generating, not only printing
    assert text_of(run("generate.stop=" + json.dumps([stop]), "draft.kind=ngram")) == prompt + generated[:5]
    never = run('generate.stop=["never in this text"]')
    assert text_of(never) == whole and ran(never) == ran(full)


def test_an_empty_stop_string_is_a_recipe_error():
    result = run('generate.stop=[""]')
    assert result.returncode == 2 and "generate.stop" in result.stderr
