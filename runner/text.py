"""Generated token ids as printable text, cut at a stop string or an end-of-sequence token.

Every place that shows generated text (the CLI, chat, the server, eval's generate_until) pushes
each new id into a TextStream and prints what it returns: only text that is certain. A multi-byte
character split across tokens is held back until it is whole, and an ending that may still grow
into a stop string is held back until it cannot; a stop string itself is never returned.
"""
from __future__ import annotations

import codecs
from collections.abc import Iterable

from runner.tokenizers.base import Tokenizer


class TextStream:
    """Push ids, print what push() returns; `stopped` once a stop string or an EOS id was pushed,
    and flush() for what is held back when generation ends for any other reason."""

    def __init__(self, tokenizer: Tokenizer, stops: Iterable[str] = (), eos_ids: Iterable[int] | None = None):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.eos_ids = tokenizer.eos_ids if eos_ids is None else frozenset(eos_ids)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""  # decoded text that may still begin a stop string
        self.stopped = False  # a stop string appeared (or flush found one)
        self.ended = False  # an EOS id was pushed

    def push(self, id: int) -> str:
        """The text now safe to print after token `id`. An EOS id ends the text: what was held back
        comes out with it. An id past the tokenizer's vocabulary (a model's embedding padded beyond
        it) adds nothing."""
        if self.stopped or self.ended:
            return ""
        if id in self.eos_ids:
            tail = self.flush()
            self.ended = True
            return tail
        if not 0 <= id < self.tokenizer.vocab_size:
            return ""
        return self._cut(self._utf8.decode(self.tokenizer.token_bytes(id)))

    def flush(self) -> str:
        """Whatever is held back, once generation has ended without EOS or a stop string (an
        incomplete character becomes U+FFFD, which may still complete a stop string)."""
        if self.stopped or self.ended:
            return ""
        return self._cut(self._utf8.decode(b"", final=True), final=True)

    @property
    def done(self) -> bool:
        """Nothing more will be printed: a stop string or EOS was seen."""
        return self.stopped or self.ended

    def _cut(self, text: str, final: bool = False) -> str:
        self._pending += text
        hits = [i for i in (self._pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self._pending, self.stopped = self._pending[:min(hits)], "", True
            return out
        keep = 0 if final else max((k for s in self.stops for k in range(min(len(s) - 1, len(self._pending)), 0, -1)
                                    if self._pending.endswith(s[:k])), default=0)
        cut = len(self._pending) - keep
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out
