"""What every tokenizer offers the runner, and what the vocabularies share: special-token text
found in prompts, added tokens cut out of text, the generation ids a loader sets, and the
recipe's tokenizer.bos / tokenizer.eos."""
from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from runner.config.errors import ConfigError, problem
from runner.config.schema import TokenizerSection


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


@dataclass(frozen=True)
class Added:
    """A token found in text as a whole before the model sees the text (a special or added token)."""

    id: int
    text: str
    # True: found only by encode(allow_special=True), and adds no text to the output.
    # False: always found, and adds its text (HF's non-special added tokens, GGUF USER_DEFINED).
    special: bool
    lstrip: bool = False  # it takes the whitespace before it (tokenizers' AddedToken.lstrip) ...
    rstrip: bool = False  # ... and after it


# Unicode's White_Space: what `tokenizers` strips beside an lstrip/rstrip token (Python's
# str.isspace also counts U+001C..U+001F).
WHITESPACE = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000"
                       + "".join(map(chr, range(0x2000, 0x200B))))


class AddedTokens:
    """A vocabulary's added tokens, cut out of text as `tokenizers`' AddedVocabulary does."""

    def __init__(self, added: Sequence[Added]):
        self.by_text = {a.text: a for a in added}
        self.by_id = {a.id: a for a in added}
        self._always = finder(a.text for a in added if not a.special)
        self._any = finder(a.text for a in added)

    def split(self, text: str, allow_special: bool) -> Iterator[tuple[int, str, Added | None]]:
        """`text` cut around the added tokens it holds: (start, piece, token or None), in order,
        no empty pieces. Special tokens are found only when `allow_special`. An lstrip (rstrip)
        token's piece takes the whitespace before (after) it."""
        found = self._any if allow_special else self._always
        start = 0
        for m in found.finditer(text) if found is not None else ():
            token = self.by_text[m.group()]
            begin, end = m.start(), m.end()
            if token.lstrip:
                while begin > start and text[begin - 1] in WHITESPACE:
                    begin -= 1
            if token.rstrip:
                while end < len(text) and text[end] in WHITESPACE:
                    end += 1
            if begin > start:
                yield start, text[start:begin], None
            yield begin, text[begin:end], token
            start = end
        if start < len(text):
            yield start, text[start:], None


class GenerationIds:
    """What a loader sets on a vocabulary once it is built: bos/eos, whether encode adds bos, and
    the chat template with the texts it writes for bos/eos. Needs the class's token_text."""

    bos_id: int | None = None
    eos_ids: frozenset[int] = frozenset()
    add_bos = False  # encode(bos=True) adds bos_id only when the tokenizer's files ask for it
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None

    def token_text(self, id: int) -> str:
        raise NotImplementedError

    def configure(self, bos_id: int | None, eos_ids: Sequence[int], add_bos: bool, chat_template: str | None) -> None:
        """Set the generation ids; eos_ids[0] is the one a chat template writes as eos_token."""
        self.bos_id, self.eos_ids = bos_id, frozenset(eos_ids)
        self.add_bos = add_bos and bos_id is not None
        self.chat_template = chat_template
        self.bos_token = self.token_text(bos_id) if bos_id is not None else None
        self.eos_token = self.token_text(eos_ids[0]) if eos_ids else None


class Vocabulary(Protocol):
    def token_id(self, text: str) -> int | None:
        """The id of the token written `text`, or None."""
        ...


def overrides(tokenizer: Vocabulary, section: TokenizerSection, source: str,
              bos_id: int | None, eos_ids: list[int]) -> tuple[int | None, list[int]]:
    """bos_id and eos_ids with the recipe's tokenizer.bos / tokenizer.eos (token texts) in their place."""
    problems = []
    for key, text in (("bos", section.bos), ("eos", section.eos)):
        if text is None:
            continue
        found = tokenizer.token_id(text)
        if found is None:
            problems.append(problem(source, f"tokenizer.{key}", f"is not a single token of {section.path}", text))
        elif key == "bos":
            bos_id = found
        else:
            eos_ids = [found]
    if problems:
        raise ConfigError(problems)
    return bos_id, eos_ids
