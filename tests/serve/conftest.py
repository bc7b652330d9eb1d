"""A real `runner serve` process per test module, on a free port of 127.0.0.1."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
STARTUP_SECONDS = 120  # a cold start builds runner's kernels (about 10 s) or converts SmolLM2 once


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str  # http://127.0.0.1:PORT
    process: subprocess.Popen
    log: Path

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def metrics(self) -> dict[str, float]:
        """The /metrics samples without labels' quoting: 'name{a="b"}' -> value."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines() if line and not line.startswith("#")}


def start(tmp: Path, recipe: str, *args: str) -> Server:
    """`python -m runner serve RECIPE ARGS` with a bounded wait for /health 200."""
    port = free_port()
    log = tmp / f"serve-{port}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "runner", "serve", recipe, "--port", str(port), *args]
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"runner serve exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return Server(url, process, log)
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    stop(Server(url, process, log))
    raise RuntimeError(f"runner serve was not ready within {STARTUP_SECONDS} s:\n{log.read_text()}")


def stop(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


@pytest.fixture(scope="module")
def serve(tmp_path_factory):
    """serve(recipe, *args) -> Server, stopped at the module's end."""
    started = []

    def run(recipe: str, *args: str) -> Server:
        server = start(tmp_path_factory.mktemp("serve"), recipe, *args)
        started.append(server)
        return server

    yield run
    for server in started:
        stop(server)


def cli_greedy(recipe: str, prompt: str, tokens: int, *overrides: str) -> str:
    """The text `runner RECIPE generate.temperature=0` prints for `prompt` (the prompt, its chat
    newline and the statistics line taken off)."""
    out = subprocess.run([sys.executable, "-m", "runner", recipe, "generate.temperature=0",
                          f"generate.max_new_tokens={tokens}", f"generate.prompt={prompt}", *overrides],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, check=True).stdout
    assert out.startswith(prompt)
    body = out[len(prompt):]
    body = body[:body.rstrip("\n").rfind("\n")]  # the statistics line and the newline before it
    return body
