"""The registry and build: every kind is registered; unreadable files are ConfigErrors, not tracebacks."""
from __future__ import annotations

import base64

import pytest

from runner.config.errors import ConfigError
from runner.config.schema import TokenizerKind, TokenizerSection
from runner.tokenizers import TOKENIZERS, build

EXPECTED = {TokenizerKind.sentencepiece: "SentencePiece model", TokenizerKind.tiktoken: "tiktoken BPE rank file",
            TokenizerKind.gguf: "GGUF file", TokenizerKind.hf: "tokenizer.json file"}


def test_every_kind_is_registered():
    assert set(TOKENIZERS) == set(TokenizerKind)


def only_problem(kind: TokenizerKind, path) -> str:
    """The message of the one problem building `kind` from `path` must raise."""
    with pytest.raises(ConfigError) as e:
        build(TokenizerSection(kind=kind, path=str(path)), source="recipes/r.yaml")
    (p,) = e.value.problems
    assert (p.source, p.key, p.value) == ("recipes/r.yaml", "tokenizer.path", str(path))
    assert "Traceback" not in str(e.value) and len(str(e.value).splitlines()) == 1
    return p.message


@pytest.mark.parametrize("kind", list(TokenizerKind))
def test_missing_file(kind, tmp_path):
    message = only_problem(kind, tmp_path / "absent.model")
    assert message == f"no such file (expected a {kind.value} tokenizer file)"


@pytest.mark.parametrize("kind", list(TokenizerKind))
@pytest.mark.parametrize("content", [b"", b"hello world\n", bytes(range(256)) * 4], ids=["empty", "text", "binary"])
def test_garbage_file(kind, content, tmp_path):
    path = tmp_path / "garbage"
    path.write_bytes(content)
    message = only_problem(kind, path)
    assert message.startswith(f"cannot be read as a {EXPECTED[kind]}")
    assert message.endswith("check the file and tokenizer.kind")


def test_each_kind_rejects_the_others_file(sp_path, ranks_path):
    assert "SentencePiece" in only_problem(TokenizerKind.sentencepiece, ranks_path)
    assert "is not 'base64-token rank'" in only_problem(TokenizerKind.tiktoken, sp_path)


def write_ranks(path, ranked: list[tuple[bytes, int]]):
    path.write_bytes(b"".join(base64.b64encode(token) + b" %d\n" % rank for token, rank in ranked))
    return path


def test_rank_files_must_rank_every_single_byte(tmp_path):
    ranked = [(b"ab", 0)] + [(bytes([b]), b) for b in range(1, 256)]
    message = only_problem(TokenizerKind.tiktoken, write_ranks(tmp_path / "r", ranked))
    assert "(1 of the 256 single bytes have no rank (e.g. b'\\x00'))" in message


@pytest.mark.parametrize("ranks", [[2 * b for b in range(256)], [0] + list(range(255))], ids=["gaps", "repeats"])
def test_rank_files_must_number_ranks_0_to_n(tmp_path, ranks):
    ranked = [(bytes([b]), rank) for b, rank in enumerate(ranks)]
    message = only_problem(TokenizerKind.tiktoken, write_ranks(tmp_path / "r", ranked))
    assert "(the ranks are not 0..N-1, each once)" in message
