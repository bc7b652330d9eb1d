"""The shared-memory collectives of ranks on one machine (runner.sharders.shm, shm_reduce.cpp).

Against gloo on the same inputs: for every world size, each rank's sum is bit for bit the fp32 sum
in rank order rounded once to the dtype, on every rank; for 2 ranks that is gloo's own result (one
rounding of the exact sum), and for 3 or 4, whose gloo sums in another order (and bf16 with a
rounding at each step), the two agree within 2 (world_size - 1) u sum(|x_r|), u the dtype's unit
roundoff (2^-24 fp32, 2^-8 bf16): each is within (world_size - 1) u sum(|x_r|) of the exact sum.
All-gathers give the ranks' tensors side by side. Many calls of many sizes in a row, some larger
than a slot, with ranks running ahead of each other, exercise the double buffering.

A sharded model decodes the same logits through the shared memory as through gloo, and runner's
fused decode step (its all-reduces in its own call) the same as the layers one by one, compiled
or not. A rank killed or raising, or Ctrl-C, ends the run within seconds, with no
/dev/shm/runner-* file and no process left, even when a rank dies between making the segment and
removing its file.
"""
from __future__ import annotations

import os
import random
import select
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from runner.parallel import SHM, Rank
from tests.tp.test_launch import finish, start, survivors

pytestmark = pytest.mark.tp
SPAWN_LIMIT = 300  # seconds the ranks of one spawned test may take
FAILS_WITHIN = 30
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8}


def leftovers() -> set[str]:
    return {p.name for p in SHM.glob("runner-*")}


def left_since(before: set[str]) -> set[str]:
    """runner-* files made since `before` and still there a few seconds on: another run's (runner's
    own tests beside these) lasts milliseconds."""
    for _ in range(10):
        left = leftovers() - before
        if not left:
            break
        time.sleep(0.5)
    return left


