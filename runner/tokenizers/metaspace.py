"""SentencePiece-style BPE: spaces written "▁", merge-list BPE, and byte fallback; what `gguf`
(tokenizer.ggml.model "llama": Llama 2, Gemma, Phi-3) and `hf` (their tokenizer.json) share.

It runs as Hugging Face `tokenizers` runs these vocabularies, whether transformers built them
from a GGUF or read a tokenizer.json. Text is cut around the added tokens first; each stretch
between them gets its spaces written "▁", a leading "▁" where `Prefix` says, and is merged as
one word: the adjacent pair with the best merge rank is joined first, the leftmost of equal
ranks, until no adjacent pair has a merge. A character without a token of its own becomes the
tokens of its UTF-8 bytes ("<0xE2>" ...), or the unk token when one of those is missing.

transformers is the reference. llama.cpp differs on a GGUF's runs of spaces: it finds Gemma's
user-defined tokens of spaces ("  ") in the raw text, longest first, where transformers looks
them up as "▁▁" and merges them by rank; so it does on a "▁" written in the text.
"""
from __future__ import annotations

import functools
import heapq
import re
from collections.abc import Callable, Iterable, Sequence
from enum import Enum

from runner.tokenizers.base import Added, AddedTokens, GenerationIds

SPACE = "\u2581"  # "▁": how SentencePiece writes a space
_SPACE_AFTER_OTHER = re.compile(f"(?<=[^{SPACE}]){SPACE}")
BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # what `tokenizers`' ByteFallback decoder turns into a byte

# (left, right) -> the pair's merge rank (lower merges first), or None when the pair has no merge.
Ranks = Callable[[str, str], object]


class Prefix(Enum):
    """Where a "▁" is put before a stretch of text (the text between two added tokens)."""

    never = "never"  # Gemma
    first = "first"  # the stretch at the start of the text, unless it starts with a space (Metaspace "first")
    always = "always"  # every stretch that does not start with a space (Metaspace "always")
    every = "every"  # every stretch (a Prepend("▁") normalizer: Llama 2's tokenizer.json, Phi-3's GGUF)


def listed_ranks(vocab: dict[str, int], merges: Sequence[tuple[str, str]]) -> Ranks:
    """A tokenizer.json's merge list: a pair's rank is its position (the last, if listed twice).

    Raises ValueError when a merge needs a token the vocabulary lacks, as `tokenizers` does.
    """
    for i, (left, right) in enumerate(merges):
        for part in (left, right, left + right):
            if part not in vocab:
                raise ValueError(f"merge {i} ({left!r} {right!r}) needs {part!r}, which is not in the vocabulary")
    ranks = {pair: i for i, pair in enumerate(merges)}
    return lambda left, right: ranks.get((left, right))


def scored_ranks(tokens: Sequence[str], scores: Sequence[float]) -> Ranks:
    """The merges transformers derives for a vocabulary without a merge list (generate_merges):
    every split of a token into two tokens, ranked by the token's score (higher first), then by
    the longer left part, then by which token comes first. A token listed twice keeps its last
    score and its first place."""
    if len(set(tokens)) == len(tokens):
        key = {token: (-value, i) for i, (token, value) in enumerate(zip(tokens, scores))}
    else:
        first = {token: i for i, token in reversed(list(enumerate(tokens)))}
        key = {token: (-value, first[token]) for token, value in zip(tokens, scores)}

    def rank(left: str, right: str):
        found = key.get(left + right)
        return None if found is None else (found[0], -len(left), -len(right), found[1])

    return rank


