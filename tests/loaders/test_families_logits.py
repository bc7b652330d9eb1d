"""A family's model saved by transformers (`save_pretrained`) and the same weights written as a
GGUF the way llama.cpp's converter writes it (tests.helpers.gguf_families) both load, through
runner's loaders and the spec each file declares, to HF's own logits."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.config.schema import ModelSpec
from runner.loaders import load_model, read_spec
from tests.helpers.gguf_families import write_gguf
from tests.loaders.test_gguf_families import gguf_family_specs
from tests.properties.strategies import hf_reference, logits_bound


@settings(max_examples=25, deadline=None)
@given(spec=gguf_family_specs(), seed=st.integers(0, 2**16), data=st.data())
@torch.no_grad()
def test_hf_and_gguf_files_load_to_hfs_logits(spec, seed, data):
    hf = hf_reference(spec, seed)
    length = data.draw(st.integers(1, min(spec.max_seq_len, 24)), label="prompt length")
    tokens = torch.tensor([data.draw(st.lists(st.integers(0, spec.vocab_size - 1), min_size=length, max_size=length))])
    expected = hf(tokens).logits
    with tempfile.TemporaryDirectory() as tmp:
        folder, gguf_file = Path(tmp) / "hf", Path(tmp) / "model.gguf"
        hf.save_pretrained(folder)
        write_gguf(gguf_file, hf.state_dict(), spec)
        for path in (folder, gguf_file):
            declared = ModelSpec(**read_spec(path))
            assert declared.family == spec.family, path.name
            model = load_model(path, declared, torch.device("cpu"), torch.float32)
            model.setup_cache(1, length)
            got = model(tokens, torch.arange(length))
            diff = (got - expected).abs().max().item()
            assert diff <= logits_bound(expected), f"{path.name}: max abs diff {diff:.3g}"
