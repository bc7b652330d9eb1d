"""Meta's original layout: params.json plus consolidated.NN.pth, one file per model-parallel shard.

Meta's q/k rows pair neighbouring dimensions for RoPE (interleaved); ours pair i with i + D/2
(rotate half), so q and k are permuted per head when loaded. GGUF files use Meta's order too.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from runner import checkpoint
from runner.config.errors import ConfigError, problem
from runner.config.schema import ModelSpec, RopeScaling
from runner.loaders.base import Progress

KEY = "model.checkpoint"
PARAMS = "params.json"
SHARD = re.compile(r"consolidated\.(\d+)\.pth")
IGNORED = {"rope.freqs"}  # Llama 1/2 store their RoPE table; we compute ours

# Model-parallel split axis of each weight: column-parallel layers split their output rows (0),
# row-parallel ones their input columns (1); None: replicated on every shard.
SPLIT = {"wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w3": 0, "w2": 1, "output": 0,
         "attention_norm": None, "ffn_norm": None, "norm": None}


def from_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's q/k rows (pairs 2i, 2i+1 per head) -> rotate-half order (pairs i, i + D/2)."""
    rows, cols = w.shape[0], w.shape[1:]
    # [heads, D/2, 2, ...] -> [heads, 2, D/2, ...]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *cols).transpose(1, 2).reshape(w.shape)


