"""The hf tokenizer on tokenizer.json files trained and saved by `tokenizers`, compared with
`tokenizers.Tokenizer.from_file` on the same file."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Regex, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer
from transformers.integrations.gguf.gguf_tokenizer_mapping import (
    GGUF_PRE_TOKENIZER_SPLITS,
)
from transformers.models.qwen2.tokenization_qwen2 import (
    PRETOKENIZE_REGEX as QWEN2_REGEX,
)

from runner.config.errors import ConfigError
from runner.config.schema import TokenizerKind, TokenizerSection
from runner.tokenizers import build
from runner.tokenizers.tiktoken import LLAMA3_PATTERN
from tests.helpers.tokenizers import texts
from tests.tokenizers.conftest import (
    SPECIALS,
    byte_level,
    digits_byte_level,
    train_byte_level,
)

CUSTOM = "<custom>"  # a non-special added token: `tokenizers` finds it in any text
SMOLLM2_TEMPLATE = (  # as SmolLM2-135M-Instruct's GGUF holds it
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def llama3_split() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def gappy_split() -> pre_tokenizers.PreTokenizer:
    """A Split whose regex leaves text between its matches, which `tokenizers` keeps as pieces."""
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\p{L}+|\p{N}"), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def split_then_byte_level(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


QWEN_ADDED = ["<tool_call>", "</tool_call>", "<think>", "</think>"]  # Qwen3's non-special added tokens


def qwen():
    """Qwen2/2.5/3's tokenizer.json: Qwen's split regex after NFC, and non-special added tokens."""
    tokenizer = train_byte_level(split_then_byte_level(QWEN2_REGEX), normalizer=normalizers.NFC())
    tokenizer.add_tokens(QWEN_ADDED)
    return tokenizer


def gpt2_with_custom():
    tokenizer = train_byte_level(byte_level())
    tokenizer.add_tokens([CUSTOM])
    return tokenizer


VARIANTS = {
    "gpt2": gpt2_with_custom,  # every byte has a token
    "smollm": lambda: train_byte_level(digits_byte_level(), all_bytes=False),  # bytes without a token are dropped
    "llama3-nfc": lambda: train_byte_level(llama3_split(), normalizer=normalizers.NFC()),
    "gappy-split": lambda: train_byte_level(gappy_split()),
    "unk": lambda: train_byte_level(byte_level(), all_bytes=False, unk="<unk>"),  # ... or become <unk>
    "qwen": qwen,
    "phi4-mini": lambda: train_byte_level(split_then_byte_level(GGUF_PRE_TOKENIZER_SPLITS["gpt-4o"])),
}


def section(path, **kw) -> TokenizerSection:
    return TokenizerSection(kind=TokenizerKind.hf, path=str(path), **kw)


def save(tokenizer: HFTokenizer, folder, config: dict | None = None, **files) -> str:
    """tokenizer.json (and tokenizer_config.json, other files) in `folder`; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    for name, text in files.items():
        (folder / name.replace("__", ".")).write_text(text)
    return str(folder)


def without_specials(tokenizer: HFTokenizer) -> HFTokenizer:
    """The same tokenizer with its special added tokens gone: their text is plain text."""
    data = json.loads(tokenizer.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if not t["special"]]
    return HFTokenizer.from_str(json.dumps(data))


@pytest.fixture(scope="session")
def variants(tmp_path_factory):
    """name -> (ours, `tokenizers` from the same file, the same without special tokens)."""
    out = {}
    for name, train in VARIANTS.items():
        folder = save(train(), tmp_path_factory.mktemp(name))
        reference = HFTokenizer.from_file(f"{folder}/tokenizer.json")
        out[name] = (build(section(folder)), reference, without_specials(reference))
    return out


def prompts(specials=(*SPECIALS, CUSTOM, *QWEN_ADDED)) -> st.SearchStrategy[str]:
    return st.lists(st.one_of(texts(), st.sampled_from(specials), st.sampled_from(["\x04", "\U00040000"])),
                    max_size=5).map("".join)


