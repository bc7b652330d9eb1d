"""Real tokenizers trained once per session on the English corpus of tests.helpers.tokenizers,
and the real SmolLM2 GGUF."""
from __future__ import annotations

import random

import pytest
import sentencepiece as spm
from gguf import GGUFReader, GGUFWriter, TokenType
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders as hf_decoders
from tokenizers import models as hf_models
from tokenizers import pre_tokenizers as hf_pre_tokenizers
from tokenizers import trainers as hf_trainers

from runner.config.schema import TokenizerKind, TokenizerSection
from runner.tokenizers import build
from tests.helpers.tokenizers import (
    english_corpus,
    train_sentencepiece,
    write_tiktoken_ranks,
)

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


# --- byte-level BPE (kinds gguf and hf) -----------------------------------------------------

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 of every trained BPE, as in SmolLM2
MORE_TEXT = ("Numbers 3.14159, 1,000,000 and 2024-06-30; naïve café, Ωμέγα, привет мир, 日本語 😀👍🏽\n"
             "if (a < b || c > d) { x |= 1; } // <tag> snake_case --flag\n")


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    """Our gguf tokenizer of SmolLM2."""
    return build(TokenizerSection(kind=TokenizerKind.gguf, path=str(smollm2_gguf)))


@pytest.fixture(scope="session")
def smollm2_fields(smollm2_gguf) -> dict:
    """SmolLM2's tokens, token types and merges, as the GGUF stores them."""
    fields = GGUFReader(smollm2_gguf).fields
    return {key: fields[f"tokenizer.ggml.{key}"].contents() for key in ("tokens", "token_type", "merges")}


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_fields):
    """`tokenizers` built from SmolLM2's vocabulary, with the pre-tokenizer `smollm` names:
    (without special tokens, with its CONTROL tokens as special tokens)."""
    tokens, merges = smollm2_fields["tokens"], smollm2_fields["merges"]
    controls = [t for t, k in zip(tokens, smollm2_fields["token_type"]) if k == TokenType.CONTROL]
    return (bpe_reference(tokens, merges, digits_byte_level()),
            bpe_reference(tokens, merges, digits_byte_level(), controls))


def bpe_reference(tokens: list[str], merges: list[str], pre_tokenizer, specials=()) -> HFTokenizer:
    """`tokenizers`' BPE of a vocabulary ("a b" merges), with no unk token: unknown bytes are dropped."""
    model = hf_models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ")) for m in merges])
    reference = HFTokenizer(model)
    reference.pre_tokenizer = pre_tokenizer
    reference.decoder = hf_decoders.ByteLevel()
    reference.add_special_tokens(list(specials))
    return reference


def write_gguf(path, tokens: list[str], types: list[int], merges: list[str], pre: str | None = "smollm",
               model: str = "gpt2", **ids) -> str:
    """A GGUF holding only tokenizer metadata; `ids`: bos/eos/eot_token_id, add_bos_token, chat_template."""
    writer = GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, value in ids.items():
        getattr(writer, f"add_{key}")(value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def train_byte_level(pre_tokenizer, vocab_size: int = 800, all_bytes: bool = True, unk: str | None = None,
                     normalizer=None) -> HFTokenizer:
    """A byte-level BPE trained by `tokenizers` on the English corpus, code and some numbers and
    non-Latin text; SPECIALS first. Without all_bytes only the bytes the corpus holds get a token."""
    tokenizer = HFTokenizer(hf_models.BPE(unk_token=unk, fuse_unk=unk is not None))
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.normalizer = normalizer
    tokenizer.decoder = hf_decoders.ByteLevel()
    trainer = hf_trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS + ([unk] if unk else []), show_progress=False,
        initial_alphabet=hf_pre_tokenizers.ByteLevel.alphabet() if all_bytes else [])
    tokenizer.train_from_iterator((english_corpus() + CODE + MORE_TEXT * 20).splitlines(), trainer=trainer)
    return tokenizer


def byte_level() -> hf_pre_tokenizers.PreTokenizer:
    return hf_pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def digits_byte_level() -> hf_pre_tokenizers.PreTokenizer:
    """SmolLM2's pre-tokenizer: each digit alone, then GPT-2's."""
    return hf_pre_tokenizers.Sequence([hf_pre_tokenizers.Digits(individual_digits=True), byte_level()])


class Quiet(dict):
    """A fixture's dict of tokenizers that hypothesis prints in one word when a test fails."""

    def __repr__(self) -> str:
        return f"<{len(self)} tokenizers>"


# --- SentencePiece-style vocabularies (kind gguf with tokenizer.ggml.model "llama", and kind hf) ----

SPM_CONTROL = ["<start_of_turn>", "<end_of_turn>", "<|user|>", "<|assistant|>", "<|end|>"]  # Gemma's, Phi-3's
SPM_USER_DEFINED = ["\n\n", "\t", "  ", "   ", "<b>", "</b>"]  # Gemma's kinds: newlines, spaces, HTML


@pytest.fixture(scope="session")
def spm_vocabulary(tmp_path_factory) -> tuple[list[str], list[float], list[int]]:
    """(tokens, scores, token types) of a SentencePiece BPE trained on English, with Gemma- and
    Phi-3-like control and user-defined tokens after it. Its ordinary pieces are shuffled, so
    that a piece's place in the file and its score give different merge orders; as in Gemma's
    GGUF, runs of spaces are user-defined tokens ("  "), not pieces ("▁▁")."""
    model = train_sentencepiece(english_corpus() + CODE, tmp_path_factory.mktemp("spm") / "english", vocab_size=900)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    pieces = [(sp.id_to_piece(i), sp.get_score(i), TokenType.UNKNOWN if sp.is_unknown(i) else TokenType.CONTROL
               if sp.is_control(i) else TokenType.BYTE if sp.is_byte(i) else TokenType.NORMAL)
              for i in range(sp.vocab_size())]
    first_normal = next(i for i, p in enumerate(pieces) if p[2] == TokenType.NORMAL)
    normal = [p for p in pieces[first_normal:] if p[0].strip("▁") or len(p[0]) == 1]
    random.Random(0).shuffle(normal)
    pieces = pieces[:first_normal] + normal
    pieces += [(t, 0.0, TokenType.CONTROL) for t in SPM_CONTROL]
    pieces += [(t, 0.0, TokenType.USER_DEFINED) for t in SPM_USER_DEFINED]
    tokens, scores, types = map(list, zip(*pieces))
    return tokens, scores, types


def write_spm_gguf(path, arch: str, vocabulary: tuple[list[str], list[float], list[int]], **keys) -> str:
    """A GGUF holding only a "llama" (SentencePiece) vocabulary; `keys`: add_<key> of GGUFWriter."""
    tokens, scores, types = vocabulary
    writer = GGUFWriter(str(path), arch)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    for key, value in keys.items():
        getattr(writer, f"add_{key}")(value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


# general.architecture -> what llama.cpp's converter writes for it beside a SentencePiece vocabulary.
SPM_ARCHS = {"gemma3": {"add_space_prefix": False}, "llama": {}, "phi3": {}}
SPM_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}"
                "<end_of_turn>\n{% endfor %}{{ '<start_of_turn>model\n' }}")


@pytest.fixture(scope="session")
def spm_ggufs(spm_vocabulary, tmp_path_factory) -> Quiet:
    """arch -> (a GGUF of spm_vocabulary written for it, transformers' tokenizer built from that GGUF)."""
    from transformers import AutoTokenizer

    out = Quiet()
    for arch, keys in SPM_ARCHS.items():
        folder = tmp_path_factory.mktemp(arch)
        path = write_spm_gguf(folder / "t.gguf", arch, spm_vocabulary, bos_token_id=1, eos_token_id=2,
                              unk_token_id=0, add_bos_token=True, chat_template=SPM_TEMPLATE, **keys)
        out[arch] = (path, AutoTokenizer.from_pretrained(str(folder), gguf_file="t.gguf"))
    return out