def spawn(fn, world_size: int, *args) -> None:
    """fn(rank, world_size, *args) on `world_size` ranks of a gloo group, each in its own process;
    a rank's exception fails the test with its traceback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.start_processes(_rank, args=(fn, world_size, port, args), nprocs=world_size, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + SPAWN_LIMIT
    try:
        while not context.join(timeout=1):
            assert time.monotonic() < deadline, f"the ranks ran past {SPAWN_LIMIT} s"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


def _rank(rank: int, fn, world_size: int, port: int, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    try:
        fn(rank, world_size, *args)
    finally:
        torch.distributed.destroy_process_group()


def _shared(rank: int, world_size: int):
    from runner.sharders import shm

    shared = shm.open_segment(Rank(rank, world_size, world_size))
    assert shared is not None, "a gloo group on one machine sums through shared memory"
    return shared


# --- the sum against gloo's ---------------------------------------------------------------------


def _inputs(call: int, rank: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    """Rank `rank`'s tensor for call `call`: values of mixed magnitudes, any rank can make any rank's."""
    g = torch.Generator().manual_seed(call * 1009 + rank)
    return (torch.randn(n, generator=g) * torch.exp2(torch.randint(-6, 7, (n,), generator=g).float())).to(dtype)


def _sums(rank: int, world_size: int, calls: int) -> None:
    from runner.sharders import shm

    shared = _shared(rank, world_size)
    slot = shm.SLOT_BYTES
    sizes = [1, 3, 768, 2304, 4096, slot // 4 - 1, slot // 4 + 5, slot // 2 + 7, 3 * slot // 4]  # up to 3 slots a call
    plan = random.Random(7)  # the same calls on every rank
    pace = random.Random(rank)  # each rank's own pace: now one runs ahead, now another
    for call in range(calls):
        n, dtype = plan.choice(sizes), plan.choice([torch.float32, torch.bfloat16])
        if pace.random() < 0.2:
            time.sleep(pace.random() * 0.005)
        x = _inputs(call, rank, n, dtype)
        ours = shared.all_reduce(x)
        theirs = x.clone()
        torch.distributed.all_reduce(theirs)
        parts = [_inputs(call, r, n, dtype).float() for r in range(world_size)]
        in_order = parts[0].clone()
        for part in parts[1:]:
            in_order += part
        assert ours.dtype == dtype and ours.shape == x.shape
        assert torch.equal(ours, in_order.to(dtype)), (call, n, dtype)
        if world_size == 2:
            assert torch.equal(ours, theirs), (call, n, dtype)
        else:
            bound = 2 * (world_size - 1) * UNIT_ROUNDOFF[dtype] * sum(part.abs() for part in parts)
            assert ((ours.float() - theirs.float()).abs() <= bound).all(), (call, n, dtype)
        if plan.random() < 0.3:  # an all-gather between the sums, through the same slots: rows side by side
            rows = 3 if n % 3 == 0 else 1
            gathered = shared.all_gather(x.view(rows, -1))
            expected = torch.cat([_inputs(call, r, n, dtype).view(rows, -1) for r in range(world_size)], dim=-1)
            assert torch.equal(gathered, expected), (call, n, dtype)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_shared_sum_is_gloos_sum_over_many_calls_of_many_sizes(world_size):
    """With all-gathers among the sums."""
    before = leftovers()
    spawn(_sums, world_size, 60 if world_size == 2 else 25)
    assert left_since(before) == set()


def _refuses(rank: int, world_size: int) -> None:
    shared = _shared(rank, world_size)
    with pytest.raises(RuntimeError, match="float32 or bfloat16 only"):
        shared.all_reduce(torch.ones(3, dtype=torch.float16))
    assert not shared.sums(torch.ones(3, dtype=torch.float16))  # runner.sharders.AllReduce: gloo sums those


def test_shared_sum_refuses_other_dtypes_before_any_rank_publishes():
    spawn(_refuses, 2)


# --- a sharded model through the shared memory --------------------------------------------------


def _decode(rank: int, world_size: int, dtype: torch.dtype, through: str) -> torch.Tensor:
    """Logits of a prompt then 8 one-token steps of a sharded model, summed `through` "gloo", "shm"
    (each layer's calls; the output layer split, its logits gathered) or "fused" (runner's decode
    step)."""
    from runner import kernels, sharders
    from runner.config.schema import ModelSpec
    from runner.model.llama import Transformer
    from runner.sharders import shm
    from tests.tp.pool import weights

    spec = ModelSpec(dim=256, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=512, intermediate_size=512,
                     max_seq_len=64)
    model = Transformer(spec)
    model.load_state_dict(weights(spec, 0))
    model = model.to(dtype).eval()
    if through == "gloo":
        original, shm.open_segment = shm.open_segment, lambda rank: None
    sharders.shard(model, sharders.plan(spec, world_size), Rank(rank, world_size, world_size))
    if through == "gloo":
        shm.open_segment = original
    kernels.load()
    ops = kernels.KernelOps()
    model.use_ops(ops)
    if through == "shm":
        ops.decode_layers = lambda *args: None  # each layer's own calls
    model.setup_cache(1, spec.max_seq_len)
    plan = kernels.KernelOps().plan(model, dtype)
    assert (plan is not None and plan.shared is not None) == (through != "gloo")
    assert isinstance(model.output, sharders.GatherLogits) == (through != "gloo")  # split by vocabulary rows
    tokens = torch.tensor([[5, 17, 300, 2, 9]])
    out = [model(tokens, torch.arange(5))[0, -1]]
    for pos in range(5, 13):
        out.append(model(out[-1].argmax().view(1, 1), torch.tensor([pos]))[0, -1])
    return torch.stack(out)


def _compare_ways(rank: int, world_size: int, dtype: torch.dtype) -> None:
    with torch.no_grad():
        ways = {through: _decode(rank, world_size, dtype, through) for through in ("gloo", "shm", "fused")}
    assert torch.equal(ways["shm"], ways["gloo"]), dtype
    assert torch.equal(ways["fused"], ways["shm"]), dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sharded_model_decodes_the_same_logits_through_shared_memory_as_through_gloo(dtype):
    """Two ranks: the same sums as gloo's, and each logit from the same rows of the output layer,
    so the same logits, bit for bit; and runner's fused decode step, summing in its own call, the
    same as the layers' calls one by one."""
    before = leftovers()
    spawn(_compare_ways, 2, dtype)
    assert left_since(before) == set()


