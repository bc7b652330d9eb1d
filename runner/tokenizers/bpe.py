"""GPT-2 byte-level BPE (a vocabulary and its merge list) run by tiktoken: what `gguf` and `hf` share.

Merge-list BPE (Hugging Face `tokenizers`, llama.cpp) repeatedly applies the listed merge that
comes first; tiktoken repeatedly joins the adjacent pair whose concatenation has the lowest rank.
They agree when a merged token's rank is its merge's position (single bytes ranked before every
merge), with two caveats that real vocabularies meet (SmolLM2's does; the tests check):
- tiktoken first looks a whole pre-tokenized piece up as one token, which merge-list BPE does only
  with `ignore_merges`: the same whenever each merged token's own bytes BPE back to that token;
- a token made by two different merges keeps the rank of the first.

Bytes without a token of their own (SmolLM2 has none for 21 byte values, e.g. 0x04 and the 0xF1
lead byte of U+40000..U+7FFFF) are dropped, as `tokenizers` drops characters its BPE model does not
know when it has no unk_token: the rest of the piece is merged as if they were not there (llama.cpp
drops them too, but after merging). With an unk_token each such byte becomes it instead.
"""
from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Sequence

import regex
import tiktoken  # an absolute import: this package's own tiktoken.py does not shadow the library

from runner.tokenizers.base import Added, AddedTokens, GenerationIds

# GPT-2's pre-tokenizer, as `tokenizers`' ByteLevel(use_regex=True) writes it.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

# tiktoken's regex overflows its backtracking stack on whitespace runs of about a million
# characters; text with runs this long is split by the `regex` module instead.
MAX_FAST_RUN = 100_000


def digits_then_gpt2(individual: bool) -> str:
    """One regex for isolating digits (each alone, or runs) and then GPT-2's pattern between them.

    `tokenizers`' Sequence([Digits, ByteLevel]) and llama.cpp's ["\\p{N}", GPT-2] (pre `smollm`)
    run GPT-2's pattern on each stretch between digits, where a digit is the end of the text:
    so no space joins a number (" ?\\p{N}+" is gone) and trailing whitespace may end before one.
    """
    digits = r"\p{N}" if individual else r"\p{N}+"
    return digits + r"|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"


def covering(pattern: str) -> str:
    """`pattern` plus the text between its matches as pieces of their own.

    tiktoken drops text its pattern does not match; `tokenizers`' Split(behavior=Isolated) and
    llama.cpp keep each stretch between matches as a piece, which this alternative reproduces.
    """
    return f"(?:{pattern})|(?:(?!(?:{pattern}))[\\s\\S])+"


