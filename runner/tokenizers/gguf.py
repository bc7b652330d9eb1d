"""The vocabulary inside a llama.cpp GGUF file (`tokenizer.kind: gguf`).

tokenizer.ggml.model names the algorithm: "gpt2" is a byte-level BPE (runner.tokenizers.bpe: SmolLM,
Qwen, Phi-4-mini) split by the pre-tokenizer `tokenizer.ggml.pre` names, as llama.cpp splits it;
"llama" is a SentencePiece-style BPE (runner.tokenizers.metaspace: Llama 2, Gemma, Phi-3), built
as transformers builds it from a GGUF. The tokenizer.ggml.* metadata is read as llama.cpp reads
it: tokens and their types, the merge list or the scores, bos/eos and add_bos_token, the tokens
that end a turn, and the chat template. No tensor is read.
"""
from __future__ import annotations

from dataclasses import dataclass

from gguf import TokenType

from runner.config.errors import ConfigError, problem
from runner.config.schema import TokenizerSection
from runner.tokenizers.base import Added, overrides
from runner.tokenizers.bpe import GPT2_PATTERN, ByteLevelBPE, digits_then_gpt2
from runner.tokenizers.gguf_metadata import read_metadata
from runner.tokenizers.metaspace import (
    SPACE,
    MetaspaceBPE,
    Prefix,
    listed_ranks,
    scored_ranks,
)
from runner.tokenizers.tiktoken import LLAMA3_PATTERN

# llama.cpp's default pre-tokenizer (a GGUF without tokenizer.ggml.pre gets it too), its four
# regexes in sequence made one: runs of punctuation and $+<=>^~| alone, GPT-2's pattern between
# them, then numbers cut into runs of three ASCII digits (a space before a number stands alone).
_PUNCT = r"\p{P}\$\+<=>\^~\|"
LLAMA_CPP_DEFAULT = (
    rf"[{_PUNCT}]+| ?\p{{L}}+| (?=\p{{N}})|[0-9]{{3}}|(?:(?![0-9]{{3}})\p{{N}})+"
    rf"| ?[^\s\p{{L}}\p{{N}}{_PUNCT}]+|\s+(?![^\s{_PUNCT}])|\s+"
)
# Qwen2's split (Llama-3's with each digit alone), as transformers writes it; llama.cpp spells
# (?i:'s) as '[sS], which differs on "'ſ" only.
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# GPT-4o's (tiktoken's o200k_base): Phi-4-mini, Llama 4.
GPT4O_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# tokenizer.ggml.pre -> the split pattern, for the names llama.cpp (llama-vocab.cpp) gives these
# regexes. "gpt-2" and its kin: GPT-2's pattern; "smollm" and its kin: each digit alone, then GPT-2's.
PRE_PATTERNS = {
    "default": LLAMA_CPP_DEFAULT,
    **dict.fromkeys(["gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4", "trillion", "granite-docling"], GPT2_PATTERN),
    **dict.fromkeys(["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"],
                    digits_then_gpt2(individual=True)),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "megrez"], QWEN2_PATTERN),
    **dict.fromkeys(["gpt-4o", "llama4"], GPT4O_PATTERN),
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx"], LLAMA3_PATTERN),
}
FOUND_ALWAYS = {TokenType.USER_DEFINED}  # llama.cpp finds these in any text and prints their text
FOUND_SPECIAL = {TokenType.CONTROL, TokenType.UNKNOWN}  # ... these only when parsing special tokens

# Tokens that end a chat turn, stopping generation beside the eos/eot/eom ids the metadata names:
# llama.cpp finds these by their text too (its end-of-generation set). Unlike llama.cpp,
# <|endoftext|> is not one: a model whose eos it is names it, and SmolLM2's chat goes on past it.
END_OF_TURN = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>")


@dataclass(frozen=True)
class SentencePieceStyle:
    """How transformers builds a "llama" vocabulary for one general.architecture."""

    prefix: Prefix  # where a "▁" goes before text
    by_position: bool = False  # merges ranked by where a token is in the file, not by its score
    respell_spaces: bool = False  # a token of spaces ("  ") is looked up as "▁▁"
    unk: str | None = None  # the BPE's unk token, for characters whose bytes have no token


GEMMA = SentencePieceStyle(Prefix.never, by_position=True, respell_spaces=True, unk="<unk>")
STYLES = {"gemma": GEMMA, "gemma2": GEMMA, "gemma3": GEMMA, "phi3": SentencePieceStyle(Prefix.every)}
LLAMA = SentencePieceStyle(Prefix.first)  # every other architecture


