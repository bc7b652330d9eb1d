"""Stop strings: generation ends where the streamed text first contains one, the stop string is
not printed, one cut across tokens is caught, and nothing printed is ever taken back."""
import json
import re
import subprocess
import sys
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from runner.tokenizers.base import StopText

ROOT = Path(__file__).resolve().parents[2]
TINY = [str(ROOT / "recipes" / "tiny-random.yaml"), "generate.temperature=0", "generate.max_new_tokens=40"]
ALPHABET = st.sampled_from("ab c\n")  # few letters: stops occur, and overlap their own prefixes


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(ALPHABET, max_size=4), max_size=12), st.lists(st.text(ALPHABET, min_size=1, max_size=4),
                                                                      max_size=3))
def test_the_printed_text_is_the_stream_cut_before_the_first_stop(pieces, stops):
    text = "".join(pieces)
    first = min((i for i in (text.find(s) for s in stops) if i >= 0), default=None)
    cut = StopText(stops)
    printed, seen = "", ""
    for piece in pieces:
        printed += cut.push(piece)
        seen += piece
        assert seen.startswith(printed) or cut.stopped  # only what stays printed is printed
        if not cut.stopped:
            # held back: at most the longest proper prefix of a stop string
            assert len(seen) - len(printed) < max((len(s) for s in stops), default=1)
    printed += cut.flush()
    assert printed == (text if first is None else text[:first])
    assert cut.stopped == (first is not None)


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