def _byte_chars() -> list[str]:
    """GPT-2's map from each byte to the printable character that stands for it in token strings."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, shifted = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + shifted)
            shifted += 1
    return [chars[b] for b in range(256)]


BYTE_CHARS = _byte_chars()  # byte value -> character
CHAR_BYTES = {c: b for b, c in enumerate(BYTE_CHARS)}


def token_bytes_of(text: str) -> bytes:
    """The bytes a byte-level token string stands for; a character outside GPT-2's map stands for
    its own UTF-8 (what `tokenizers`' ByteLevel decoder does)."""
    return b"".join(bytes([CHAR_BYTES[c]]) if c in CHAR_BYTES else c.encode("utf-8") for c in text)


class ByteLevelBPE(GenerationIds):
    """A byte-level BPE vocabulary as a Tokenizer (see runner.tokenizers.base.Tokenizer).

    Raises ValueError saying what is wrong when the vocabulary and merges do not fit together.
    bos/eos, add_bos and the chat template are set by the loader (see `configure`).
    """

    def __init__(self, name: str, vocab: dict[str, int], merges: Sequence[tuple[str, str]], pattern: str,
                 added: Sequence[Added] = (), unk_id: int | None = None, fuse_unk: bool = False,
                 normalize: Callable[[str], str] | None = None, vocab_size: int = 0):
        ranks, rank_ids = _ranks(vocab, merges)
        try:
            self.encoding = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
            self._pieces = regex.compile(pattern)
        except (ValueError, regex.error) as e:
            raise ValueError(f"the pre-tokenizer regex is not valid: {e}") from None
        self._ranks, self._rank_ids = ranks, rank_ids
        self._missing = bytes(b for b in range(256) if bytes([b]) not in ranks)  # bytes without a token
        self._missing_runs = re.compile(b"([" + re.escape(self._missing) + b"]+)") if self._missing else None
        self._unk_id, self._fuse_unk = unk_id, fuse_unk
        self._normalize = normalize

        self.vocab_size = max([vocab_size - 1, *vocab.values(), *(a.id for a in added)]) + 1
        self._bytes = [b""] * self.vocab_size
        for text, id in vocab.items():
            self._bytes[id] = token_bytes_of(text)
        self._added = AddedTokens(added)
        for a in added:
            self._bytes[a.id] = b"" if a.special else a.text.encode("utf-8")

    def token_id(self, text: str) -> int | None:
        """The id of the token written `text`: an added token's text, or an ordinary token's bytes."""
        if text in self._added.by_text:
            return self._added.by_text[text].id
        found = self._ranks.get(text.encode("utf-8"))
        return self._rank_ids[found] if found is not None else None

    def token_text(self, id: int) -> str:
        """How token `id` is written in a prompt or template ("<|im_end|>" for a special token)."""
        if id in self._added.by_id:
            return self._added.by_id[id].text
        return self._bytes[id].decode("utf-8", errors="replace")

    def encode(self, text: str, bos: bool = True, allow_special: bool = False) -> list[int]:
        ids = [self.bos_id] if bos and self.add_bos else []
        for _, piece, added in self._added.split(text, allow_special):
            ids += [added.id] if added else self._encode_ordinary(piece)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`; special tokens add nothing, as in a runner.text.TextStream."""
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self, id: int) -> bytes:
        return self._bytes[id]

    def _encode_ordinary(self, text: str) -> list[int]:
        if self._normalize is not None:
            text = self._normalize(text)
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: U+FFFD, as tiktoken does
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            data = text.encode("utf-8")
        if (self._missing and len(data.translate(None, self._missing)) < len(data)) or _has_long_whitespace(text):
            return self._encode_slow(text)
        return [self._rank_ids[r] for r in self.encoding.encode_ordinary(text)]

    def _encode_slow(self, text: str) -> list[int]:
        """`text` pre-tokenized here, for bytes without a token and for overlong whitespace runs."""
        ids = []
        for m in self._pieces.finditer(_unassigned_as_tiktoken_knows(text)):
            data = text[m.start() : m.end()].encode("utf-8")
            if self._unk_id is None or self._missing_runs is None:
                ids += self._bpe(data.translate(None, self._missing))
                continue
            # Each missing byte is the unk token (a run of them one unk when fused), which no merge joins.
            for part in self._missing_runs.split(data):
                if part and part[0] in self._missing:
                    ids += [self._unk_id] * (1 if self._fuse_unk else len(part))
                else:
                    ids += self._bpe(part)
        return ids

    def _bpe(self, data: bytes) -> list[int]:
        """The ids of one pre-tokenized piece (without bytes that have no token)."""
        # tiktoken's own BPE of one piece, without its regex: a private method (the tests cover it).
        return [self._rank_ids[r] for r in self.encoding._encode_single_piece(data)] if data else []


@functools.cache
def _unassigned_finder() -> tiktoken.Encoding:
    """Finds the characters tiktoken's regex engine has no Unicode data for (category Cn)."""
    return tiktoken.Encoding("unassigned", pat_str=r"\p{Cn}", mergeable_ranks={bytes([b]): b for b in range(256)},
                             special_tokens={})


def _unassigned_as_tiktoken_knows(text: str) -> str:
    """`text` with the characters tiktoken's regex has no Unicode data for (its tables are those of
    `tokenizers`' regex engine; the `regex` module's are newer) all one unassigned character, so
    that the `regex` module splits it where tiktoken would."""
    found = _unassigned_finder().encode_ordinary("".join(set(text)))  # the UTF-8 bytes of each one
    return text.translate(dict.fromkeys(map(ord, bytes(found).decode("utf-8")), "\U0010ffff")) if found else text


def _has_long_whitespace(text: str) -> bool:
    # re's \s is a superset of the Unicode White_Space tiktoken's regex knows, so no long run is missed.
    return len(text) >= MAX_FAST_RUN and any(m.end() - m.start() >= MAX_FAST_RUN for m in re.finditer(r"\s+", text))


def _ranks(vocab: dict[str, int], merges: Sequence[tuple[str, str]]) -> tuple[dict[bytes, int], list[int]]:
    """tiktoken's ranks (single bytes 0..255, then 256 + merge position) and each rank's token id."""
    ranks: dict[bytes, int] = {}
    rank_ids = [-1] * (256 + len(merges))
    for b, char in enumerate(BYTE_CHARS):
        if char in vocab:
            ranks[bytes([b])] = b
            rank_ids[b] = vocab[char]
    for i, (left, right) in enumerate(merges):
        merged = left + right
        for part in (left, right, merged):
            if part not in vocab:
                raise ValueError(f"merge {i} ({left!r} {right!r}) needs {part!r}, which is not in the vocabulary")
        if any(c not in CHAR_BYTES for c in merged):
            raise ValueError(f"merge {i} ({left!r} {right!r}) is not byte-level (GPT-2's byte characters)")
        data = bytes(CHAR_BYTES[c] for c in merged)
        if data not in ranks:
            ranks[data] = 256 + i
            rank_ids[256 + i] = vocab[merged]
    return ranks, rank_ids
