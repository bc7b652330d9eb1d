"""tiktoken BPE rank files (`tokenizer.kind: tiktoken`): Llama-3 and later.

Built the way Meta's llama3 tokenizer.py builds it: the ranks, then the special tokens
numbered after them, and Llama-3's split pattern unless the recipe gives another.
"""
from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Iterator

# An absolute import: this file's own name does not shadow the library.
import tiktoken

from runner.config.errors import ConfigError, problem
from runner.config.schema import TokenizerSection
from runner.tokenizers.base import finder, split_at

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>",
    "<|reserved_special_token_3|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|reserved_special_token_4|>",
    "<|eot_id|>",  # end of turn
    *(f"<|reserved_special_token_{i}|>" for i in range(5, 256 - 5)),
)
LLAMA3_BOS = "<|begin_of_text|>"
LLAMA3_STOPS = ("<|end_of_text|>", "<|eot_id|>")  # a chat turn ends with eot, a document with end_of_text

# tiktoken's regex overflows the stack on huge inputs and on long runs of (non-)whitespace;
# Meta's reference cuts the text at these lengths, and so do we, to get the same ids.
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000


class TiktokenTokenizer:
    """A tiktoken Encoding; see runner.tokenizers.base.Tokenizer."""

    def __init__(self, encoding: tiktoken.Encoding, bos_id: int | None, eos_ids: frozenset[int]):
        self.encoding = encoding
        self.bos_id = bos_id
        self.eos_ids = eos_ids
        self.vocab_size = encoding.n_vocab
        self._special_ids = frozenset(encoding.encode_single_token(t) for t in encoding.special_tokens_set)
        self.chat_template = None  # a rank file ships none
        self.bos_token = self._text(bos_id) if bos_id is not None else None
        self.eos_token = self._text(min(eos_ids)) if eos_ids else None
        self._specials = finder(encoding.special_tokens_set)

    def encode(self, text: str, bos: bool = True, allow_special: bool = False) -> list[int]:
        ids = [self.bos_id] if bos and self.bos_id is not None else []
        # Special-token text in a prompt is plain text, never a control token, unless allowed.
        for piece, special in split_at(text, self._specials if allow_special else None):
            ids += [self.encoding.encode_single_token(piece)] if special else self._encode_ordinary(piece)
        return ids

    def _encode_ordinary(self, text: str) -> list[int]:
        ids = []
        for i in range(0, len(text), MAX_ENCODE_CHARS):
            for piece in _short_runs(text[i : i + MAX_ENCODE_CHARS], MAX_RUN_CHARS):
                ids += self.encoding.encode_ordinary(piece)
        return ids

    def _text(self, id: int) -> str:
        return self.encoding.decode_single_token_bytes(id).decode("utf-8", errors="replace")

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`; special tokens add nothing, as in a runner.text.TextStream."""
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self, id: int) -> bytes:
        return b"" if id in self._special_ids else self.encoding.decode_single_token_bytes(id)


def _short_runs(text: str, limit: int) -> Iterator[str]:
    """`text` cut so that no piece holds more than `limit` consecutive (non-)whitespace chars."""
    start, run, in_space = 0, 0, text[:1].isspace()
    for i, char in enumerate(text):
        if char.isspace() != in_space:
            run, in_space = 1, not in_space
        else:
            run += 1
            if run > limit:
                yield text[start:i]
                start, run = i, 1
    yield text[start:]


def read_ranks(path: str) -> dict[bytes, int]:
    """A rank file (one "base64-token rank" per line), as tiktoken.load.load_tiktoken_bpe reads it.

    Not load_tiktoken_bpe itself: it caches every file by its path in $TMPDIR/data-gym-cache,
    so a file replaced or deleted at the same path would silently keep its old ranks.
    Raises ValueError saying what is wrong.
    """
    with open(path, "rb") as f:
        lines = f.read().splitlines()
    ranks = {}
    for number, line in enumerate(lines, 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise ValueError(f"line {number} is not 'base64-token rank'") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError("the ranks are not 0..N-1, each once")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        # Without every single byte some text has no encoding at all.
        raise ValueError(f"{len(missing)} of the 256 single bytes have no rank (e.g. {bytes(missing[:1])!r})")
    return ranks


def load(section: TokenizerSection, source: str) -> TiktokenTokenizer:
    """The rank file at section.path with section's pattern, special tokens and bos/eos."""
    try:
        ranks = read_ranks(section.path)
    except (ValueError, OSError) as e:
        raise ConfigError([problem(source, "tokenizer.path",
                                   f"cannot be read as a tiktoken BPE rank file ({e}); "
                                   "check the file and tokenizer.kind", section.path)]) from None
    specials = LLAMA3_SPECIAL_TOKENS if section.special_tokens is None else tuple(section.special_tokens)
    if len(set(specials)) != len(specials):
        repeated = sorted({t for t in specials if specials.count(t) > 1})
        raise ConfigError([problem(source, "tokenizer.special_tokens", "lists a token twice", repeated)])
    special_ids = {token: len(ranks) + i for i, token in enumerate(specials)}
    try:
        encoding = tiktoken.Encoding(
            name=section.path,
            pat_str=section.pattern or LLAMA3_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=special_ids,
        )
    except ValueError as e:
        raise ConfigError([problem(source, "tokenizer.pattern", f"is not a valid regex: {e}", section.pattern)]) from None

    problems = []
    bos_id = special_ids.get(LLAMA3_BOS)
    eos_ids = frozenset(special_ids[t] for t in LLAMA3_STOPS if t in special_ids)
    for key, text in (("bos", section.bos), ("eos", section.eos)):
        if text is None:
            continue
        try:
            found = encoding.encode_single_token(text)
        except KeyError:
            problems.append(problem(source, f"tokenizer.{key}", f"is not a single token of {section.path}", text))
            continue
        if key == "bos":
            bos_id = found
        else:
            eos_ids = frozenset([found])
    if problems:
        raise ConfigError(problems)
    return TiktokenTokenizer(encoding, bos_id, eos_ids)
