"""Real tokenizer files for tests, trained in seconds, and text strategies to feed them.

`python -m tests.helpers.tokenizers` rebuilds recipes/assets/tiny-sp.model.
"""
from __future__ import annotations

import base64
import codecs
import collections
import contextlib
import io
import itertools
import sys
from collections.abc import Iterable
from pathlib import Path

import regex
import sentencepiece as spm
from hypothesis import strategies as st

from runner.tokenizers.tiktoken import LLAMA3_PATTERN

TINY_SP_MODEL = Path(__file__).resolve().parents[2] / "recipes" / "assets" / "tiny-sp.model"


def train_sentencepiece(text: str, out_prefix: Path, vocab_size: int) -> Path:
    """A BPE SentencePiece model trained on `text`, set up like LLaMA-2's; returns out_prefix.model.

    Like LLaMA-2's: no normalisation, whitespace kept as is, byte fallback (so any text
    encodes), digits split, unk/bos/eos = 0/1/2 and no pad.
    """
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([line for line in text.splitlines() if line.strip()]),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        minloglevel=2,  # the trainer logs every step to stderr otherwise
    )
    path = Path(f"{out_prefix}.model")
    path.write_bytes(model.getvalue())
    return path


def write_tiktoken_ranks(path: Path, texts: Iterable[str], n_merges: int, pattern: str = LLAMA3_PATTERN) -> Path:
    """A byte-level BPE rank file: the 256 single bytes, then `n_merges` merges learned from `texts`.

    The format is tiktoken's (one "base64-token rank" line each, by rank), so
    tiktoken.load.load_tiktoken_bpe reads it too.
    """
    # Pre-split like the tokenizer will, so merges never cross a pattern boundary.
    words = collections.Counter(
        tuple(bytes([b]) for b in word.encode("utf-8")) for text in texts for word in regex.findall(pattern, text)
    )
    ranks = {bytes([b]): b for b in range(256)}
    while len(ranks) < 256 + n_merges:
        pairs = collections.Counter()
        for word, count in words.items():
            for pair in itertools.pairwise(word):
                if pair[0] + pair[1] not in ranks:  # two splits of one token would give it two ranks
                    pairs[pair] += count
        if not pairs:
            raise ValueError(f"the texts allow only {len(ranks) - 256} merges, not {n_merges}")
        best = max(pairs, key=lambda pair: (pairs[pair], pair))  # ties broken by bytes: reproducible
        ranks[best[0] + best[1]] = len(ranks)
        words = collections.Counter({_merge(word, best): count for word, count in words.items()})
    path.write_bytes(b"".join(base64.b64encode(token) + b" %d\n" % rank for token, rank in ranks.items()))
    return path


def _merge(word: tuple[bytes, ...], pair: tuple[bytes, bytes]) -> tuple[bytes, ...]:
    out, i = [], 0
    while i < len(word):
        if word[i : i + 2] == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def english_corpus() -> str:
    """Permissively licensed English available offline: the Zen of Python and Python's LICENSE.

    Python's LICENSE.txt differs between Python versions, so the trained model may too.
    """
    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen
        import this  # holds the Zen ROT13-encoded in this.s

    license_txt = Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "LICENSE.txt"
    return codecs.decode(this.s, "rot13") + "\n" + license_txt.read_text(encoding="utf-8")


# --- hypothesis strategies ----------------------------------------------------------------

SAMPLES = (
    "😀", "👍🏽", "🇫🇷", "👨‍👩‍👧", "é", "e\u0301", "日本語のテキスト", "Ünïcödé", "Ωμέγα", "привет", "ﬁ①²",
    "def f(x):\n    return x ** 2\n", "if (a && b) { c[i] = 0; }", "#include <stdio.h>", "<s>", "</s>",
    "<|begin_of_text|>", "<|eot_id|>", "\t", "\r\n", "\x00", "\u00a0", "\u3000", "3.14159", "1,000,000",
)


def texts(exclude: str = "") -> st.SearchStrategy[str]:
    """Prompts mixing any unicode, emoji, whitespace runs, digits, code and special-token text.

    `exclude`: characters the tokenizer under test is known to change (removed from every sample).
    """
    parts = st.one_of(
        st.text(st.characters(codec="utf-8"), max_size=12),
        st.sampled_from(SAMPLES),
        st.text(" \t\n\r\u00a0\u3000", min_size=1, max_size=30),
        st.integers(min_value=0).map(str),
    )
    table = {ord(c): None for c in exclude}
    return st.lists(parts, max_size=10).map(lambda xs: "".join(xs).translate(table))


if __name__ == "__main__":
    train_sentencepiece(english_corpus(), TINY_SP_MODEL.with_suffix(""), vocab_size=512)
