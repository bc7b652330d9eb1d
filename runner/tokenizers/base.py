"""What every tokenizer offers the runner, and the streaming text decoder built on it."""
from __future__ import annotations

import codecs
import re
from typing import Iterable, Iterator, Protocol


class Tokenizer(Protocol):
    """Text <-> token ids, plus the ids that matter to generation."""

    bos_id: int | None  # None: the tokenizer has no begin-of-sequence token
    eos_ids: frozenset[int]  # any of these stops generation; empty: none does
    vocab_size: int  # number of ids, special tokens included
    # A chat template (jinja, as Hugging Face writes them) shipped with the tokenizer, and the
    # texts it writes for bos/eos; None: none (see runner.tokenizers.chat.render_chat).
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None

    def encode(self, text: str, bos: bool = True, allow_special: bool = False) -> list[int]:
        """Ids of `text`, with bos_id first when `bos` and the tokenizer's files ask for one.

        Special-token text inside `text` (e.g. "<|eot_id|>") is encoded as ordinary text unless
        `allow_special`, which makes it the special token (for a rendered chat template).
        """
        ...

    def decode(self, ids: Iterable[int]) -> str:
        ...

    def token_bytes(self, id: int) -> bytes:
        """The raw bytes token `id` adds to the output; b"" for control and special tokens."""
        ...


class TextStream:
    """Turns generated ids into text as it becomes printable.

    A multi-byte character may be split across tokens (byte-fallback pieces, byte-level
    BPE), so bytes are held back until they complete a character.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, id: int) -> str:
        """The text completed by token `id` ("" while a character is still partial). An id past the
        tokenizer's vocabulary (a model's embedding padded beyond it) adds nothing."""
        if not 0 <= id < self.tokenizer.vocab_size:
            return ""
        return self._decoder.decode(self.tokenizer.token_bytes(id))

    def flush(self) -> str:
        """Whatever is held back (an incomplete character becomes U+FFFD); the stream restarts."""
        return self._decoder.decode(b"", final=True)


class StopText:
    """Streamed text cut at the first of `stops`: push() returns what is safe to print, holding
    back only an ending that may still grow into a stop string; the stop string itself is never
    returned. `stopped` turns True once one has appeared (across any number of pushes)."""

    def __init__(self, stops: Iterable[str]):
        self.stops = [s for s in stops if s]
        self.pending, self.stopped = "", False

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending, self.stopped = self.pending[:min(hits)], "", True
            return out
        keep = max((k for s in self.stops for k in range(min(len(s) - 1, len(self.pending)), 0, -1)
                    if self.pending.endswith(s[:k])), default=0)
        out, self.pending = self.pending[:len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        return out

    def flush(self) -> str:
        """What was held back, once the text has ended without a stop string."""
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


def finder(texts: Iterable[str]) -> re.Pattern | None:
    """A regex finding any of `texts` (special tokens): leftmost, then longest, as `tokenizers` does."""
    texts = sorted(set(texts), key=lambda t: (-len(t), t))
    return re.compile("|".join(map(re.escape, texts))) if texts else None


def split_at(text: str, found: re.Pattern | None) -> Iterator[tuple[str, bool]]:
    """`text` cut around what `found` finds: (piece, was_found) in order, no empty pieces."""
    start = 0
    for m in found.finditer(text) if found is not None else ():
        if m.start() > start:
            yield text[start : m.start()], False
        yield m.group(), True
        start = m.end()
    if start < len(text):
        yield text[start:], False
