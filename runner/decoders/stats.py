"""What a decoder measured, for the reporter to print."""
from __future__ import annotations

import resource
import sys
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Stats:
    prompt_tokens: int
    new_tokens: int
    time_to_first_token: float  # seconds: prefill plus the first sample
    decode_seconds: float  # from the first token to the last
    peak_memory_bytes: int
    speculative: object = None  # SpeculativeStats for speculative decoders

    @property
    def tokens_per_second(self) -> float:
        """Decode speed: tokens after the first over the time they took."""
        if self.new_tokens < 2 or self.decode_seconds <= 0:
            return float("nan")
        return (self.new_tokens - 1) / self.decode_seconds


def peak_memory(device: torch.device) -> int:
    """Peak bytes: CUDA's allocator peak on a GPU, the process's peak RSS otherwise."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        # This process image's own peak: ru_maxrss would carry a spawning parent's across exec
        # (a tensor-parallel rank would report the launcher's peak).
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB
