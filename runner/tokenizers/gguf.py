"""The vocabulary inside a llama.cpp GGUF file (`tokenizer.kind: gguf`), for gpt2-style BPE models.

The tokenizer.ggml.* metadata is read as llama.cpp reads it: tokens and their types, the merge
list, the pre-tokenizer named by `tokenizer.ggml.pre`, bos/eos and add_bos_token, and the chat
template. No tensor is read.
"""
from __future__ import annotations

from gguf import GGUFReader, TokenType

from runner.config.errors import ConfigError, problem
from runner.config.schema import TokenizerSection
from runner.tokenizers.bpe import GPT2_PATTERN, Added, ByteLevelBPE, digits_then_gpt2, overrides

# llama.cpp's default pre-tokenizer (a GGUF without tokenizer.ggml.pre gets it too), its four
# regexes in sequence made one: runs of punctuation and $+<=>^~| alone, GPT-2's pattern between
# them, then numbers cut into runs of three ASCII digits (a space before a number stands alone).
_PUNCT = r"\p{P}\$\+<=>\^~\|"
LLAMA_CPP_DEFAULT = (
    rf"[{_PUNCT}]+| ?\p{{L}}+| (?=\p{{N}})|[0-9]{{3}}|(?:(?![0-9]{{3}})\p{{N}})+"
    rf"| ?[^\s\p{{L}}\p{{N}}{_PUNCT}]+|\s+(?![^\s{_PUNCT}])|\s+"
)

# tokenizer.ggml.pre -> the split pattern, for the names llama.cpp (llama-vocab.cpp) gives these
# regexes. "gpt-2" and its kin: GPT-2's pattern; "smollm" and its kin: each digit alone, then GPT-2's.
PRE_PATTERNS = {
    "default": LLAMA_CPP_DEFAULT,
    **dict.fromkeys(["gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4", "trillion", "granite-docling"], GPT2_PATTERN),
    **dict.fromkeys(["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"],
                    digits_then_gpt2(individual=True)),
}
MODELS = ("gpt2",)  # tokenizer.ggml.model values supported (llama.cpp's BPE vocabularies)
FOUND_ALWAYS = {TokenType.USER_DEFINED}  # llama.cpp finds these in any text and prints their text
FOUND_SPECIAL = {TokenType.CONTROL, TokenType.UNKNOWN}  # ... these only when parsing special tokens


def load(section: TokenizerSection, source: str) -> ByteLevelBPE:
    """The vocabulary of the GGUF at section.path, with section.bos / section.eos overriding its own."""
    path = section.path

    def fail(message: str) -> ConfigError:
        return ConfigError([problem(source, "tokenizer.path", message, path)])

    for key in ("pattern", "special_tokens"):
        if getattr(section, key) is not None:
            raise ConfigError([problem(source, f"tokenizer.{key}", "applies to tokenizer.kind tiktoken only; a GGUF "
                                       "names its own pre-tokenizer and special tokens", getattr(section, key))])
    try:
        fields = GGUFReader(path).fields  # parses the metadata; tensors stay unread in the memory map
    except (ValueError, OSError, IndexError, KeyError, TypeError) as e:
        raise fail(f"cannot be read as a GGUF file ({e}); check the file and tokenizer.kind") from None

    def value(key: str, default=None):
        field = fields.get(key)
        return default if field is None else field.contents()

    model = value("tokenizer.ggml.model")
    if model not in MODELS:
        raise fail(f"holds a {model!r} vocabulary (tokenizer.ggml.model); supported: {', '.join(MODELS)}"
                   if model is not None else "holds no vocabulary (no tokenizer.ggml.model)")
    pre = value("tokenizer.ggml.pre", "default")  # llama.cpp's choice when the key is absent
    if pre not in PRE_PATTERNS:
        raise fail(f"names pre-tokenizer {pre!r} (tokenizer.ggml.pre), which is not supported; "
                   f"supported: {', '.join(sorted(PRE_PATTERNS))}")

    tokens = value("tokenizer.ggml.tokens", [])
    types = value("tokenizer.ggml.token_type", [TokenType.NORMAL] * len(tokens))
    merges = value("tokenizer.ggml.merges", [])
    if len(types) != len(tokens) or not tokens:
        raise fail(f"has {len(tokens)} tokens and {len(types)} token types; they must be as many, and not 0")
    vocab, added = {}, []
    for id, (text, kind) in enumerate(zip(tokens, types)):
        if kind in FOUND_ALWAYS or kind in FOUND_SPECIAL:
            added.append(Added(id, text, special=kind not in FOUND_ALWAYS))
        elif kind != TokenType.UNUSED:
            vocab[text] = id
    try:
        pairs = [tuple(m.split(" ")) for m in merges]
        if any(len(p) != 2 for p in pairs):
            raise ValueError("a merge is not two tokens separated by one space")
        tokenizer = ByteLevelBPE(path, vocab, pairs, PRE_PATTERNS[pre], added, vocab_size=len(tokens))
    except ValueError as e:
        raise fail(f"has a BPE vocabulary that cannot be used: {e}") from None

    # A chat model may end a turn with its own token (eot: e.g. <|eot_id|>; eom: end of message).
    stops = [value(f"tokenizer.ggml.{key}_token_id") for key in ("eos", "eot", "eom")]
    eos_ids = list(dict.fromkeys(i for i in stops if i is not None))
    bos = value("tokenizer.ggml.bos_token_id")
    if any(i >= tokenizer.vocab_size for i in [*eos_ids, *([bos] if bos is not None else [])]):
        raise fail(f"names a bos/eos/eot/eom token id beyond its {tokenizer.vocab_size} tokens")
    bos, eos_ids = overrides(tokenizer, section, source, bos, eos_ids)
    add_bos = bool(value("tokenizer.ggml.add_bos_token", False))  # llama.cpp's default for these pre-tokenizers
    tokenizer.configure(bos, eos_ids, add_bos, value("tokenizer.chat_template"))
    return tokenizer