class MetaspaceBPE(GenerationIds):
    """A SentencePiece-style BPE vocabulary as a Tokenizer (see runner.tokenizers.base.Tokenizer).

    `vocab`: token text -> id, "▁" for spaces; `ranks`: listed_ranks or scored_ranks; without
    `byte_fallback` a character without a token is the unk token, or dropped when there is none;
    `strip`: leading spaces decode() removes (a Strip decoder, for a model that adds a prefix).
    bos/eos, add_bos and the chat template are set by the loader (see `configure`).
    """

    def __init__(self, vocab: dict[str, int], ranks: Ranks, added: Sequence[Added] = (), prefix: Prefix = Prefix.never,
                 byte_fallback: bool = True, unk_id: int | None = None, fuse_unk: bool = True, strip: int = 0,
                 vocab_size: int = 0):
        self._vocab, self._rank, self._prefix, self._strip = vocab, ranks, prefix, strip
        self._tokens = {id: text for text, id in vocab.items()}
        self._added = AddedTokens(added)
        self._byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
        self._byte_fallback = byte_fallback
        self._has_all_bytes = byte_fallback and all(t in vocab for t in self._byte_tokens)
        self._unk = self._tokens.get(unk_id) if unk_id is not None else None
        self._fuse_unk = fuse_unk

        self.vocab_size = max([vocab_size - 1, *vocab.values(), *(a.id for a in added)]) + 1
        self._text: list[str | None] = [None] * self.vocab_size  # what each id prints; None: nothing
        self._byte: dict[int, int] = {}  # byte-fallback id -> its byte
        for text, id in vocab.items():
            self._text[id] = text.replace(SPACE, " ")
            if text.startswith("<0x") and BYTE_TOKEN.fullmatch(text):
                self._byte[id] = int(text[3:5], 16)
        for a in added:
            self._text[a.id] = None if a.special else a.text.replace(SPACE, " ")
            self._byte.pop(a.id, None)

        # Characters that some token holds right before a "▁": elsewhere no token spans the
        # start of a run of spaces, so BPE can run on the words between them one at a time,
        # and repeated words come from a cache. A character without a token becomes byte or unk
        # tokens, whose text ends with ">" or the unk's last character.
        joiners = {t[k - 1] for t in vocab if SPACE in t[1:] for k in range(1, len(t)) if t[k] == SPACE != t[k - 1]}
        self._joiners = joiners
        self._unknown_joins = ">" in joiners or (self._unk is not None and self._unk[-1:] in joiners)
        self._splits = SPACE in vocab
        self._word_ids = functools.lru_cache(maxsize=1 << 16)(self._word_ids_uncached)

    def token_id(self, text: str) -> int | None:
        """The id of the token written `text` (an added token's text, or a token with "▁" for spaces)."""
        if text in self._added.by_text:
            return self._added.by_text[text].id
        return self._vocab.get(text)

    def token_text(self, id: int) -> str:
        """How token `id` is written in a prompt or template ("<end_of_turn>" for a special token)."""
        if id in self._added.by_id:
            return self._added.by_id[id].text
        return self._tokens[id]

    def encode(self, text: str, bos: bool = True, allow_special: bool = False) -> list[int]:
        ids = [self.bos_id] if bos and self.add_bos else []
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: U+FFFD, as the byte-level tokenizers do
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        for start, piece, added in self._added.split(text, allow_special):
            ids += [added.id] if added else self._encode_stretch(piece, start == 0)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`, as `tokenizers`' ByteFallback, Fuse and Strip decoders make it:
        special tokens add nothing, and a run of byte tokens that is not UTF-8 is one U+FFFD each."""
        out, run = [], bytearray()
        count = 0
        for id in ids:
            if id in self._byte:
                run.append(self._byte[id])
                count += 1
                continue
            text = self._text[id] if 0 <= id < self.vocab_size else None
            if text is None:
                continue
            if run:
                out.append(_bytes_text(run, count))
                run, count = bytearray(), 0
            out.append(text)
        if run:
            out.append(_bytes_text(run, count))
        text = "".join(out)
        cut = 0
        while cut < self._strip and text[cut : cut + 1] == " ":
            cut += 1
        return text[cut:]

    def token_bytes(self, id: int) -> bytes:
        if id in self._byte:
            return bytes([self._byte[id]])
        text = self._text[id]
        return b"" if text is None else text.encode("utf-8")

    def _encode_stretch(self, text: str, at_start: bool) -> list[int]:
        """The ids of the text between two added tokens."""
        text = text.replace(" ", SPACE)
        prefix = self._prefix
        if prefix is Prefix.every or (not text.startswith(SPACE) and (
                prefix is Prefix.always or (prefix is Prefix.first and at_start))):
            text = SPACE + text
        ids = []
        for word in self._words(text):
            ids += self._word_ids(word)
        return ids

    def _words(self, text: str) -> list[str]:
        """`text` cut before each run of "▁" that no token can join to the character before it."""
        if not self._splits:
            return [text]
        words, start = [], 0
        for m in _SPACE_AFTER_OTHER.finditer(text):
            before = text[m.start() - 1]
            if before in self._joiners or (self._unknown_joins and before not in self._vocab):
                continue
            words.append(text[start : m.start()])
            start = m.start()
        words.append(text[start:])
        return words

    def _word_ids_uncached(self, word: str) -> tuple[int, ...]:
        vocab = self._vocab
        return tuple(vocab[s] for s in self._merge(word))

    def _symbols(self, word: str) -> list[str]:
        """The tokens BPE starts from: one per character, or its bytes' tokens, or the unk token.

        As `tokenizers` does it: unknown characters wait as one pending unk (fused) until a
        known character or the end, so bytes of a later character may come out before it.
        """
        symbols, pending = [], 0
        for char in word:
            if char in self._vocab:
                symbols += [self._unk] * pending
                pending = 0
                symbols.append(char)
                continue
            data = char.encode("utf-8")
            if self._has_all_bytes or (self._byte_fallback and all(self._byte_tokens[b] in self._vocab for b in data)):
                symbols += [self._byte_tokens[b] for b in data]
            elif self._unk is not None:
                if pending and not self._fuse_unk:
                    symbols.append(self._unk)
                pending = 1
        return symbols + [self._unk] * pending

    def _merge(self, word: str) -> tuple[str, ...]:
        """The tokens of one word: merge-list BPE from its symbols (tokenizers' Word::merge_all)."""
        symbols = self._symbols(word)
        rank = self._rank
        n = len(symbols)
        following = [*range(1, n), -1]
        preceding = list(range(-1, n - 1))
        queue = []  # (rank, position, the merged token): lowest rank first, then leftmost
        for i in range(n - 1):
            found = rank(symbols[i], symbols[i + 1])
            if found is not None:
                queue.append((found, i, symbols[i] + symbols[i + 1]))
        heapq.heapify(queue)
        while queue:
            _, i, merged = heapq.heappop(queue)
            j = following[i] if symbols[i] is not None else -1
            # An entry is stale once a symbol it joins has changed; like `tokenizers`, a pair that
            # still makes the same token by a merge of its own is merged anyway.
            if j < 0 or symbols[i] + symbols[j] != merged or rank(symbols[i], symbols[j]) is None:
                continue
            symbols[i], symbols[j] = merged, None
            following[i] = following[j]
            if following[i] >= 0:
                preceding[following[i]] = i
            for left, right in ((preceding[i], i), (i, following[i])):
                if left >= 0 and right >= 0:
                    found = rank(symbols[left], symbols[right])
                    if found is not None:
                        heapq.heappush(queue, (found, left, symbols[left] + symbols[right]))
        return tuple(s for s in symbols if s is not None)


def _bytes_text(data: bytearray, count: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * count