def load(section: TokenizerSection, source: str) -> ByteLevelBPE | MetaspaceBPE:
    """The vocabulary of the GGUF at section.path, with section.bos / section.eos overriding its own."""
    path = section.path

    def fail(message: str) -> ConfigError:
        return ConfigError([problem(source, "tokenizer.path", message, path)])

    for key in ("pattern", "special_tokens"):
        if getattr(section, key) is not None:
            raise ConfigError([problem(source, f"tokenizer.{key}", "applies to tokenizer.kind tiktoken only; a GGUF "
                                       "names its own pre-tokenizer and special tokens", getattr(section, key))])
    try:
        meta = read_metadata(path)
    except (ValueError, OSError) as e:
        raise fail(f"cannot be read as a GGUF file ({e}); check the file and tokenizer.kind") from None

    model = meta.get("tokenizer.ggml.model")
    if model not in BUILDERS:
        raise fail(f"holds a {model!r} vocabulary (tokenizer.ggml.model); supported: {', '.join(BUILDERS)}"
                   if model is not None else "holds no vocabulary (no tokenizer.ggml.model)")
    tokens = meta.get("tokenizer.ggml.tokens", [])
    types = meta.get("tokenizer.ggml.token_type", [TokenType.NORMAL] * len(tokens))
    if not (isinstance(tokens, list) and isinstance(types, list) and all(isinstance(t, str) for t in tokens)):
        raise fail("has tokenizer.ggml.tokens or tokenizer.ggml.token_type that is not a list of strings or numbers")
    if len(types) != len(tokens) or not tokens:
        raise fail(f"has {len(tokens)} tokens and {len(types)} token types; they must be as many, and not 0")
    tokenizer = BUILDERS[model](meta, tokens, types, fail)

    stops = [meta.get(f"tokenizer.ggml.{key}_token_id") for key in ("eos", "eot", "eom")]
    stops += [tokenizer.token_id(text) for text in END_OF_TURN]
    eos_ids = list(dict.fromkeys(i for i in stops if i is not None))
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if any(i >= tokenizer.vocab_size for i in [*eos_ids, *([bos] if bos is not None else [])]):
        raise fail(f"names a bos/eos/eot/eom token id beyond its {tokenizer.vocab_size} tokens")
    bos, eos_ids = overrides(tokenizer, section, source, bos, eos_ids)
    # Absent, llama.cpp adds no BOS with a byte-level vocabulary and adds one with a SentencePiece one.
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", model == "llama"))
    tokenizer.configure(bos, eos_ids, add_bos, meta.get("tokenizer.chat_template"))
    return tokenizer


def _byte_level(meta: dict, tokens: list[str], types: list[int], fail) -> ByteLevelBPE:
    """tokenizer.ggml.model "gpt2": a byte-level BPE and its merges, split as tokenizer.ggml.pre says."""
    pre = meta.get("tokenizer.ggml.pre", "default")  # llama.cpp's choice when the key is absent
    if pre not in PRE_PATTERNS:
        raise fail(f"names pre-tokenizer {pre!r} (tokenizer.ggml.pre), which is not supported; "
                   f"supported: {', '.join(sorted(PRE_PATTERNS))}")
    vocab, added = {}, []
    for id, (text, kind) in enumerate(zip(tokens, types)):
        if kind in FOUND_ALWAYS or kind in FOUND_SPECIAL:
            added.append(Added(id, text, special=kind not in FOUND_ALWAYS))
        elif kind != TokenType.UNUSED:
            vocab[text] = id
    try:
        pairs = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges", [])]
        if any(len(p) != 2 for p in pairs):
            raise ValueError("a merge is not two tokens separated by one space")
        return ByteLevelBPE("gguf", vocab, pairs, PRE_PATTERNS[pre], added, vocab_size=len(tokens))
    except ValueError as e:
        raise fail(f"has a BPE vocabulary that cannot be used: {e}") from None


def _sentencepiece(meta: dict, tokens: list[str], types: list[int], fail) -> MetaspaceBPE:
    """tokenizer.ggml.model "llama": SentencePiece pieces with scores, as transformers converts them
    (integrations/gguf: GemmaTokenizer for Gemma, LlamaTokenizer otherwise, a Prepend normalizer for Phi-3).

    CONTROL and UNKNOWN tokens are special added tokens, USER_DEFINED ones added tokens found in
    any text (transformers makes the unk token special as it does bos and eos).
    """
    style = STYLES.get(meta.get("general.architecture"), LLAMA)
    pieces = [SPACE * len(t) if style.respell_spaces and " " in t and not t.strip() else t for t in tokens]
    vocab = {piece: id for id, piece in enumerate(pieces)}
    merges = meta.get("tokenizer.ggml.merges")
    scores = meta.get("tokenizer.ggml.scores")
    try:
        if merges:
            pairs = [tuple(m.split(" ")) for m in merges]
            if any(len(p) != 2 for p in pairs):
                raise ValueError("a merge is not two tokens separated by one space")
            ranks = listed_ranks(vocab, pairs)
        elif style.by_position:  # Gemma's scores do not follow its merge order; its token order does
            ranks = scored_ranks(pieces, [-i for i in range(len(pieces))])
        elif scores is not None and len(scores) == len(tokens):
            ranks = scored_ranks(pieces, scores)
        else:
            raise ValueError(f"it has {len(scores or [])} scores for {len(tokens)} tokens, and no merges")
    except ValueError as e:
        raise fail(f"has a SentencePiece vocabulary that cannot be used: {e}") from None
    added = [Added(id, text, special=True) for id, (text, kind) in enumerate(zip(tokens, types))
             if kind in FOUND_SPECIAL]
    added += [Added(id, text, special=False) for id, (text, kind) in enumerate(zip(tokens, types))
              if kind == TokenType.USER_DEFINED and text in vocab]  # a respelled token of spaces is not
    return MetaspaceBPE(vocab, ranks, added, style.prefix, unk_id=vocab.get(style.unk) if style.unk else None,
                        strip=0 if style.prefix is Prefix.never else 1, vocab_size=len(tokens))


BUILDERS = {"gpt2": _byte_level, "llama": _sentencepiece}  # tokenizer.ggml.model -> its vocabulary
