"""Real tokenizers trained once per session on the English corpus of tests.helpers.tokenizers."""
from __future__ import annotations

import pytest

from runner.config.schema import TokenizerKind, TokenizerSection
from runner.tokenizers import build
from tests.helpers.tokenizers import english_corpus, train_sentencepiece, write_tiktoken_ranks

N_MERGES = 300
CODE = "def main(argv):\n    for i, arg in enumerate(argv):\n        if arg == '--help':\n            return 0\n"


@pytest.fixture(scope="session")
def sp_path(tmp_path_factory):
    return train_sentencepiece(english_corpus(), tmp_path_factory.mktemp("sp") / "english", vocab_size=512)


@pytest.fixture(scope="session")
def sp(sp_path):
    return build(TokenizerSection(kind=TokenizerKind.sentencepiece, path=str(sp_path)))


@pytest.fixture(scope="session")
def ranks_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiktoken") / "english.tiktoken"
    return write_tiktoken_ranks(path, [english_corpus(), CODE], n_merges=N_MERGES)


@pytest.fixture(scope="session")
def tt(ranks_path):
    """Llama-3's layout: 256 + N_MERGES ranks, then Llama-3's 256 special tokens."""
    return build(TokenizerSection(kind=TokenizerKind.tiktoken, path=str(ranks_path)))
