"""read_metadata against gguf's own GGUFReader, on files GGUFWriter writes."""
from __future__ import annotations

from pathlib import Path

import gguf
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.tokenizers.gguf_metadata import read_metadata

VALUES = {
    "general.architecture": "gemma3",
    "t.u8": (gguf.GGUFValueType.UINT8, 7), "t.i8": (gguf.GGUFValueType.INT8, -7),
    "t.u16": (gguf.GGUFValueType.UINT16, 65535), "t.i16": (gguf.GGUFValueType.INT16, -3),
    "t.u32": (gguf.GGUFValueType.UINT32, 2**32 - 1), "t.i32": (gguf.GGUFValueType.INT32, -(2**31)),
    "t.u64": (gguf.GGUFValueType.UINT64, 2**64 - 1), "t.i64": (gguf.GGUFValueType.INT64, -(2**63)),
    "t.f32": (gguf.GGUFValueType.FLOAT32, 0.5), "t.f64": (gguf.GGUFValueType.FLOAT64, -1e300),
    "t.bool": (gguf.GGUFValueType.BOOL, True), "t.empty": (gguf.GGUFValueType.STRING, ""),
}


def write(path, strings: list[str], floats: list[float], endianess=gguf.GGUFEndian.LITTLE) -> str:
    writer = gguf.GGUFWriter(str(path), "gemma3", endianess=endianess)
    for key, (kind, value) in ((k, v) for k, v in VALUES.items() if isinstance(v, tuple)):
        writer.add_key_value(key, value, kind)
    writer.add_token_list(strings)
    writer.add_token_scores(floats)
    writer.add_token_types([i % 7 for i in range(len(strings))])
    writer.add_array("t.nested", [[1, 2], [3]])
    writer.add_array("t.empty_list", [])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


@settings(max_examples=50, deadline=None)
@given(strings=st.lists(st.text(st.characters(codec="utf-8")), min_size=1, max_size=20),
       big_endian=st.booleans())
def test_values_match_gguf_reader(tmp_path_factory, strings, big_endian):
    floats = [float(i) / 4 for i in range(len(strings))]
    endian = gguf.GGUFEndian.BIG if big_endian else gguf.GGUFEndian.LITTLE
    path = write(tmp_path_factory.mktemp("m") / "m.gguf", strings, floats, endian)
    ours = read_metadata(path)
    theirs = {key: field.contents() for key, field in gguf.GGUFReader(path).fields.items()
              if not key.startswith("GGUF.")}
    assert ours.keys() == theirs.keys()
    assert ours.pop("t.nested") == [[1, 2], [3]]  # GGUFReader's contents() flattens it
    for key, value in ours.items():
        assert value == theirs[key], key
    assert ours["tokenizer.ggml.tokens"] == strings and ours["t.u64"] == 2**64 - 1


@pytest.mark.parametrize("data, why", [
    (b"", "the file is empty"),
    (b"GGML" + bytes(20), "does not start with the GGUF magic bytes"),
    (b"GGUF" + (1).to_bytes(4, "little") + bytes(16), "GGUF version 1; supported: 2, 3"),
    (b"GGUF" + (3).to_bytes(4, "little") + bytes(8) + (1).to_bytes(8, "little"), "ends inside its metadata"),
])
def test_what_is_not_a_gguf_file(tmp_path, data, why):
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=why):
        read_metadata(str(path))


def test_a_truncated_vocabulary(tmp_path):
    path = write(tmp_path / "m.gguf", ["a", "bb", "ccc"], [0.0, 1.0, 2.0])
    data = Path(path).read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: data.index(b"ccc") + 1])
    with pytest.raises(ValueError, match="ends inside its metadata"):
        read_metadata(str(tmp_path / "cut.gguf"))
