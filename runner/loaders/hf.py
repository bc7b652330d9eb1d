"""An HF transformers directory: config.json plus safetensors or pytorch_model*.bin, single or sharded."""
from __future__ import annotations

import json
from collections import ChainMap
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from runner import checkpoint
from runner.config.errors import ConfigError, problem
from runner.config.schema import ModelSpec, RopeScaling
from runner.loaders.base import Progress
from runner.loaders.hf_layout import from_hf, per_expert, to_hf
from runner.model.llama import Transformer

KEY = "model.checkpoint"
CONFIG = "config.json"
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "mixtral": "MixtralForCausalLM"}  # model_type -> class
# Weight files in the order transformers itself prefers them.
WEIGHTS = (("model.safetensors.index.json", "model.safetensors"), ("pytorch_model.bin.index.json", "pytorch_model.bin"))
IGNORED_SUFFIX = "rotary_emb.inv_freq"  # a buffer old transformers saved; we compute our own


def matches(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG).is_file()


def read_spec(path: Path) -> dict:
    """The ModelSpec fields config.json declares; other model types and features are refused."""
    source = str(path / CONFIG)
    cfg = _config(path)
    model_type, archs = cfg.get("model_type"), cfg.get("architectures") or []
    supported = ", ".join(f"{t} ({a})" for t, a in ARCHITECTURES.items())
    if model_type not in ARCHITECTURES or any(a != ARCHITECTURES[model_type] for a in archs):
        raise ConfigError([problem(source, KEY, f"model_type {model_type!r} ({', '.join(archs) or 'no architectures'}) "
                                   f"is not supported; supported: {supported}")])
    problems = [problem(source, KEY, f"lacks {k!r}") for k in
                ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size") if k not in cfg]
    for key, wanted in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if cfg.get(key, wanted) != wanted:
            problems.append(problem(source, KEY, f"{key} must be {wanted!r}: other variants are not supported", cfg[key]))
    # transformers 5 moved rope_theta and rope_scaling into rope_parameters.
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        problems.append(problem(source, KEY, f"RoPE type {rope_type!r} is not supported; supported: default, llama3"))
    if problems:
        raise ConfigError(problems)

    spec = dict(
        dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
        n_kv_heads=cfg.get("num_key_value_heads"), head_dim=cfg.get("head_dim"),
        vocab_size=cfg["vocab_size"], intermediate_size=cfg["intermediate_size"],
        # Absent keys take LlamaConfig's defaults, which are not always ModelSpec's.
        max_seq_len=cfg.get("max_position_embeddings", 2048), norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
        tie_embeddings=cfg.get("tie_word_embeddings", False),
    )
    if model_type in ("mistral", "mixtral"):
        # A window as long as the context (or longer) masks nothing: plain causal attention.
        window = cfg.get("sliding_window")
        spec["sliding_window"] = window if window is not None and window < spec["max_seq_len"] else None
    if model_type == "mixtral":
        spec["n_experts"], spec["n_experts_per_token"] = cfg.get("num_local_experts", 8), cfg.get("num_experts_per_tok", 2)
    if rope_type == "llama3":
        fields = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        spec["rope_scaling"] = RopeScaling(**{k: rope[k] for k in fields if k in rope})
    return spec


def load(path: Path, spec: ModelSpec, progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """The native state dict; safetensors are read tensor by tensor as the conversion asks, .bin
    memory-mapped; progress is not called."""
    files = _weight_files(path)
    state = ChainMap(*(_SafetensorsFile(f) if f.suffix == ".safetensors" else _read_bin(f) for f in files))
    names = {k for k in state if not k.endswith(IGNORED_SUFFIX)}
    if spec.tie_embeddings and "lm_head.weight" in names:
        # torch.save of a tied model writes the shared tensor under both names: a copy is harmless.
        embed = state.get("model.embed_tokens.weight")
        if embed is None or not torch.equal(state["lm_head.weight"], embed):
            raise ConfigError([problem(str(path), KEY, "lm_head.weight differs from the embedding, but the spec "
                                       "(model.arch.tie_embeddings) ties them")])
        names.discard("lm_head.weight")
    # Check names before converting so that a wrong spec reads as such, not as a KeyError.
    with torch.device("meta"):
        needed = to_hf(Transformer(spec).state_dict(), spec, "per-expert" if per_expert(names) else "fused")
    if spec.tie_embeddings:
        needed.pop("lm_head.weight")
    missing, extra = [k for k in needed if k not in names], sorted(names - needed.keys())
    problems = []
    if missing:
        problems.append(problem(str(path), KEY, f"lacks {len(missing)} tensor(s) the spec (model.arch) needs, first "
                                f"{missing[0]!r}; check n_layers and tie_embeddings"))
    if extra:
        problems.append(problem(str(path), KEY, f"has {len(extra)} tensor(s) the spec (model.arch) does not use, first "
                                f"{extra[0]!r}; check n_layers and tie_embeddings"))
    if problems:
        raise ConfigError(problems)
    return from_hf(state, spec)


def read_quant(path: Path) -> None:
    """None: transformers' files hold float weights (runner writes its quantized ones natively)."""
    return None


def _config(path: Path) -> dict:
    try:
        cfg = json.loads((path / CONFIG).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError([problem(str(path / CONFIG), KEY, f"unreadable config.json ({e})")]) from None
    if not isinstance(cfg, dict):
        raise ConfigError([problem(str(path / CONFIG), KEY, "must hold a JSON object")])
    return cfg


def _weight_files(path: Path) -> list[Path]:
    """The files an index names, or the single weight file; safetensors before .bin, as transformers does."""
    for index_name, single in WEIGHTS:
        index = path / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                names = sorted(set(weight_map.values()))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise ConfigError([problem(str(index), KEY, f"unreadable index, no 'weight_map' of tensor -> file ({e!r})")]) from None
            absent = [n for n in names if not (path / n).is_file()]
            if absent:
                raise ConfigError([problem(str(index), KEY, f"names {len(absent)} missing file(s), first {absent[0]!r}")])
            return [path / n for n in names]
        if (path / single).is_file():
            return [path / single]
    expected = ", ".join(name for pair in WEIGHTS for name in pair)
    raise ConfigError([problem(str(path), KEY, f"has config.json but no weights; expected one of {expected}")])


class _SafetensorsFile(Mapping):
    """One safetensors file: its names at once, each tensor read from disk only when asked for."""

    def __init__(self, file: Path):
        self.file = file
        try:
            self.handle = safe_open(file, framework="pt")
            self.names = set(self.handle.keys())
        except (SafetensorError, OSError) as e:
            raise self._corrupt(e) from None

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise KeyError(name)
        try:
            return self.handle.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise self._corrupt(e) from None

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def _corrupt(self, e: Exception) -> ConfigError:
        return ConfigError([problem(str(self.file), KEY, f"unreadable safetensors file, truncated or corrupt ({e})")])


def _read_bin(file: Path) -> dict[str, torch.Tensor]:
    state = checkpoint.read(file)["state_dict"]  # weights_only: a pickle is refused, never run
    bad = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise ConfigError([problem(str(file), KEY, f"entry {bad!r} is not a tensor; not a transformers state dict")])
    return state
