"""The hf tokenizer on SentencePiece-style tokenizer.json files (Gemma's, Llama 2's, Phi-3's),
compared with `tokenizers.Tokenizer.from_file` and transformers on the same file.

The files are the tokenizers transformers builds from the GGUFs of conftest.spm_ggufs, saved, and
edited into the shapes the real models' files have.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from transformers import AutoTokenizer

from runner.config.errors import ConfigError
from runner.config.schema import TokenizerKind, TokenizerSection
from runner.tokenizers import build
from runner.tokenizers.metaspace import MetaspaceBPE
from tests.helpers.tokenizers import texts
from tests.tokenizers.conftest import SPM_CONTROL, SPM_TEMPLATE, SPM_USER_DEFINED, Quiet

PREPEND_REPLACE = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"},
                                                       {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}


def gemma_without_split(d: dict) -> None:
    d["pre_tokenizer"] = None  # Gemma's files before transformers 5


def llama2(d: dict) -> None:
    """Llama 2's (and TinyLlama's) tokenizer.json: a Prepend normalizer, no pre-tokenizer, an unk token."""
    d.update(normalizer=PREPEND_REPLACE, pre_tokenizer=None)
    d["model"]["unk_token"] = "<unk>"


def metaspace_always(d: dict) -> None:
    d["pre_tokenizer"]["prepend_scheme"] = "always"


def phi3(d: dict) -> None:
    """Phi-3's: its chat tokens take the whitespace after them (rstrip); one here takes it before."""
    for token in d["added_tokens"]:
        token["rstrip"] = token["content"] in ("<|end|>", "<|assistant|>", "<|user|>")
        token["lstrip"] = token["content"] == "<start_of_turn>"


# name -> (the GGUF architecture transformers converted, how its saved file is edited)
VARIANTS = {
    "gemma": ("gemma3", None),  # as transformers 5 writes it: Replace(" ", "▁"), then Split(" ")
    "gemma-no-split": ("gemma3", gemma_without_split),
    "llama-metaspace": ("llama", None),  # Metaspace(prepend_scheme="first", split=false)
    "metaspace-always": ("llama", metaspace_always),
    "llama2": ("llama", llama2),
    "phi3": ("phi3", phi3),
}


def section(path, **kw) -> TokenizerSection:
    return TokenizerSection(kind=TokenizerKind.hf, path=str(path), **kw)


def without_specials(data: dict) -> HFTokenizer:
    """The same tokenizer with its special added tokens gone: their text is plain text."""
    data = dict(data, added_tokens=[t for t in data["added_tokens"] if not t["special"]])
    return HFTokenizer.from_str(json.dumps(data))


def save(folder, data: dict, **files) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(data))
    for name, content in files.items():
        (folder / name.replace("__", ".")).write_text(json.dumps(content))
    return str(folder)


@pytest.fixture(scope="module")
def files(spm_ggufs, tmp_path_factory) -> Quiet:
    """name -> (the tokenizer.json's parsed data, its folder)."""
    out = Quiet()
    for name, (arch, change) in VARIANTS.items():
        data = json.loads(spm_ggufs[arch][1].backend_tokenizer.to_str())
        if change is not None:
            change(data)
        out[name] = (data, save(tmp_path_factory.mktemp(name), data))
    return out


@pytest.fixture(scope="module")
def variants(files) -> Quiet:
    """name -> (ours, `tokenizers` from the same file, the same without special tokens)."""
    return Quiet({name: (build(section(folder)), HFTokenizer.from_file(f"{folder}/tokenizer.json"),
                         without_specials(data)) for name, (data, folder) in files.items()})


def prompts() -> st.SearchStrategy[str]:
    extra = st.sampled_from([*SPM_CONTROL, *SPM_USER_DEFINED, "<s>", "<unk>", " " * 5, "\n \t", "▁"])
    return st.lists(st.one_of(texts(), extra), max_size=6).map("".join)


@pytest.mark.parametrize("name", list(VARIANTS))
@settings(max_examples=60, deadline=None)
@given(text=prompts())
def test_ids_match_tokenizers(variants, name, text):
    ours, reference, plain = variants[name]
    ids = ours.encode(text, bos=False, allow_special=True)
    assert ids == reference.encode(text, add_special_tokens=False).ids
    assert ours.encode(text, bos=False) == plain.encode(text, add_special_tokens=False).ids
    assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True)


