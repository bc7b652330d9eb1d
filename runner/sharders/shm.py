"""Shared memory for the all-reduces of ranks that all run on this machine.

gloo's all-reduce between local processes goes through sockets and costs a millisecond or more;
a decode step makes two a layer. Where every rank of a gloo group is on this machine (runner's own
launch, or torchrun on one node), they sum through a segment of shared memory instead
(runner.kernels.shm_reduce). Elsewhere (ranks on several machines, NCCL on CUDA) the group's own
all-reduce stays.

Making one is a collective: rank 0 creates a file in /dev/shm named after the launcher's run id,
every rank maps it and joins it, and once all have, rank 0 removes the file. The mappings outlive
the file, and last as long as the model that holds them: from then on nothing can be left
behind, whatever happens to the ranks. A file left by a rank that died before then is removed by
the launcher (runner.parallel.launch).
"""
from __future__ import annotations

import mmap
import os
import uuid

import torch

from runner import kernels, parallel
from runner.kernels.shm_reduce import ShmGroup, join
from runner.parallel import Rank

SLOT_BYTES = 1 << 20  # each of a rank's two slots; a larger tensor is summed a slot at a time
LINE_BYTES = 64  # a rank's line in the segment's header (shm_reduce.cpp; the slots take the rest)


def applies(rank: Rank) -> bool:
    """Whether `rank`'s group (joined) sums through shared memory: a gloo group whose ranks are
    all on this machine, where runner's kernels load."""
    if not (torch.distributed.get_backend() == "gloo" and rank.local_world_size == rank.world_size
            and parallel.SHM.is_dir()):
        return False
    try:
        kernels.load()
    except kernels.KernelsUnavailable:
        return False
    return True


def open_segment(rank: Rank) -> ShmGroup | None:
    """This rank's shared-memory collectives over a new segment, or None where the group's backend
    stays (or no group was joined: a model sharded to look at). Every rank of the group calls it
    at the same point: it is a collective."""
    if not torch.distributed.is_initialized():
        return None
    usable = [None] * rank.world_size
    torch.distributed.all_gather_object(usable, applies(rank))  # every rank, or none
    if not all(usable):
        return None
    name = [f"{parallel.shm_prefix(rank.run_id)}{uuid.uuid4().hex[:12]}" if rank.main else None]
    try:
        if rank.main:
            segment = _map(parallel.SHM / name[0], LINE_BYTES * rank.world_size + 2 * rank.world_size * SLOT_BYTES)
        torch.distributed.broadcast_object_list(name, src=0)
        if not rank.main:
            segment = _map(parallel.SHM / name[0])
        group = join(segment, rank.rank, rank.world_size, parallel.TIMEOUT.total_seconds())
        torch.distributed.barrier()  # every rank has mapped and joined it
    finally:
        if rank.main:
            (parallel.SHM / name[0]).unlink(missing_ok=True)
    return group


def _map(path, size: int | None = None) -> torch.Tensor:
    """The file at `path` mapped into this process as a uint8 tensor; created, `size` bytes, if a
    size is given. The tensor keeps the mapping alive."""
    create = size is not None
    fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
    try:
        if create:
            os.posix_fallocate(fd, 0, size)  # no space in /dev/shm is an error here, not a SIGBUS later
        memory = mmap.mmap(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    return torch.frombuffer(memory, dtype=torch.uint8)
