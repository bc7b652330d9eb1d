"""Tiny random Transformers and their logits, for the model-level tests."""
from collections.abc import Sequence

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


def as_gguf(model: Transformer, qtype: int | Sequence[int]) -> Transformer:
    """The model with each linear layer whose rows fill whole blocks replaced by a GGUF layer of
    `qtype` (a legacy type: the gguf package quantizes its weights); the embedding stays float.
    Several types split each layer's output rows into as many runs, one type each (parts)."""
    import gguf

    from runner.model.llama import Linear
    from runner.quant.gguf_layers import GGUFLinear
    from runner.quant.plan import replace

    qtypes = [qtype] if isinstance(qtype, int) else list(qtype)
    block = max(gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t)][0] for t in qtypes)
    for name, module in list(model.named_modules()):
        if isinstance(module, Linear) and module.in_features % block == 0:
            runs = module.weight.detach().float().tensor_split(len(qtypes))
            parts = [(t, torch.from_numpy(gguf.quants.quantize(rows.numpy(), gguf.GGMLQuantizationType(t))))
                     for t, rows in zip(qtypes, runs) if len(rows)]
            replace(model, name, GGUFLinear(module.in_features, parts))
    model.operands_changed()
    return model
