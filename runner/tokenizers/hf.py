"""Hugging Face tokenizer.json files (`tokenizer.kind: hf`) holding a byte-level BPE (GPT-2, SmolLM,
Llama-3, Qwen2/3, Phi-4-mini and their kin; runner.tokenizers.bpe) or a SentencePiece-style BPE
(Gemma, Llama 2, Phi-3; runner.tokenizers.metaspace). tokenizer.path is the file, or a folder holding one.

tokenizer_config.json next to it, when present, names bos/eos, add_bos_token and the chat template
(or chat_template.jinja does), and generation_config.json (else config.json, as transformers
falls back) may add more ids that end generation, such as Gemma's <end_of_turn>.
Without add_bos_token, BOS is added when the tokenizer.json's post-processor puts a special token
first (as Llama-3's does); tokens a post-processor appends (an EOS) are not: a prompt goes on.
"""
from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import regex

from runner.config.errors import ConfigError, problem
from runner.config.schema import TokenizerSection
from runner.tokenizers.base import Added, overrides
from runner.tokenizers.bpe import GPT2_PATTERN, ByteLevelBPE, covering, digits_then_gpt2
from runner.tokenizers.metaspace import SPACE, MetaspaceBPE, Prefix, listed_ranks

FILE = "tokenizer.json"
SUPPORTED = ("a BPE model with GPT-2's byte-level pre-tokenizer: ByteLevel(use_regex=true), Digits then "
             "ByteLevel(use_regex=true), or Split(regex, behavior=Isolated) then ByteLevel(use_regex=false); "
             "no normalizer or NFC; or a SentencePiece-style BPE with spaces written ▁: a Replace(' ', '▁') "
             "normalizer (after Prepend('▁'), or before Split(' ')), or a Metaspace pre-tokenizer with split=false")
NORMALIZERS = {"NFC": lambda text: unicodedata.normalize("NFC", text)}


def load(section: TokenizerSection, source: str) -> ByteLevelBPE | MetaspaceBPE:
    """The tokenizer.json at (or in) section.path, with section.bos / section.eos overriding its own."""

    def fail(message: str) -> ConfigError:
        return ConfigError([problem(source, "tokenizer.path", message, section.path)])

    for key in ("pattern", "special_tokens"):
        if getattr(section, key) is not None:
            raise ConfigError([problem(source, f"tokenizer.{key}", "applies to tokenizer.kind tiktoken only; a tokenizer.json "
                                       "names its own pre-tokenizer and special tokens", getattr(section, key))])
    file = Path(section.path) / FILE if Path(section.path).is_dir() else Path(section.path)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
            raise TypeError("no model")
    except (OSError, ValueError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise fail(f"cannot be read as a tokenizer.json file ({e}); check the file and tokenizer.kind") from None
    try:
        tokenizer = _tokenizer(data, str(file))
        first = _post_processor_bos(data.get("post_processor"))
    except (ValueError, KeyError, TypeError) as e:
        raise fail(f"is a tokenizer.json this runner cannot use ({e}); supported: {SUPPORTED}") from None

    config = _optional_json(file.parent / "tokenizer_config.json", fail)
    generation = (_optional_json(file.parent / "generation_config.json", fail)
                  or _optional_json(file.parent / "config.json", fail))
    ids = {}
    for key in ("bos_token", "eos_token"):
        text = _token_text(config.get(key)) or (first if key == "bos_token" else None)
        ids[key] = tokenizer.token_id(text) if text is not None else None
        if text is not None and ids[key] is None:
            raise fail(f"has a tokenizer_config.json whose {key} {text!r} is not a token of {file.name}")
    extra_eos = generation.get("eos_token_id", [])
    extra_eos = [i for i in (extra_eos if isinstance(extra_eos, list) else [extra_eos]) if isinstance(i, int)]
    eos_ids = list(dict.fromkeys([*([ids["eos_token"]] if ids["eos_token"] is not None else []), *extra_eos]))
    bos_id, eos_ids = overrides(tokenizer, section, source, ids["bos_token"], eos_ids)
    add_bos = bool(config.get("add_bos_token", first is not None))
    tokenizer.configure(bos_id, eos_ids, add_bos, _chat_template(config, file.parent))
    return tokenizer


def _tokenizer(data: dict, name: str) -> ByteLevelBPE | MetaspaceBPE:
    """The BPE of a parsed tokenizer.json; raises ValueError naming what is not supported."""
    model = data["model"]
    if model.get("type", "BPE") != "BPE":
        raise ValueError(f"its model is {model.get('type')}")
    if _writes_spaces_as_metaspace(data):
        return _metaspace(data)
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "byte_fallback"):
        if model.get(key):
            raise ValueError(f"its model sets {key}")
    normalizer = data.get("normalizer")
    is_sequence = normalizer is not None and normalizer.get("type") == "Sequence"
    steps = normalizer.get("normalizers", []) if is_sequence else [normalizer]
    if len(steps) > 1 or (steps and steps[0] is not None and steps[0].get("type") not in NORMALIZERS):
        raise ValueError(f"its normalizer changes text ({_describe(normalizer)})")
    normalize = NORMALIZERS[steps[0]["type"]] if steps and steps[0] is not None else None

    added = _added(data)
    vocab, merges = model["vocab"], _merges(model)
    unk = model.get("unk_token")
    unk_id = vocab.get(unk, next((a.id for a in added if a.text == unk), None)) if unk is not None else None
    if unk is not None and unk_id is None:
        raise ValueError(f"its unk_token {unk!r} is not a token")
    return ByteLevelBPE(name, vocab, merges, _pattern(data.get("pre_tokenizer")), added,
                        unk_id=unk_id, fuse_unk=bool(model.get("fuse_unk")), normalize=normalize)


