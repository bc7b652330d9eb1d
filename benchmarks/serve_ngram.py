"""N-gram drafts in the server: output tok/s of concurrent greedy chat requests of the n-gram
recipe's code-editing prompt (the answer repeats most of the prompt), served with draft.kind
ngram and with none, in one run.

    python benchmarks/serve_ngram.py [--clients 1,4] [--tokens 200] [--overrides "dtype=bfloat16"]

Each client sends one request after a warm-up one; tok/s is all clients' completion tokens over
the wall time of the batch.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from serve import free_port, stop, wait_ready  # noqa: E402

RECIPE = "recipes/smollm2-135m-ngram.yaml"


def rate(overrides: list[str], clients: int, tokens: int, prompt: str) -> float:
    """Output tok/s of `clients` concurrent requests on a server of the recipe with `overrides`."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "runner", "serve", RECIPE, *overrides, "--port", str(port), "--slots",
               str(max(clients, 1)), "--cache-len", "1024"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(url, process, "/health")
        counts = [0] * clients
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": tokens, "temperature": 0}

        def ask(i: int) -> None:
            r = httpx.post(url + "/v1/chat/completions", json=body, timeout=600)
            r.raise_for_status()
            counts[i] = r.json()["usage"]["completion_tokens"]

        ask(0)  # warm-up
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sum(counts) / (time.perf_counter() - start)
    finally:
        stop(process)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4])
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--overrides", default="dtype=bfloat16", help="key=value ... for the recipe (one string)")
    args = parser.parse_args()
    overrides = args.overrides.split()
    prompt = yaml.safe_load((ROOT / RECIPE).read_text())["generate"]["prompt"]
    print(f"{RECIPE} {args.overrides}, {args.tokens} tokens a request, {len(os.sched_getaffinity(0))} CPU threads")
    print("| clients | plain tok/s | n-gram drafts tok/s | drafts / plain |")
    print("|---:|---:|---:|---:|")
    for clients in args.clients:
        plain = rate([*overrides, "draft.kind=none"], clients, args.tokens, prompt)
        drafted = rate(overrides, clients, args.tokens, prompt)
        print(f"| {clients} | {plain:.1f} | {drafted:.1f} | {drafted / plain:.2f}x |")


if __name__ == "__main__":
    main()
