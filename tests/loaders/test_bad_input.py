"""Bad checkpoints: each is a ConfigError naming the file, never a traceback, and no pickle ever runs."""
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.checkpoint import random_state_dict
from runner.config.errors import ConfigError
from runner.config.schema import ModelSpec
from runner.loaders import detect, load_model, read_spec
from runner.loaders import gguf as gguf_loader
from runner.loaders.hf_layout import to_hf
from tests.loaders.writers import save_gguf, save_hf_bin, save_meta
from tests.properties.strategies import build_twins

CPU = torch.device("cpu")
SPEC = ModelSpec(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=48, intermediate_size=64, max_seq_len=16)


class Exploit:
    """Unpickling this creates `marker`: what a malicious checkpoint would do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def malicious(file: Path, marker: Path) -> Path:
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "payload": Exploit(marker)}, file)
    return file


def test_the_exploit_is_real(tmp_path):
    """Without weights_only the pickle runs: the refusal tests below test something."""
    torch.load(malicious(tmp_path / "x.bin", tmp_path / "ran"), weights_only=False)
    assert (tmp_path / "ran").exists()


def assert_refused(path: Path, file: Path, *words: str, spec: ModelSpec = SPEC) -> ConfigError:
    """load_model (and read_spec where the file is read for it) fail with a ConfigError naming `file`."""
    with pytest.raises(ConfigError) as e:
        load_model(path, spec, CPU, torch.float32)
    assert str(file) in str(e.value)
    for word in words:
        assert word in str(e.value)
    return e.value


def truncate(file: Path, keep: float = 0.5) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])


# --- HF ---------------------------------------------------------------------------------------


@pytest.fixture
def hf_dir(tmp_path) -> Path:
    hf, _ = build_twins(SPEC, 0)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="4KB")
    return tmp_path / "hf"


def test_hf_truncated_safetensors_shard(hf_dir):
    shard = sorted(hf_dir.glob("*.safetensors"))[1]
    truncate(shard)
    assert_refused(hf_dir, shard, "truncated or corrupt")


def test_hf_garbage_safetensors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 100)
    assert_refused(tmp_path, tmp_path / "model.safetensors", "truncated or corrupt")


def test_hf_pickle_is_refused_not_run(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    bin_ = malicious(tmp_path / "pytorch_model.bin", tmp_path / "ran")
    assert_refused(tmp_path, bin_, "refused")
    assert not (tmp_path / "ran").exists()


def test_hf_truncated_bin(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    save_hf_bin(tmp_path, to_hf(random_state_dict(SPEC, 0), SPEC), 2)
    shard = tmp_path / "pytorch_model-00002-of-00002.bin"
    truncate(shard)
    assert_refused(tmp_path, shard, "truncated or corrupt")


def test_hf_index_naming_a_missing_shard(hf_dir):
    shard = sorted(hf_dir.glob("*.safetensors"))[0]
    shard.unlink()
    assert_refused(hf_dir, hf_dir / "model.safetensors.index.json", repr(shard.name))


def test_hf_corrupt_index(hf_dir):
    (hf_dir / "model.safetensors.index.json").write_text('{"weight_map": ')
    assert_refused(hf_dir, hf_dir / "model.safetensors.index.json", "weight_map")


def test_hf_config_that_is_not_json(hf_dir):
    (hf_dir / "config.json").write_text("model_type: llama")
    with pytest.raises(ConfigError, match="config.json"):
        read_spec(hf_dir)


def test_hf_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert_refused(tmp_path, tmp_path, "model.safetensors", "pytorch_model.bin")


@pytest.mark.parametrize("change, words", [
    ({"n_layers": 1}, ["does not use", "'model.layers.1."]),
    ({"n_layers": 3}, ["lacks", "'model.layers.2."]),
    ({"tie_embeddings": True}, ["lm_head.weight differs from the embedding"]),
])
def test_hf_spec_that_does_not_fit_the_checkpoint(hf_dir, change, words):
    spec = ModelSpec(**{**SPEC.__dict__, **change})
    assert_refused(hf_dir, hf_dir, *words, spec=spec)


def test_hf_tied_spec_with_a_distinct_lm_head(tmp_path):
    """A bin of a tied model may hold lm_head as a copy; a different lm_head means the spec is wrong."""
    (tmp_path / "config.json").write_text("{}")
    save_hf_bin(tmp_path, to_hf(random_state_dict(SPEC, 0), SPEC), 1)  # untied: lm_head differs
    assert_refused(tmp_path, tmp_path, "lm_head.weight differs", spec=ModelSpec(**{**SPEC.__dict__, "tie_embeddings": True}))


# --- Meta -------------------------------------------------------------------------------------


def test_meta_pickle_is_refused_not_run(tmp_path):
    save_meta(tmp_path, random_state_dict(SPEC, 0), SPEC, n_shards=2)
    shard = malicious(tmp_path / "consolidated.01.pth", tmp_path / "ran")
    assert_refused(tmp_path, shard, "refused")
    assert not (tmp_path / "ran").exists()


def test_meta_truncated_shard(tmp_path):
    save_meta(tmp_path, random_state_dict(SPEC, 0), SPEC, n_shards=2)
    truncate(tmp_path / "consolidated.01.pth")
    assert_refused(tmp_path, tmp_path / "consolidated.01.pth", "truncated or corrupt")


def test_meta_missing_shard(tmp_path):
    save_meta(tmp_path, random_state_dict(SPEC, 0), SPEC, n_shards=2)
    (tmp_path / "consolidated.01.pth").rename(tmp_path / "consolidated.02.pth")
    assert_refused(tmp_path, tmp_path, "consolidated.02.pth", "without gaps")


def test_meta_params_without_weights(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps({"dim": 32, "n_layers": 2, "n_heads": 4}))
    assert_refused(tmp_path, tmp_path, "consolidated.00.pth")
    with pytest.raises(ConfigError, match="consolidated.00.pth"):
        read_spec(tmp_path)


def test_meta_shard_holding_something_else_than_tensors(tmp_path):
    torch.save({"tok_embeddings.weight": [1, 2, 3]}, tmp_path / "consolidated.00.pth")
    (tmp_path / "params.json").write_text(json.dumps({"dim": 32, "n_layers": 2, "n_heads": 4}))
    assert_refused(tmp_path, tmp_path / "consolidated.00.pth", "not a tensor")


def test_meta_spec_that_does_not_fit(tmp_path):
    save_meta(tmp_path, random_state_dict(SPEC, 0), SPEC)
    assert_refused(tmp_path, tmp_path, "does not use", "'layers.1.", spec=ModelSpec(**{**SPEC.__dict__, "n_layers": 1}))
    assert_refused(tmp_path, tmp_path, "needs 8 rows", spec=ModelSpec(**{**SPEC.__dict__, "n_kv_heads": 1}))


# --- GGUF -------------------------------------------------------------------------------------

_GGUF: dict[str, bytes] = {}


def tiny_gguf() -> bytes:
    """A valid two-layer Q8_0 GGUF of SPEC, built once."""
    if not _GGUF:
        hf, _ = build_twins(SPEC, 0)
        with tempfile.TemporaryDirectory() as d:
            from tests.loaders.writers import Q
            save_gguf(Path(d) / "t.gguf", hf.state_dict(), SPEC, Q.Q8_0)
            _GGUF["data"] = (Path(d) / "t.gguf").read_bytes()
    return _GGUF["data"]


def read_or_refuse(data: bytes) -> None:
    """read_spec and load either succeed or raise a ConfigError naming the file; nothing else."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "bad.gguf"
        path.write_bytes(data)
        assert detect(path) == "gguf"
        for step in (lambda: read_spec(path), lambda: gguf_loader.load(path, SPEC)):
            try:
                step()
            except ConfigError as e:
                assert str(path) in str(e)


