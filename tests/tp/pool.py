"""A pool of ranks that stays up across hypothesis examples: spawning a gloo group costs seconds,
a tiny model's forward milliseconds.

Each job (a dict) runs on every rank through `run_job`, with the model sharded over the pool's
ranks; rank 0's result comes back. `run_job(job)` outside the pool is the unsharded reference.
"""
from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp

from runner import sharders
from runner.parallel import Rank
from runner.config.schema import ModelSpec, QuantMode, QuantSection
from runner.model.llama import Transformer


def weights(spec: ModelSpec, seed: int) -> dict[str, torch.Tensor]:
    """Random weights large enough that logits are O(1..10): a wrong share or a missing sum shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(spec).state_dict().items()}
    out = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            out[name] = 1 + 0.3 * torch.randn(shape, generator=g)
        else:
            out[name] = torch.randn(shape, generator=g) * 1.5 / shape[-1] ** 0.5
    return out


def build(job: dict, rank: int = 0, world_size: int = 1) -> Transformer:
    spec = job["spec"]
    model = Transformer(spec)
    model.load_state_dict(weights(spec, job["seed"]))
    model = model.float().eval()
    if job.get("quant"):
        from runner import quant

        mode, groupsize = job["quant"]
        quant.quantize(model, QuantSection(mode=QuantMode(mode), groupsize=groupsize))
    if job.get("gguf"):  # GGUF blocks of this type (quant.mode gguf), made whole, then sharded
        from tests.quant.helpers import as_gguf

        as_gguf(model, job["gguf"])
    if world_size > 1:
        sharders.shard(model, sharders.plan(spec, world_size), Rank(rank, world_size, world_size))
    if job.get("kernels"):  # runner's CPU kernels (each layer's own calls: the all-reduce sits between them)
        from runner import kernels

        kernels.load()
        model.use_ops(kernels.KernelOps())
        if job.get("gguf"):
            from runner import quant

            quant.pack_for(model, "cpu", "runner")
    model.int8_cache = bool(job.get("int8_cache"))  # quant.kv_cache: int8, each rank its own kv heads
    model.setup_cache(1, spec.max_seq_len)
    return model


@torch.no_grad()
def run_job(job: dict, rank: int = 0, world_size: int = 1) -> dict[str, torch.Tensor]:
    """Logits [T, V] of the prompt three ways (one prefill, one token at a time, in chunks), and
    greedy tokens after it."""
    model = build(job, rank, world_size)
    tokens = job["tokens"]  # [T]
    forward = model
    if job.get("compile"):
        from runner.config.schema import CompileSection
        from runner.transforms.compile import compiled_forward

        forward = compiled_forward(model, CompileSection(decode=True, prefill=True), "test")
    n = len(tokens)
    out = {"prefill": forward(tokens[None], torch.arange(n))[0]}
    steps = [forward(tokens[None, i:i + 1], torch.tensor([i]))[0, 0] for i in range(n)]
    out["decode"] = torch.stack(steps)
    chunks, start = [], 0
    for size in job["chunks"]:
        size = min(size, n - start)
        if size <= 0:
            break
        chunks.append(forward(tokens[None, start:start + size], torch.arange(start, start + size))[0])
        start += size
    if start < n:
        chunks.append(forward(tokens[None, start:], torch.arange(start, n))[0])
    out["chunks"] = torch.cat(chunks)
    greedy, logits = [], out["prefill"][-1]
    for pos in range(n, n + job["greedy"]):
        token = int(logits.argmax())
        greedy.append(token)
        logits = forward(torch.tensor([[token]]), torch.tensor([pos]))[0, 0]
    out["greedy"] = torch.tensor(greedy, dtype=torch.long)
    return out


def _worker(rank: int, world_size: int, port: int, conn) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    try:
        while (job := conn.recv()) is not None:
            try:
                result = run_job(job, rank, world_size)
            except Exception as e:  # noqa: BLE001: the test sees it as the result
                result = e
            conn.send(result if rank == 0 else None)
    finally:
        torch.distributed.destroy_process_group()


class RankPool:
    def __init__(self, world_size: int):
        ctx = mp.get_context("spawn")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.conns, self.procs = [], []
        for rank in range(world_size):
            here, there = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(rank, world_size, port, there), daemon=True)
            proc.start()
            self.conns.append(here)
            self.procs.append(proc)

    def run(self, job: dict) -> dict[str, torch.Tensor]:
        for conn in self.conns:
            conn.send(job)
        results = [conn.recv() for conn in self.conns]
        if isinstance(results[0], Exception):
            raise results[0]
        return results[0]

    def close(self) -> None:
        for conn in self.conns:
            conn.send(None)
        for proc in self.procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
