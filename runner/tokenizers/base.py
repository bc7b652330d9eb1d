"""What every tokenizer offers the runner, and helpers for special-token text."""
from __future__ import annotations

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