def _added(data: dict) -> list[Added]:
    added = []
    for token in data.get("added_tokens", []):
        if token.get("single_word"):
            raise ValueError(f"added token {token['content']!r} sets single_word")
        added.append(Added(token["id"], token["content"], special=bool(token.get("special")),
                           lstrip=bool(token.get("lstrip")), rstrip=bool(token.get("rstrip"))))
    return added


def _merges(model: dict) -> list[tuple[str, str]]:
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    if any(len(m) != 2 for m in merges):
        raise ValueError("a merge is not two tokens")
    return merges


def _is_space_to_metaspace(step: dict | None) -> bool:
    return bool(step) and step.get("type") == "Replace" and step.get("pattern") == {"String": " "} \
        and step.get("content") == SPACE


def _writes_spaces_as_metaspace(data: dict) -> bool:
    """Whether the file is SentencePiece-style: a normalizer or pre-tokenizer writes spaces as ▁."""
    normalizer, pre = data.get("normalizer") or {}, data.get("pre_tokenizer") or {}
    steps = normalizer.get("normalizers", []) if normalizer.get("type") == "Sequence" else [normalizer]
    return any(_is_space_to_metaspace(step) for step in steps) or pre.get("type") == "Metaspace"


def _metaspace(data: dict) -> MetaspaceBPE:
    """A SentencePiece-style tokenizer.json (Gemma's, Llama 2's, Phi-3's) as a MetaspaceBPE."""
    model = data["model"]
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "ignore_merges"):
        if model.get(key):
            raise ValueError(f"its model sets {key}")
    prefix = _prefix(data.get("normalizer"), data.get("pre_tokenizer"))
    added = _added(data)
    for token, entry in zip(added, data.get("added_tokens", [])):
        # Found in the normalized text, such a token would split it after a prefix ▁ was put in.
        if entry.get("normalized") and (prefix is not Prefix.never or " " in token.text or SPACE in token.text):
            raise ValueError(f"added token {token.text!r} is normalized")
    vocab = model["vocab"]
    unk = model.get("unk_token")
    if unk is not None and unk not in vocab:
        raise ValueError(f"its unk_token {unk!r} is not in the vocabulary")
    decoders = data.get("decoder") or {}
    decoders = decoders.get("decoders", []) if decoders.get("type") == "Sequence" else [decoders]
    strip = sum(d.get("start", 0) for d in decoders if d.get("type") == "Strip" and d.get("content") == " ")
    return MetaspaceBPE(vocab, listed_ranks(vocab, _merges(model)), added, prefix,
                        byte_fallback=bool(model.get("byte_fallback")), unk_id=vocab.get(unk) if unk else None,
                        fuse_unk=bool(model.get("fuse_unk")), strip=strip)