def ffn_hidden_size(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's SwiGLU width: 2/3 of 4 * dim, scaled, rounded up to a multiple of `multiple_of`."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def matches(path: Path) -> bool:
    return path.is_dir() and (path / PARAMS).is_file()


def read_spec(path: Path) -> dict:
    """The ModelSpec fields params.json declares (vocab size and tying from the weights)."""
    params = _params(path)
    missing = [k for k in ("dim", "n_layers", "n_heads") if k not in params]
    if missing:
        raise ConfigError([problem(str(path / PARAMS), KEY, f"lacks {', '.join(missing)}")])
    if "moe" in params or "sliding_window" in params:
        # Mistral's own consolidated layout (mistral-inference) for Mixtral, whose expert keys no
        # published description pins down; its HF directory or a GGUF file carries the same weights.
        raise ConfigError([problem(str(path / PARAMS), KEY, "is Mistral's consolidated mixture-of-experts or "
                                   "sliding-window layout, which is not supported; use the model's HF directory "
                                   "(config.json and safetensors) or a GGUF file")])
    first = _read_shard(_shards(path)[0])
    spec = dict(
        dim=params["dim"], n_layers=params["n_layers"], n_heads=params["n_heads"],
        n_kv_heads=params.get("n_kv_heads"),
        vocab_size=params.get("vocab_size", -1),
        intermediate_size=ffn_hidden_size(params["dim"], params.get("multiple_of", 256), params.get("ffn_dim_multiplier")),
        norm_eps=params.get("norm_eps", 1e-5),
        rope_theta=params.get("rope_theta", 10000.0),  # Llama 1/2 hard-code 10000 and do not write it
        tie_embeddings="output.weight" not in first,
    )
    if spec["vocab_size"] < 1:  # Llama 1/2 leave it to the tokenizer (-1)
        spec["vocab_size"] = _tensor(path, first, "tok_embeddings.weight").shape[0]
    if params.get("use_scaled_rope"):
        # Meta's reference code hard-codes the Llama-3.1 constants; later params.json may override two.
        defaults = RopeScaling()
        spec["rope_scaling"] = RopeScaling(factor=params.get("rope_scaling_factor") or defaults.factor,
                                           high_freq_factor=params.get("rope_high_freq_factor") or defaults.high_freq_factor)
    return spec


def load(path: Path, spec: ModelSpec, progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """Merge the model-parallel shards and convert to the native layout; progress is not called."""
    shards = [_read_shard(f) for f in _shards(path)]
    used = set(IGNORED)

    def merged(name: str, axis: int | None) -> torch.Tensor:
        used.add(name)
        parts = [_tensor(path, shard, name) for shard in shards]
        return parts[0] if axis is None or len(parts) == 1 else torch.cat(parts, dim=axis)

    def heads(name: str, n_heads: int) -> torch.Tensor:
        w = merged(name, 0)
        if w.ndim != 2 or w.shape[0] != n_heads * spec.head_size:
            raise ConfigError([problem(str(path), KEY, f"tensor {name!r} has shape {tuple(w.shape)} but the spec "
                                       f"(model.arch) needs {n_heads * spec.head_size} rows ({n_heads} heads of {spec.head_size})")])
        return from_interleaved(w, n_heads)

    # Llama 1/2 split the embedding's columns (ParallelEmbedding), Llama 3 its rows (VocabParallelEmbedding).
    embed_axis = 0 if _tensor(path, shards[0], "tok_embeddings.weight").shape[-1] == spec.dim else 1
    out = {"tok_embeddings.weight": merged("tok_embeddings.weight", embed_axis), "norm.weight": merged("norm.weight", None)}
    if not spec.tie_embeddings:
        out["output.weight"] = merged("output.weight", SPLIT["output"])
    for i in range(spec.n_layers):
        p = f"layers.{i}."
        q = heads(f"{p}attention.wq.weight", spec.n_heads)
        k = heads(f"{p}attention.wk.weight", spec.kv_heads)
        v = merged(f"{p}attention.wv.weight", SPLIT["wv"])
        out[f"{p}attention.wqkv.weight"] = torch.cat([q, k, v])
        out[f"{p}attention.wo.weight"] = merged(f"{p}attention.wo.weight", SPLIT["wo"])
        w1, w3 = (merged(f"{p}feed_forward.{w}.weight", SPLIT[w]) for w in ("w1", "w3"))
        out[f"{p}feed_forward.w13.weight"] = torch.cat([w1, w3])
        out[f"{p}feed_forward.w2.weight"] = merged(f"{p}feed_forward.w2.weight", SPLIT["w2"])
        out[f"{p}attention_norm.weight"] = merged(f"{p}attention_norm.weight", None)
        out[f"{p}ffn_norm.weight"] = merged(f"{p}ffn_norm.weight", None)
    unused = sorted(set(shards[0]) - used)
    if unused:
        raise ConfigError([problem(str(path), KEY, f"has {len(unused)} tensor(s) the spec (model.arch) does not use, "
                                   f"first {unused[0]!r}; check n_layers and tie_embeddings")])
    return out


def _params(path: Path) -> dict:
    try:
        params = json.loads((path / PARAMS).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError([problem(str(path / PARAMS), KEY, f"unreadable params.json ({e})")]) from None
    if not isinstance(params, dict):
        raise ConfigError([problem(str(path / PARAMS), KEY, "must hold a JSON object")])
    return params


def _shards(path: Path) -> list[Path]:
    """consolidated.00.pth ... consolidated.NN.pth, all of them, in order."""
    numbered = sorted((int(m.group(1)), f) for f in path.iterdir() if (m := SHARD.fullmatch(f.name)))
    if not numbered:
        raise ConfigError([problem(str(path), KEY, "has params.json but no consolidated.00.pth")])
    if [n for n, _ in numbered] != list(range(len(numbered))):
        raise ConfigError([problem(str(path), KEY, f"model-parallel shards must be numbered 00 to {len(numbered) - 1:02d} "
                                   f"without gaps; found {', '.join(f.name for _, f in numbered)}")])
    return [f for _, f in numbered]


def read_quant(path: Path) -> None:
    """None: Meta's checkpoints hold float weights."""
    return None


def _read_shard(file: Path) -> dict[str, torch.Tensor]:
    state = checkpoint.read(file)["state_dict"]
    bad = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise ConfigError([problem(str(file), KEY, f"entry {bad!r} is not a tensor; not a Meta state dict")])
    return state


def _tensor(path: Path, shard: dict, name: str) -> torch.Tensor:
    if name not in shard:
        raise ConfigError([problem(str(path), KEY, f"lacks tensor {name!r} the spec (model.arch) needs; "
                                   "check n_layers and tie_embeddings")])
    return shard[name]
