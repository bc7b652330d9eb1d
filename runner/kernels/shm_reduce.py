"""The collectives of tensor-parallel ranks on one machine, through shared memory (shm_reduce.cpp).

runner.sharders.shm makes the segment and a ShmGroup on every rank; runner.sharders puts it after
each row-parallel layer (and the output layer, when split), and KernelOps.decode_layers finds it
there to sum in its own call.
"""
from __future__ import annotations

import torch
from torch import nn

DTYPES = (torch.float32, torch.bfloat16)  # what the all-reduce sums; the group's backend sums the rest


class ShmGroup(nn.Module):
    """Rank `rank` of `world_size` in collectives through `segment` (a uint8 tensor over shared
    memory that every rank has mapped and joined). Every rank must make the same calls, with the
    same shapes, in the same order (ranks run the same steps). A module, so that the layers holding
    it can be found by those who sum for them (KernelOps.decode_layers)."""

    def __init__(self, segment: torch.Tensor, rank: int, world_size: int):
        super().__init__()
        # A plain attribute, not a buffer: moving or casting the model must never copy it.
        self.segment, self.rank, self.world_size = segment, rank, world_size

    @staticmethod
    def sums(x: torch.Tensor) -> bool:
        """Whether all_reduce takes `x`."""
        return x.device.type == "cpu" and x.dtype in DTYPES

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's x, in rank order in fp32, rounded once: the same on every rank."""
        return torch.ops.runner.shm_all_reduce(x, self.segment, self.rank, self.world_size)

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's x (on the CPU) side by side along the last dimension, in rank order."""
        parts = torch.ops.runner.shm_all_gather(x, self.segment, self.rank, self.world_size)  # [W, ..., n]
        return parts.movedim(0, -2).reshape(*x.shape[:-1], -1)  # [..., W * n]


def join(segment: torch.Tensor, rank: int, world_size: int, timeout_s: float) -> ShmGroup:
    """Rank `rank`'s ShmGroup over `segment`, its pid written there so that its peers can tell if it
    dies, and how long it waits for a peer (runner.kernels must be loaded)."""
    torch.ops.runner.shm_join(segment, rank, world_size, timeout_s)
    return ShmGroup(segment, rank, world_size)
