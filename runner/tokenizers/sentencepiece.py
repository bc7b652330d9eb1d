"""SentencePiece models (`tokenizer.kind: sentencepiece`): LLaMA-1/2, TinyLlama, the tiny recipes."""
from __future__ import annotations

from collections.abc import Iterable

# An absolute import: this file's own name does not shadow the library.
import sentencepiece as spm

from runner.config.errors import ConfigError, problem
from runner.config.schema import TokenizerSection
from runner.tokenizers.base import finder, split_at

META_SPACE = "\u2581"  # "▁": how SentencePiece writes a space inside a piece


class SentencePieceTokenizer:
    """A SentencePiece model; see runner.tokenizers.base.Tokenizer."""

    def __init__(self, processor: spm.SentencePieceProcessor, bos_id: int | None, eos_ids: frozenset[int]):
        self.processor = processor
        self.bos_id = bos_id
        self.eos_ids = eos_ids
        self.vocab_size = processor.vocab_size()
        self.chat_template = None  # a .model file ships none
        self.bos_token = processor.id_to_piece(bos_id) if bos_id is not None else None
        self.eos_token = processor.id_to_piece(min(eos_ids)) if eos_ids else None
        self._controls = finder(processor.id_to_piece(i) for i in range(self.vocab_size)
                                if processor.is_control(i) or processor.is_unknown(i))

    def encode(self, text: str, bos: bool = True, allow_special: bool = False) -> list[int]:
        # SentencePiece never matches control pieces such as "<s>" in text, so they stay plain text
        # unless allowed: then they are cut out first, and each stretch between is encoded alone.
        ids = [self.bos_id] if bos and self.bos_id is not None else []
        for piece, control in split_at(text, self._controls if allow_special else None):
            ids += [self.processor.piece_to_id(piece)] if control else self.processor.encode(piece)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """SentencePiece's own decode: control tokens vanish, the leading dummy-prefix space is dropped."""
        return self.processor.decode([i for i in ids if 0 <= i < self.vocab_size])  # ids past it: padding

    def token_bytes(self, id: int) -> bytes:
        sp = self.processor
        if sp.is_control(id) or sp.is_unknown(id) or sp.is_unused(id):
            return b""
        piece = sp.id_to_piece(id)
        if sp.is_byte(id):  # byte-fallback piece, written "<0xE2>"
            return bytes([int(piece[3:5], 16)])
        return piece.replace(META_SPACE, " ").encode("utf-8")


def load(section: TokenizerSection, source: str) -> SentencePieceTokenizer:
    """The model at section.path, with section.bos / section.eos overriding its own pieces."""
    try:
        sp = spm.SentencePieceProcessor(model_file=section.path)
    except (RuntimeError, OSError):
        # The library's message ("INTERNAL: could not parse ModelProto") does not say what to fix.
        raise ConfigError([problem(source, "tokenizer.path",
                                   "cannot be read as a SentencePiece model (a .model protobuf); "
                                   "check the file and tokenizer.kind", section.path)]) from None
    problems = []
    bos_id = sp.bos_id() if sp.bos_id() >= 0 else None
    eos_ids = frozenset([sp.eos_id()]) if sp.eos_id() >= 0 else frozenset()
    for key, text in (("bos", section.bos), ("eos", section.eos)):
        if text is None:
            continue
        found = sp.piece_to_id(text)
        # piece_to_id answers unk_id for a piece it does not know.
        if sp.id_to_piece(found) != text:
            problems.append(problem(source, f"tokenizer.{key}", f"is not a piece of {section.path}", text))
        elif key == "bos":
            bos_id = found
        else:
            eos_ids = frozenset([found])
    if problems:
        raise ConfigError(problems)
    return SentencePieceTokenizer(sp, bos_id, eos_ids)
