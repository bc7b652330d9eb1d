"""Tokenizers, one per `tokenizer.kind`: the registry and `build`."""
from __future__ import annotations

import os
from collections.abc import Callable

from runner.config.errors import ConfigError, problem
from runner.config.schema import TokenizerKind, TokenizerSection
from runner.tokenizers import gguf, hf, sentencepiece, tiktoken
from runner.tokenizers.base import Tokenizer

# kind -> load(section, source): reads section.path, raises ConfigError naming the bad key.
TOKENIZERS: dict[TokenizerKind, Callable[[TokenizerSection, str], Tokenizer]] = {
    TokenizerKind.sentencepiece: sentencepiece.load,
    TokenizerKind.tiktoken: tiktoken.load,
    TokenizerKind.gguf: gguf.load,
    TokenizerKind.hf: hf.load,
}

__all__ = ["TOKENIZERS", "Tokenizer", "build"]


def build(section: TokenizerSection, source: str = "recipe") -> Tokenizer:
    """The tokenizer the recipe's tokenizer section describes; `source` names the recipe in errors.

    section.path must be set: a recipe that leaves it null gets the file from the model's source,
    which the caller fills in first.
    """
    if section.path is None:
        raise ConfigError([problem(source, "tokenizer.path", f"is not set, and the model's source provides no "
                                   f"{section.kind.value} tokenizer file; set it")])
    if not os.path.exists(section.path):
        raise ConfigError([problem(source, "tokenizer.path",
                                   f"no such file (expected a {section.kind.value} tokenizer file)", section.path)])
    return TOKENIZERS[section.kind](section, source)
