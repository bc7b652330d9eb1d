"""The key-value metadata at the head of a GGUF file, read without its tensor table or tensors.

gguf's GGUFReader builds a numpy view per array element, which for a 262,144-token vocabulary
(Gemma 3) takes longer than the rest of loading; this reads the same values with struct.
"""
from __future__ import annotations

import mmap
import struct

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # v1 counted in 32 bits; llama.cpp writes v3
# GGUF value type -> struct format of one value (8 is a string, 9 an array)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9


def read_metadata(path: str) -> dict[str, object]:
    """Every metadata key of the GGUF at `path` with its value: a number, bool, str, or a list of
    them. Raises ValueError saying what is wrong when the file is not a GGUF file."""
    with open(path, "rb") as f:
        try:
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file cannot be mapped
            raise ValueError("the file is empty") from None
    with data:
        try:
            return _Cursor(data).metadata()
        except (struct.error, IndexError):
            raise ValueError("the file ends inside its metadata") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"a metadata string is not UTF-8 ({e})") from None


class _Cursor:
    """Reads values one after another from `data`, in the file's byte order."""

    def __init__(self, data):
        self.data, self.pos, self.order = data, 0, "<"

    def metadata(self) -> dict[str, object]:
        if self.data[:4] != MAGIC:
            raise ValueError("it does not start with the GGUF magic bytes")
        self.pos = 4
        version = self.scalar("I")
        if version & 0xFFFF == 0:  # a big-endian file's small version, read little-endian
            self.pos, self.order = 4, ">"
            version = self.scalar("I")
        if version not in VERSIONS:
            raise ValueError(f"it is GGUF version {version}; supported: {', '.join(map(str, VERSIONS))}")
        self.scalar("Q")  # the number of tensors
        return {self.string(): self.value(self.scalar("I")) for _ in range(self.scalar("Q"))}

    def scalar(self, fmt: str):
        (value,) = struct.unpack_from(self.order + fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.scalar("Q")
        end = self.pos + length
        if end > len(self.data):
            raise IndexError
        text = self.data[self.pos : end].decode("utf-8")
        self.pos = end
        return text

    def strings(self, count: int) -> list[str]:
        data, pos, length = self.data, self.pos, struct.Struct(self.order + "Q")
        out = []
        for _ in range(count):
            (n,) = length.unpack_from(data, pos)
            pos += 8
            out.append(data[pos : pos + n].decode("utf-8"))
            pos += n
        if pos > len(data):
            raise IndexError
        self.pos = pos
        return out

    def value(self, kind: int):
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind])
        if kind == STRING:
            return self.string()
        if kind == ARRAY:
            element, count = self.scalar("I"), self.scalar("Q")
            if element in _SCALARS:
                fmt = f"{self.order}{count}{_SCALARS[element]}"
                values = list(struct.unpack_from(fmt, self.data, self.pos))
                self.pos += struct.calcsize(fmt)
                return values
            if element == STRING:  # a vocabulary: the one long array, read without a call per string
                return self.strings(count)
            return [self.value(element) for _ in range(count)]
        raise ValueError(f"a metadata value has type {kind}, which GGUF does not define")
