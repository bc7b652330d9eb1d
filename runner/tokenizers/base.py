"""What every tokenizer offers the runner, and the streaming text decoder built on it."""
from __future__ import annotations

import codecs
from typing import Iterable, Protocol


class Tokenizer(Protocol):
    """Text <-> token ids, plus the ids that matter to generation."""

    bos_id: int | None  # None: the tokenizer has no begin-of-sequence token
    eos_ids: frozenset[int]  # any of these stops generation; empty: none does
    vocab_size: int  # number of ids, special tokens included

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """Ids of `text`, with bos_id first when `bos` and the tokenizer has one.

        Special-token text inside `text` (e.g. "<|eot_id|>") is encoded as ordinary text.
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
        """The text completed by token `id` ("" while a character is still partial)."""
        return self._decoder.decode(self.tokenizer.token_bytes(id))

    def flush(self) -> str:
        """Whatever is held back (an incomplete character becomes U+FFFD); the stream restarts."""
        return self._decoder.decode(b"", final=True)