def test_each_variant_is_a_metaspace_bpe_with_its_own_prefix(variants):
    assert all(isinstance(v[0], MetaspaceBPE) for v in variants.values())
    encoded = {name: variants[name][0].encode("a b", bos=False) for name in ("gemma", "llama-metaspace", "llama2")}
    assert encoded["gemma"] != encoded["llama-metaspace"] == encoded["llama2"]  # "a▁b" and "▁a▁b"
    ours = variants["llama2"][0]
    assert ours.encode("<b>x", bos=False) != variants["llama-metaspace"][0].encode("<b>x", bos=False)  # x vs ▁x


def test_rstrip_tokens_take_the_whitespace_after_them(variants):
    ours, reference, _ = variants["phi3"]
    text = "<|user|>\nHi  <|end|>\n<|assistant|>\n"
    ids = ours.encode(text, bos=False, allow_special=True)
    assert ids == reference.encode(text, add_special_tokens=False).ids
    assert ours.decode(ids) == "Hi  "  # the newlines went with the tokens; the spaces before <|end|> did not


@pytest.fixture(scope="module")
def gemma_folder(files, spm_vocabulary, tmp_path_factory) -> str:
    """Gemma's tokenizer.json with its tokenizer_config.json and generation_config.json."""
    tokens = spm_vocabulary[0]
    return save(tmp_path_factory.mktemp("gemma-config"), files["gemma"][0],
                tokenizer_config__json={"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True,
                                        "chat_template": SPM_TEMPLATE},
                generation_config__json={"eos_token_id": [2, tokens.index("<end_of_turn>")]})


@settings(max_examples=50, deadline=None)
@given(text=prompts())
def test_bos_and_special_tokens_match_transformers(gemma_folder, text):
    ours = build(section(gemma_folder))
    reference = AutoTokenizer.from_pretrained(gemma_folder)
    assert ours.encode(text, allow_special=True) == reference(text)["input_ids"]


def test_configs_set_bos_eos_and_the_end_of_turn(gemma_folder, spm_vocabulary, tmp_path):
    tokens = spm_vocabulary[0]
    ours = build(section(gemma_folder))
    assert (ours.bos_id, ours.bos_token, ours.eos_token) == (1, "<s>", "</s>")
    assert ours.eos_ids == {2, tokens.index("<end_of_turn>")}
    assert ours.chat_template == SPM_TEMPLATE
    # Without generation_config.json, config.json's eos_token_id, as transformers reads it.
    data = json.loads(Path(gemma_folder, "tokenizer.json").read_text(encoding="utf-8"))
    folder = save(tmp_path / "c", data, tokenizer_config__json={"eos_token": "</s>"},
                  config__json={"eos_token_id": [tokens.index("<end_of_turn>"), 2], "pad_token_id": None})
    assert build(section(folder)).eos_ids == {2, tokens.index("<end_of_turn>")}


def edited(files, name: str, change) -> dict:
    data = json.loads(json.dumps(files[name][0]))
    change(data)
    return data


UNSUPPORTED = {
    "its Metaspace pre-tokenizer splits words": ("llama-metaspace", lambda d: d["pre_tokenizer"].update(split=True)),
    "added token '<|end|>' is normalized": (
        "llama2", lambda d: next(t for t in d["added_tokens"] if t["content"] == "<|end|>").update(normalized=True)),
    "its model sets ignore_merges": ("gemma", lambda d: d["model"].update(ignore_merges=True)),
    "its normalizer is Sequence[Lowercase, Replace] and its pre_tokenizer Split": (
        "gemma", lambda d: d.update(normalizer={"type": "Sequence", "normalizers": [{"type": "Lowercase"},
                                                                                    d["normalizer"]]})),
    "its pre_tokenizer is Whitespace after a normalizer that writes spaces as ▁": (
        "gemma", lambda d: d.update(pre_tokenizer={"type": "Whitespace"})),
    "merge 0 ('▁' 'a') needs 'a', which is not in the vocabulary": (
        "gemma", lambda d: (d["model"]["vocab"].pop("a"), d["model"].update(merges=[["▁", "a"]]))),
}


@pytest.mark.parametrize("expected", list(UNSUPPORTED))
def test_unsupported_files_name_what_is_supported(files, tmp_path, expected):
    name, change = UNSUPPORTED[expected]
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(edited(files, name, change)))
    with pytest.raises(ConfigError) as e:
        build(section(path), source="r.yaml")
    (p,) = e.value.problems
    assert p.message.startswith(f"is a tokenizer.json this runner cannot use ({expected}")
    assert "or a SentencePiece-style BPE with spaces written ▁" in p.message
