"""Tiny random Transformers and their logits, for the model-level tests."""
import torch

from runner.checkpoint import random_state_dict
from runner.config.schema import ModelSpec
from runner.model.llama import Transformer


def float_model(spec: ModelSpec, seed: int, dtype=torch.float32) -> Transformer:
    model = Transformer(spec)
    model.load_state_dict(random_state_dict(spec, seed))
    return model.to(dtype).eval()


def prompts(spec: ModelSpec, seed: int, batch: int = 4, length: int = 24) -> torch.Tensor:
    return torch.randint(0, spec.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, vocab] of a whole prompt in one prefill."""
    model.setup_cache(tokens.shape[0], tokens.shape[1])
    with torch.no_grad():
        return model(tokens, torch.arange(tokens.shape[1]))
