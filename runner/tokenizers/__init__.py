"""Tokenizers, one per `tokenizer.kind`: the registry and `build`."""
from __future__ import annotations

import os
from typing import Callable

from runner.config.errors import ConfigError, problem
from runner.config.schema import TokenizerKind, TokenizerSection
from runner.tokenizers import sentencepiece, tiktoken
from runner.tokenizers.base import TextStream, Tokenizer

# kind -> load(section, source): reads section.path, raises ConfigError naming the bad key.
TOKENIZERS: dict[TokenizerKind, Callable[[TokenizerSection, str], Tokenizer]] = {
    TokenizerKind.sentencepiece: sentencepiece.load,
    TokenizerKind.tiktoken: tiktoken.load,
}

__all__ = ["TOKENIZERS", "TextStream", "Tokenizer", "build"]


def build(section: TokenizerSection, source: str = "recipe") -> Tokenizer:
    """The tokenizer the recipe's tokenizer section describes; `source` names the recipe in errors."""
    if not os.path.isfile(section.path):
        raise ConfigError([problem(source, "tokenizer.path",
                                   f"no such file (expected a {section.kind.value} tokenizer file)", section.path)])
    return TOKENIZERS[section.kind](section, source)
