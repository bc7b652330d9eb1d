"""Log-likelihoods of continuations, many sequences at a time, over the model's static KV cache.

A batch is right-padded: a causal mask never lets a real token see the padding after it, so
every row shares one input_pos. Long batches run in chunks of positions (the cache keeps what
came before), so the logits in memory stay [B, chunk, vocab], never [B, T, vocab].
"""
from __future__ import annotations

from typing import Callable

import torch

ROWS = 1024  # logit rows (batch x positions) one forward may produce: 200 MB of float32 at a 49k vocabulary
TOKENS = 16384  # cached positions a batch may hold (SmolLM2's KV cache: 45 KB a position in float32)


def targets(context: list[int], continuation: list[int], max_len: int) -> tuple[list[int], int]:
    """The model's input and how many of its last positions predict the continuation.

    lm-eval's convention (HFLM): the sequence is context + continuation, cut on the left to
    max_len + 1 tokens; the input is all of it but the last token, and position j predicts
    token j + 1, so the continuation's logits are the input's last len(continuation) positions.
    """
    whole = (context + continuation)[-(max_len + 1):]
    return whole, min(len(continuation), len(whole) - 1)


@torch.inference_mode()
def score(model: torch.nn.Module, requests: list[tuple[list[int], list[int]]], batch_size: int,
          bar: Callable[[int, int], None] | None = None,
          argmax: list[torch.Tensor] | None = None) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), whether greedy decoding would write it) per request.

    Requests run longest first in batches of `batch_size` right-padded rows; the model's cache is
    set up for each batch's shape. Given a list, `argmax` receives each request's argmax token at
    its continuation's positions, in request order.
    """
    max_len = model.spec.max_seq_len
    device = next(model.parameters()).device
    prepared = [targets(c, t, max_len) for c, t in requests]
    order = sorted(range(len(prepared)), key=lambda i: -len(prepared[i][0]))
    results: list[tuple[float, bool]] = [(0.0, True)] * len(prepared)
    tops: list[torch.Tensor] = [torch.empty(0)] * len(prepared)
    done = start = 0
    while start < len(order):
        # Longest first: the first row sets the batch's length, and long rows come fewer at a time.
        rows = order[start:start + max(1, min(batch_size, TOKENS // len(prepared[order[start]][0])))]
        start += len(rows)
        batch = [prepared[i] for i in rows]
        length = max(len(whole) - 1 for whole, _ in batch)
        tokens = torch.zeros(len(rows), length, dtype=torch.long)  # [B, T] inputs, right-padded
        wanted = torch.zeros(len(rows), length, dtype=torch.long)  # [B, T] the token each position predicts
        scored = torch.zeros(len(rows), length, dtype=torch.bool)  # [B, T] positions inside the continuation
        for r, (whole, n) in enumerate(batch):
            t = len(whole) - 1
            tokens[r, :t] = torch.tensor(whole[:-1])
            wanted[r, :t] = torch.tensor(whole[1:])
            scored[r, t - n:t] = True
        logprob, greedy, top = _score_batch(model, tokens.to(device), wanted.to(device), scored.to(device))
        for r, i in enumerate(rows):
            results[i] = (logprob[r], greedy[r])
            tops[i] = top[r][scored[r].cpu()]
        done += len(rows)
        if bar is not None:
            bar(done, len(prepared))
    if argmax is not None:
        argmax.extend(tops)
    return results


def _score_batch(model, tokens: torch.Tensor, wanted: torch.Tensor,
                 scored: torch.Tensor) -> tuple[list[float], list[bool], torch.Tensor]:
    """Sums of log-probabilities of `wanted` at the `scored` positions, whether each was the
    argmax, and the argmaxes [B, T] (on the CPU)."""
    batch, length = tokens.shape
    model.setup_cache(batch, length)
    chunk = max(1, ROWS // batch)
    total = torch.zeros(batch, dtype=torch.float64, device=tokens.device)
    greedy = torch.ones(batch, dtype=torch.bool, device=tokens.device)
    top = torch.zeros(batch, length, dtype=torch.long)
    for lo in range(0, length, chunk):
        hi = min(lo + chunk, length)
        logits = model(tokens[:, lo:hi], torch.arange(lo, hi, device=tokens.device)).float()  # [B, C, V]
        mask = scored[:, lo:hi]
        if not mask.any():
            continue
        logp = torch.log_softmax(logits, dim=-1).gather(-1, wanted[:, lo:hi, None])[..., 0]  # [B, C]
        best = logits.argmax(-1)  # [B, C]
        total += torch.where(mask, logp, 0.0).sum(-1, dtype=torch.float64)
        greedy &= torch.where(mask, best == wanted[:, lo:hi], True).all(-1)
        top[:, lo:hi] = best.cpu()
    return total.tolist(), greedy.tolist(), top