def test_compiled_fused_decode_step_under_tp_equals_the_unsharded_model():
    """torch.compile traces runner's fused decode step with its shared-memory all-reduces, the
    prompt's all-reduces on their own, and the gathered logits of the split output layer; one
    case, since compiling is slow."""
    from runner.config.schema import ModelSpec
    from tests.tp.pool import RankPool
    from tests.tp.test_sharded import assert_same, reference_of

    spec = ModelSpec(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=98, intermediate_size=128, max_seq_len=128,
                     tie_embeddings=True)
    job = dict(spec=spec, seed=3, tokens=torch.arange(1, 20), greedy=16, chunks=[4, 4], kernels=True)
    reference = reference_of(job)
    before = leftovers()
    pool = RankPool(2)
    try:
        assert_same(pool.run(dict(job, compile=True)), reference)
    finally:
        pool.close()
    assert left_since(before) == set()


# --- failures: nothing left behind ----------------------------------------------------------------


def _runner_run(*args: str):
    began = time.monotonic()
    return finish(*start([sys.executable, *args]), began)


def assert_ended_cleanly(result, before: set[str], last_line: str) -> None:
    assert result.returncode == 1, result.stderr
    assert result.seconds < FAILS_WITHIN, result.seconds
    assert result.stderr.splitlines()[-1].startswith(last_line), result.stderr
    assert "Traceback" not in result.stderr
    assert survivors(result.marker) == []
    assert left_since(before) == set()


@pytest.mark.parametrize("how, last_line", [("raise", "error: RuntimeError: boom"), ("kill", "error: rank 1 was killed")])
def test_a_rank_failing_while_its_peer_waits_in_the_shared_sum_ends_the_run_cleanly(how, last_line):
    """tests/tp/tasks.py: rank 1 raises, or is killed, at its 4th forward while rank 0 waits in an
    all-reduce through the shared memory: the failing rank is named, within seconds."""
    before = leftovers()
    result = _runner_run("-c", "from tests.tp.tasks import main; main()", how)
    assert_ended_cleanly(result, before, last_line)


def main_killed_before_unlink() -> None:
    """The tiny recipe on 2 ranks, rank 0 killed right after it made the segment's file: the
    launcher removes the file."""
    from runner import parallel
    from runner.config.errors import RankFailed
    from runner.recipes import load as resolve
    from tests.tp.tasks import RECIPE

    resolved = resolve(RECIPE, ["parallel.world_size=2", "generate.temperature=0", "generate.max_new_tokens=4"],
                       check_files=True)
    try:
        parallel.launch(parallel.as_rank, (_generate_killed_before_unlink, resolved, RECIPE), 2)
    except RankFailed as e:
        print(e.message, file=sys.stderr)
        sys.exit(e.exit_code)


def _generate_killed_before_unlink(rank, resolved, recipe: str) -> None:
    from runner import generate
    from runner.sharders import shm

    if rank.rank == 0:
        make = shm._map

        def make_and_die(path: Path, size: int | None = None):
            made = make(path, size)
            assert path.exists()
            os.kill(os.getpid(), signal.SIGKILL)
            return made

        shm._map = make_and_die
    generate.run(rank, resolved, recipe)


def test_a_rank_killed_between_making_the_segment_and_removing_its_file_leaves_nothing():
    before = leftovers()
    result = _runner_run("-c", "from tests.tp.test_shm import main_killed_before_unlink; main_killed_before_unlink()")
    assert_ended_cleanly(result, before, "error: rank 0 was killed")


def test_ctrl_c_mid_generation_leaves_nothing():
    """SIGINT to the whole session (a terminal's Ctrl-C) once rank 0 prints generated text: exit
    130, no process and no file left."""
    before = leftovers()
    began = time.monotonic()
    proc, marker = start([sys.executable, "-m", "runner", "recipes/tiny-random.yaml", "parallel.world_size=2",
                          "generate.max_new_tokens=490", "generate.num_samples=100", "generate.temperature=0"])
    ready, _, _ = select.select([proc.stdout], [], [], FAILS_WITHIN * 2)  # the ranks generate
    assert ready, "no text within a minute"
    os.killpg(proc.pid, signal.SIGINT)
    result = finish(proc, marker, began)
    assert result.returncode == 130, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert survivors(marker) == []
    assert left_since(before) == set()
