"""runner's CPU kernels against torch's ops, op by op, on SmolLM2-135M's decode shapes and a prompt's.

Each op is timed for one target build (RUNNER_KERNELS_TARGET) in its own process, against the
op `kernels: torch` would run, in the same process. To see what a CPU with only AVX2 gets from
torch as well, run with ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 (torch then takes its
AVX2 paths):

    python benchmarks/kernels.py --targets avx2,avx512-bf16 --json benchmarks/results/kernels.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIM, HIDDEN, VOCAB, HEADS, KV_HEADS, HEAD_DIM = 576, 1536, 49152, 9, 3, 64  # SmolLM2-135M


def median_us(fn, repeat: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def cases(dtype, cache_len: int):
    """(op, runner's call, torch's call) for one decode step's shapes, and a 512-token prompt's."""
    import torch
    import torch.nn.functional as F
    from runner.model import functional as fn
    from runner.model.llama import KVCache
    from runner.model.rope import Rope
    from runner.quant import int4, int8
    from runner.quant.matmuls import INT4_KERNELS, INT8_KERNELS

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, DIM, generator=g).to(dtype)
    out = []
    for name, n, k in (("wqkv", (HEADS + 2 * KV_HEADS) * HEAD_DIM, DIM), ("w13", 2 * HIDDEN, DIM),
                       ("w2", DIM, HIDDEN), ("output", VOCAB, DIM)):
        w = torch.randn(n, k, generator=g).to(dtype)
        xk = torch.randn(1, k, generator=g).to(dtype)
        out.append((f"linear {name} {n}x{k}", lambda w=w, xk=xk: torch.ops.runner.linear(xk, w),
                    lambda w=w, xk=xk: torch.nn.functional.linear(xk, w)))
        q8, s8 = int8.quantize(w.float())
        layer8 = type("L", (), {"weight": q8, "scales": s8.to(dtype)})()
        out.append((f"int8 {name}", lambda L=layer8, xk=xk: torch.ops.runner.int8_linear(xk, L.weight, L.scales),
                    lambda L=layer8, xk=xk: INT8_KERNELS["cpu" if dtype == torch.bfloat16 else "fallback"].matmul(xk, L)))
        levels, s4, z4 = int4.quantize(w.float(), 32)
        packed = int4.pack(levels)
        out.append((f"int4 {name}", lambda p=packed, s=s4.to(dtype), z=z4.to(dtype), xk=xk:
                    torch.ops.runner.int4_linear(xk, p, s, z, 32),
                    lambda w=w, xk=xk, p=packed, s=s4, z=z4: _torch_int4(xk, p, s, z, dtype)))
        out.append((f"int4 x int8 {name}", lambda p=packed, s=s4.to(dtype), z=z4.to(dtype), xk=xk:  # quant.activations: int8
                    torch.ops.runner.int4_linear(xk, p, s, z, 32, True),
                    lambda w=w, xk=xk, p=packed, s=s4, z=z4: _torch_int4(xk, p, s, z, dtype)))
    h = torch.randn(1, 1, DIM, generator=g).to(dtype)
    nw = torch.randn(DIM, generator=g).to(dtype)
    out.append(("rms_norm", lambda: torch.ops.runner.rms_norm(h, nw, 1e-5), lambda: fn.rms_norm(h, nw, 1e-5)))
    gu = torch.randn(1, 1, 2 * HIDDEN, generator=g).to(dtype)
    out.append(("swiglu", lambda: torch.ops.runner.swiglu(gu), lambda: fn.swiglu(gu)))
    cache = KVCache(1, KV_HEADS, cache_len, HEAD_DIM, dtype, "cpu")
    cache.k.normal_(generator=g), cache.v.normal_(generator=g)
    qkv = torch.randn(1, 1, (HEADS + 2 * KV_HEADS) * HEAD_DIM, generator=g).to(dtype)
    pos = torch.tensor([cache_len - 1])
    rope = Rope(HEAD_DIM, 10000.0, None, cache_len)
    rope.setup(cache_len, "cpu")
    cos_sin = rope(pos)
    mask = fn.causal_mask(pos, cache_len)
    out.append((f"attend over {cache_len}", lambda: torch.ops.runner.attend(qkv, cos_sin, cache.k, cache.v, pos, HEADS, KV_HEADS),
                lambda: fn.attend(qkv, cos_sin, cache, pos, mask, HEADS, KV_HEADS)))
    # A 512-token prompt: its attention against the causal flash attention torch's ops ran before,
    # and its row-wise ops.
    T = 512
    q = torch.randn(1, HEADS, T, HEAD_DIM, generator=g).to(dtype)
    k, v = (torch.randn(1, KV_HEADS, T, HEAD_DIM, generator=g).to(dtype) for _ in range(2))
    prompt = torch.arange(T)
    out.append((f"prompt attention {T}", lambda: torch.ops.runner.causal_attention(q, k, v, prompt),
                lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2)
                .reshape(1, T, -1)))
    hs = torch.randn(1, T, DIM, generator=g).to(dtype)
    out.append((f"rms_norm {T} rows", lambda: torch.ops.runner.rms_norm(hs, nw, 1e-5), lambda: fn.rms_norm(hs, nw, 1e-5)))
    gus = torch.randn(1, T, 2 * HIDDEN, generator=g).to(dtype)
    out.append((f"swiglu {T} rows", lambda: torch.ops.runner.swiglu(gus), lambda: fn.swiglu(gus)))
    return out


def _torch_int4(x, packed, scales, zeros, dtype):
    """What `kernels: torch` runs for an int4 layer: torch's int4 kernel in bf16, the fallback
    (dequantize, then a float matmul) in fp32."""
    import torch
    from runner.quant import int4
    if dtype == torch.bfloat16:
        key = (packed.data_ptr(), "cpu")
        if key not in _PACKED:
            levels = int4.unpack(packed).to(torch.int32)
            _PACKED[key] = (torch.ops.aten._convert_weight_to_int4pack_for_cpu(levels, 1),
                            int4.scales_and_zeros(scales, zeros).to(dtype))
        w, sz = _PACKED[key]
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, w, 32, sz)
    return torch.nn.functional.linear(x, int4.dequantize(int4.unpack(packed), scales, zeros))


_PACKED: dict = {}


def child(threads: int, repeat: int, cache_lens: list[int]) -> None:
    import torch
    from runner import kernels
    torch.set_num_threads(threads)
    target = kernels.load()
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for cache_len in cache_lens:
            for op, ours, theirs in cases(dtype, cache_len):
                if cache_len != cache_lens[0] and not op.startswith("attend"):
                    continue
                rows.append({"target": target, "dtype": str(dtype).removeprefix("torch."), "op": op,
                             "runner_us": median_us(ours, repeat), "torch_us": median_us(theirs, repeat)})
    json.dump({"target": target, "torch_capability": torch.backends.cpu.get_cpu_capability(), "rows": rows},
              sys.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default="avx2,avx512-bf16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--cache-lens", default="64,600")
    parser.add_argument("--json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    lens = [int(n) for n in args.cache_lens.split(",")]
    if args.child:
        return child(args.threads, args.repeat, lens)
    results = []
    for target in args.targets.split(","):
        env = {**os.environ, "RUNNER_KERNELS_TARGET": target}
        done = subprocess.run([sys.executable, __file__, "--child", "--threads", str(args.threads), "--repeat",
                               str(args.repeat), "--cache-lens", args.cache_lens], env=env, cwd=ROOT,
                              capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{target}: {done.stderr.strip().splitlines()[-1]}")
        results.append(json.loads(done.stdout))
    print(f"{'target':12} {'torch':8} {'dtype':9} {'op':28} {'runner us':>10} {'torch us':>10} {'ratio':>6}")
    for result in results:
        for r in result["rows"]:
            print(f"{r['target']:12} {result['torch_capability']:8} {r['dtype']:9} {r['op']:28} "
                  f"{r['runner_us']:10.1f} {r['torch_us']:10.1f} {r['torch_us'] / r['runner_us']:6.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
