"""lm-eval's language-model interface on a built runner pipeline.

Scoring (loglikelihood, loglikelihood_rolling) runs the pipeline's model in padded batches
(runner.eval.scoring); generation (generate_until) runs the pipeline's decoder, so speculative,
quantized and compiled recipes are evaluated as they run. Token conventions follow lm-eval's
HFLM, so a task scores the same here as on transformers: the context/continuation split of
TemplateLM, an empty context replaced by the prefix token (BOS, else EOS), rolling windows of
the model's max_seq_len from lm_eval.utils.
"""
from __future__ import annotations

from typing import Callable

import torch
from lm_eval import utils
from lm_eval.api.model import TemplateLM

from runner.eval.scoring import score
from runner.text import TextStream

Bar = Callable[[str], Callable[[int, int], None]]
MAX_GEN_TOKS = 256  # lm-eval's default, when a task names none


class RunnerLM(TemplateLM):
    """A runner pipeline (runner.pipeline.Pipeline) as an lm-eval model."""

    def __init__(self, pipeline, batch_size: int = 8, bar: Bar | None = None):
        super().__init__()
        self.pipeline = pipeline
        self.model = pipeline.model
        self.runner_tokenizer = pipeline.tokenizer
        self.batch_size = batch_size
        self.bar = bar or (lambda label: lambda done, total: None)

    @property
    def max_length(self) -> int:
        return self.model.spec.max_seq_len

    @property
    def eot_token_id(self) -> int:
        eos = sorted(self.runner_tokenizer.eos_ids)
        if not eos:
            raise ValueError("the tokenizer has no EOS token; set tokenizer.eos")
        return eos[0]

    @property
    def prefix_token_id(self) -> int:
        bos = self.runner_tokenizer.bos_id
        return self.eot_token_id if bos is None else bos

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # None: what the tokenizer's files ask for (HFLM's default), as runner's bos=True means.
        return self.runner_tokenizer.encode(string, bos=add_special_tokens is not False)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.runner_tokenizer.decode(tokens)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        # lm-eval's own tokenizing bar would print even into a log; ours shows while scoring, on a terminal.
        return super().loglikelihood(requests, disable_tqdm=True)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        pairs = [(context, continuation) for _, context, continuation in requests]
        return score(self.model, pairs, self.batch_size, self.bar("scoring"))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood in disjoint windows of max_seq_len tokens, lm-eval's way."""
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for window in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append(window)
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, score(self.model, windows, self.batch_size, self.bar("scoring texts"))):
            totals[i] += logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or the recipe's sampling) continuations through the pipeline's decoder, cut at
        the first stop string (never included) or after max_gen_toks tokens."""
        decoder = self.pipeline.decoder
        jobs = []
        for req in requests:
            context, kwargs = req.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            new = int(kwargs.get("max_gen_toks", MAX_GEN_TOKS))
            room = self.max_length - decoder.positions(0, new)
            if room < 1:
                raise ValueError(f"max_gen_toks={new} leaves no room for a prompt in max_seq_len={self.max_length}")
            jobs.append((self.tok_encode(context)[-room:], until, new))
        if not jobs:
            return []
        # One cache size for every request: compiled steps see one shape, and the batched
        # scoring's cache (batch B) is replaced by a batch-1 one.
        decoder.reserve(min(self.max_length, max(decoder.positions(len(ids), new) for ids, _, new in jobs)))
        seed = self.pipeline.recipe.generate.seed
        bar = self.bar("generating")
        out = []
        for n, (ids, until, new) in enumerate(jobs):
            out.append(self._generate(ids, until, new, torch.Generator(decoder.device).manual_seed(seed + n)))
            bar(n + 1, len(jobs))
        return out

    def _generate(self, ids: list[int], until: list[str], new: int, generator: torch.Generator) -> str:
        stream = TextStream(self.runner_tokenizer, until)
        text = []

        def on_token(token: int) -> bool:
            text.append(stream.push(token))
            return stream.done

        self.pipeline.decoder.generate(ids, new, self.runner_tokenizer.eos_ids, generator, on_token)
        return "".join(text) + stream.flush()