def _prefix(normalizer: dict | None, pre: dict | None) -> Prefix:
    """Where the normalizer and pre-tokenizer put a ▁ before text; ValueError for other shapes."""
    steps = normalizer.get("normalizers", []) if normalizer and normalizer.get("type") == "Sequence" else (
        [normalizer] if normalizer else [])
    kinds = [step.get("type") for step in steps]
    prepends = kinds == ["Prepend", "Replace"] and steps[0].get("prepend") == SPACE
    if pre is not None and pre.get("type") == "Metaspace" and not steps:
        if pre.get("replacement", SPACE) != SPACE or pre.get("split", True):
            raise ValueError("its Metaspace pre-tokenizer splits words or writes spaces other than as ▁")
        scheme = pre.get("prepend_scheme", "always" if pre.get("add_prefix_space", True) else "never")
        if scheme not in ("first", "always", "never"):
            raise ValueError(f"its Metaspace pre-tokenizer has prepend_scheme {scheme!r}")
        return Prefix(scheme)
    if (kinds == ["Replace"] or prepends) and _is_space_to_metaspace(steps[-1]):
        # Split(" ") after spaces became ▁ finds nothing (transformers 5 writes it for Gemma).
        if pre is not None and not (pre.get("type") == "Split" and pre.get("pattern") == {"String": " "}):
            raise ValueError(f"its pre_tokenizer is {_describe(pre)} after a normalizer that writes spaces as ▁")
        return Prefix.every if prepends else Prefix.never
    raise ValueError(f"its normalizer is {_describe(normalizer)} and its pre_tokenizer {_describe(pre)}")


def _pattern(pre: dict | None) -> str:
    """The one regex that splits text as the pre_tokenizer does."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    kinds = [step.get("type") for step in steps]

    def byte_level(step: dict, use_regex: bool) -> None:
        if step.get("add_prefix_space"):
            raise ValueError("its ByteLevel pre-tokenizer adds a prefix space")
        if step.get("use_regex", True) != use_regex:
            raise ValueError(f"its ByteLevel pre-tokenizer has use_regex={not use_regex} after {kinds[0]}")

    if kinds == ["ByteLevel"]:
        byte_level(steps[0], use_regex=True)
        return GPT2_PATTERN
    if kinds == ["Digits", "ByteLevel"]:
        byte_level(steps[1], use_regex=True)
        return digits_then_gpt2(bool(steps[0].get("individual_digits")))
    if kinds == ["Split", "ByteLevel"]:
        byte_level(steps[1], use_regex=False)
        split = steps[0]
        if split.get("behavior") != "Isolated" or split.get("invert"):
            raise ValueError(f"its Split pre-tokenizer has behavior {split.get('behavior')}, "
                             f"invert {split.get('invert')}")
        pattern = split["pattern"]
        return covering(pattern["Regex"] if "Regex" in pattern else regex.escape(pattern["String"]))
    raise ValueError(f"its pre_tokenizer is {_describe(pre)}")


def _describe(component: dict | None) -> str:
    """A normalizer's or pre-tokenizer's type, with a Sequence's parts: "Sequence[Digits, ByteLevel]"."""
    if component is None:
        return "none"
    parts = component.get("pretokenizers", component.get("normalizers"))
    inner = f"[{', '.join(_describe(p) for p in parts)}]" if parts is not None else ""
    return f"{component.get('type')}{inner}"


def _post_processor_bos(post: dict | None) -> str | None:
    """The special token the post-processor puts before the text, if it puts one."""
    processors = post.get("processors", []) if post and post.get("type") == "Sequence" else [post] if post else []
    for processor in processors:
        if processor.get("type") == "TemplateProcessing":
            first = processor["single"][0]
            return first["SpecialToken"]["id"] if "SpecialToken" in first else None
        if processor.get("type") != "ByteLevel":  # ByteLevel only trims offsets
            raise ValueError(f"its post_processor is {processor.get('type')}")
    return None


def _token_text(value) -> str | None:
    """A token as tokenizer_config.json writes it: its text, or an AddedToken object holding it."""
    return value.get("content") if isinstance(value, dict) else value


def _chat_template(config: dict, folder: Path) -> str | None:
    """chat_template.jinja beside the file, else tokenizer_config.json's (its "default" when named)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


def _optional_json(path: Path, fail) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise fail(f"has a {path.name} beside it that cannot be read ({e})") from None