@pytest.mark.parametrize("name", list(VARIANTS))
@settings(max_examples=60, deadline=None)
@given(text=prompts())
def test_ids_match_tokenizers(variants, name, text):
    ours, reference, plain = variants[name]
    assert ours.encode(text, bos=False, allow_special=True) == reference.encode(text, add_special_tokens=False).ids
    assert ours.encode(text, bos=False) == plain.encode(text, add_special_tokens=False).ids


@settings(max_examples=60, deadline=None)
@given(text=prompts())
def test_round_trip(variants, text):
    ours = variants["gpt2"][0]
    ids = ours.encode(text, bos=False)
    assert ours.decode(ids) == text  # special-token text stays text; <custom> is found and printed
    assert (ours.token_id(CUSTOM) in ids) == (CUSTOM in text)


def test_unknown_bytes_become_the_unk_token(variants):
    ours, reference, _ = variants["unk"]
    unk = ours.token_id("<unk>")
    assert ours.encode("-\x01\x02-", bos=False) == [ours.token_id("-"), unk, ours.token_id("-")]  # fused, unmerged
    assert ours.encode("-\x01\x02-", bos=False) == reference.encode("-\x01\x02-").ids


def test_nfc_normalizer_is_applied(variants):
    ours = variants["llama3-nfc"][0]
    assert ours.encode("e\u0301", bos=False) == ours.encode("\u00e9", bos=False)


def test_config_files_set_bos_eos_and_the_template(tmp_path):
    folder = save(train_byte_level(byte_level()), tmp_path / "t",
                  config={"bos_token": "<|im_start|>", "eos_token": {"__type": "AddedToken", "content": "<|im_end|>"},
                          "add_bos_token": True, "chat_template": SMOLLM2_TEMPLATE},
                  generation_config__json=json.dumps({"eos_token_id": [2, 0]}))
    tok = build(section(folder))
    assert (tok.bos_id, tok.eos_ids) == (1, frozenset({0, 2}))
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tok.encode("hi") == [1, *tok.encode("hi", bos=False)]
    assert tok.chat_template == SMOLLM2_TEMPLATE
    assert build(section(f"{folder}/tokenizer.json")).eos_ids == tok.eos_ids  # the file itself works too


def test_without_config_there_is_no_bos_eos_or_template(variants):
    ours = variants["gpt2"][0]
    assert (ours.bos_id, ours.eos_ids, ours.chat_template) == (None, frozenset(), None)
    assert ours.encode("hi") == ours.encode("hi", bos=False)


def test_a_post_processor_that_puts_bos_first_adds_it(tmp_path):
    tokenizer = train_byte_level(byte_level())
    tokenizer.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A",
                                                             special_tokens=[("<|endoftext|>", 0)])
    tok = build(section(save(tokenizer, tmp_path / "t")))
    assert tok.bos_id == 0
    for text in ("Hello, world", "<|im_start|>user\n42<|im_end|>"):
        assert tok.encode(text, allow_special=True) == tokenizer.encode(text).ids
    tok = build(section(save(tokenizer, tmp_path / "off", config={"add_bos_token": False})))
    assert tok.encode("hi") == tok.encode("hi", bos=False)  # the config has the last word


def test_chat_template_file_and_named_templates(tmp_path):
    tokenizer = train_byte_level(byte_level())
    named = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "chat"}]
    assert build(section(save(tokenizer, tmp_path / "a", config={"chat_template": named}))).chat_template == "chat"
    folder = save(tokenizer, tmp_path / "b", config={"chat_template": "old"}, chat_template__jinja="new")
    assert build(section(folder)).chat_template == "new"


def test_bos_and_eos_overrides(variants, tmp_path):
    folder = save(train_byte_level(byte_level()), tmp_path / "t", config={"bos_token": "<|im_start|>"})
    tok = build(section(folder, bos="<|endoftext|>", eos="<|im_end|>"))
    assert (tok.bos_id, tok.eos_ids) == (0, frozenset({2}))
    with pytest.raises(ConfigError) as e:
        build(section(folder, bos="<s>", eos="</s>"), source="r.yaml")
    assert [(p.key, p.value) for p in e.value.problems] == [("tokenizer.bos", "<s>"), ("tokenizer.eos", "</s>")]