@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_gguf_truncated_anywhere_is_a_config_error(data):
    whole = tiny_gguf()
    cut = data.draw(st.integers(0, len(whole) - 1), label="bytes kept")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "cut.gguf"
        path.write_bytes(whole[:cut])
        with pytest.raises(ConfigError) as e:
            gguf_loader.load(path, SPEC)
        assert str(path) in str(e.value)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # a corrupt scale dequantizes to NaN
@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_gguf_with_corrupt_bytes_loads_or_is_a_config_error(data):
    whole = bytearray(tiny_gguf())
    header = 2048  # metadata and tensor infos live at the start: corrupt there most of the time
    for _ in range(data.draw(st.integers(1, 8), label="corrupt bytes")):
        at = data.draw(st.integers(0, header) | st.integers(0, len(whole) - 1), label="offset")
        whole[at] = data.draw(st.integers(0, 255), label="value")
    read_or_refuse(bytes(whole))


def test_gguf_not_a_gguf_at_all(tmp_path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    assert_refused(path, path, "truncated or corrupt")
    path.write_bytes(b"PK\x03\x04" + b"\x00" * 64)
    assert_refused(path, path, "GGUF magic invalid")


# --- detection --------------------------------------------------------------------------------


def test_each_format_is_detected_from_what_the_path_holds(tmp_path, hf_dir):
    save_meta(tmp_path / "meta", random_state_dict(SPEC, 0), SPEC)
    (tmp_path / "model.gguf").write_bytes(tiny_gguf())
    torch.save(random_state_dict(SPEC, 0), tmp_path / "model.pth")
    assert [detect(p) for p in (hf_dir, tmp_path / "meta", tmp_path / "model.gguf", tmp_path / "model.pth")] == [
        "hf", "meta", "gguf", "native"]
    shutil.copy(tmp_path / "model.gguf", tmp_path / "gguf.pth")
    assert detect(tmp_path / "gguf.pth") == "gguf"