def edit(data: dict, change) -> dict:
    data = json.loads(json.dumps(data))
    change(data)
    return data


UNSUPPORTED = {
    "its model is WordPiece": lambda d: d["model"].update(type="WordPiece"),
    "its normalizer changes text (Lowercase)": lambda d: d.update(normalizer={"type": "Lowercase"}),
    "its Metaspace pre-tokenizer splits words": lambda d: d.update(pre_tokenizer={"type": "Metaspace",
                                                                                  "replacement": "▁"}),
    "its pre_tokenizer is Sequence[Whitespace, ByteLevel]": lambda d: d.update(pre_tokenizer={
        "type": "Sequence", "pretokenizers": [{"type": "Whitespace"}, d["pre_tokenizer"]]}),
    "its pre_tokenizer is none": lambda d: d.update(pre_tokenizer=None),
    "its ByteLevel pre-tokenizer adds a prefix space": lambda d: d["pre_tokenizer"].update(add_prefix_space=True),
    "its model sets byte_fallback": lambda d: d["model"].update(byte_fallback=True),
    "added token '<|im_end|>' sets single_word": lambda d: d["added_tokens"][2].update(single_word=True),
    "its post_processor is RobertaProcessing": lambda d: d.update(post_processor={"type": "RobertaProcessing"}),
    "merge 0 ('Ġ' 'Ġ') needs 'ĠĠ', which is not in the vocabulary": lambda d: d["model"]["vocab"].pop("ĠĠ"),
}


@pytest.mark.parametrize("expected", list(UNSUPPORTED))
def test_unsupported_files_name_what_is_supported(variants, tmp_path, expected):
    data = edit(json.loads(variants["gpt2"][1].to_str()), UNSUPPORTED[expected])
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as e:
        build(section(path), source="r.yaml")
    (p,) = e.value.problems
    assert (p.source, p.key, p.value) == ("r.yaml", "tokenizer.path", str(path))
    assert p.message.startswith(f"is a tokenizer.json this runner cannot use ({expected}")
    assert "supported: a BPE model with GPT-2's byte-level pre-tokenizer" in p.message


def test_a_split_that_is_not_isolated(variants, tmp_path):
    data = json.loads(variants["llama3-nfc"][1].to_str())
    data["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "Removed"
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="Split pre-tokenizer has behavior Removed"):
        build(section(tmp_path))


def test_a_folder_without_tokenizer_json(tmp_path):
    with pytest.raises(ConfigError, match="cannot be read as a tokenizer.json file"):
        build(section(tmp_path))


# --- SmolLM2's tokenizer, as `tokenizers` built from its GGUF ------------------------------


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_reference, tmp_path_factory):
    """Our hf tokenizer of SmolLM2's tokenizer.json as `tokenizers` builds it from the GGUF."""
    folder = save(smollm2_reference[1], tmp_path_factory.mktemp("smollm2"),
                  config={"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": SMOLLM2_TEMPLATE})
    return build(section(folder))


@pytest.mark.real
@settings(max_examples=100, deadline=None)
@given(text=prompts(["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<file_sep>"]))
def test_smollm2_json_matches_its_gguf(smollm2_hf, smollm2, text):
    for allow_special in (False, True):
        assert smollm2_hf.encode(text, allow_special=allow_special) == smollm2.encode(text, allow_special=allow_special)


@pytest.mark.real
def test_smollm2_json_metadata_matches_its_gguf(smollm2_hf, smollm2):
    keys = ("vocab_size", "bos_id", "eos_ids", "add_bos", "bos_token", "eos_token", "chat_template")
    assert [getattr(smollm2_hf, k) for k in keys] == [getattr(smollm2, k) for k in keys]
