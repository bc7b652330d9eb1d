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
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM",
                 "gemma3_text": "Gemma3ForCausalLM", "gemma3": "Gemma3ForConditionalGeneration",
                 "phi3": "Phi3ForCausalLM"}  # model_type -> class
FAMILIES = {"llama": "llama", "mistral": "llama", "mixtral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
            "gemma2": "gemma2", "gemma3_text": "gemma3", "gemma3": "gemma3", "phi3": "phi3"}
# Each family's config defaults where they are not LlamaConfig's (transformers 5's config classes).
DEFAULTS = {
    "gemma2": dict(tie_word_embeddings=True, query_pre_attn_scalar=256, sliding_window=4096, head_dim=256,
                   final_logit_softcapping=30.0, attn_logit_softcapping=50.0, hidden_activation="gelu_pytorch_tanh"),
    "gemma3": dict(tie_word_embeddings=True, query_pre_attn_scalar=256, sliding_window=4096, head_dim=256,
                   hidden_activation="gelu_pytorch_tanh", rope_local_base_freq=10000.0, sliding_window_pattern=6),
    "qwen3": dict(head_dim=128),
    "phi3": dict(rms_norm_eps=1e-5),
}
ROPE_TYPES = ("default", "llama3", "linear", "dynamic", "yarn", "longrope", "su")
ROPE_FIELDS = ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor", "beta_fast",
               "beta_slow", "mscale", "mscale_all_dim", "truncate", "attention_factor", "short_factor", "long_factor")
# Weights a multimodal Gemma 3 checkpoint holds beside its text model, and the text model's prefixes.
VISION = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")
TEXT_PREFIXES = {"model.language_model.": "model.", "language_model.model.": "model.", "language_model.lm_head.": "lm_head."}
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
    family = FAMILIES[model_type]
    if model_type == "gemma3":  # the multimodal model: its text model's config is inside
        cfg = cfg.get("text_config") or {}
    cfg = {**DEFAULTS.get(family, {}), **cfg}
    problems = [problem(source, KEY, f"lacks {k!r}") for k in
                ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size") if k not in cfg]
    activation = "gelu_tanh" if family.startswith("gemma") else "silu"
    wanted_activation = "gelu_pytorch_tanh" if activation == "gelu_tanh" else "silu"
    act_key = "hidden_activation" if "hidden_activation" in cfg else "hidden_act"
    for key, wanted in ((act_key, wanted_activation), ("attention_bias", False), ("mlp_bias", False)):
        if cfg.get(key, wanted) != wanted:
            problems.append(problem(source, KEY, f"{key} must be {wanted!r}: other variants are not supported", cfg[key]))
    rope, local_rope = _rope_parameters(cfg, family)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        problems.append(problem(source, KEY, f"RoPE type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}"))
    if problems:
        raise ConfigError(problems)

    spec = dict(
        dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
        n_kv_heads=cfg.get("num_key_value_heads"), head_dim=cfg.get("head_dim"),
        vocab_size=cfg["vocab_size"], intermediate_size=cfg["intermediate_size"],
        # Absent keys take LlamaConfig's defaults, which are not always ModelSpec's.
        max_seq_len=cfg.get("max_position_embeddings", 2048), norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
        tie_embeddings=cfg.get("tie_word_embeddings", False), family=family,
    )
    if model_type in ("mistral", "mixtral"):
        # A window as long as the context (or longer) masks nothing: plain causal attention.
        window = cfg.get("sliding_window")
        spec["sliding_window"] = window if window is not None and window < spec["max_seq_len"] else None
    if model_type == "mixtral":
        spec["n_experts"], spec["n_experts_per_token"] = cfg.get("num_local_experts", 8), cfg.get("num_experts_per_tok", 2)
    if family != "llama":
        spec.update(_family_features(source, cfg, family, spec["n_layers"]))
    if family == "gemma3":
        spec["rope_local_theta"] = local_rope.get("rope_theta", cfg.get("rope_local_base_freq", 10000.0))
    partial = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        spec["partial_rotary_factor"] = partial
    if rope_type != "default":
        spec["rope_scaling"] = scaling = _rope_scaling(rope, rope_type, cfg, spec["max_seq_len"])
        if scaling.type == "dynamic":  # NTK scaling is there to reach `factor` times further
            spec["max_seq_len"] = int(spec["max_seq_len"] * scaling.factor)
    return spec


def _rope_parameters(cfg: dict, family: str) -> tuple[dict, dict]:
    """The global and the local layers' RoPE parameters ({} for none declared)."""
    # transformers 5 moved rope_theta and rope_scaling into rope_parameters; Gemma 3's has one per layer type.
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if family == "gemma3" and "full_attention" in rope:
        return rope.get("full_attention") or {}, rope.get("sliding_attention") or {}
    return rope, {}


def _rope_scaling(rope: dict, rope_type: str, cfg: dict, max_seq_len: int) -> RopeScaling:
    fields = {k: rope[k] for k in ROPE_FIELDS if rope.get(k) is not None}
    if rope_type in ("su", "yarn") and cfg.get("model_type") == "phi3":  # Phi3Config's names for longrope
        rope_type = "longrope"
    # Phi-3's top-level original length overrides the RoPE dict's; without either, the model's own.
    if "original_max_position_embeddings" in cfg:
        fields["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
    fields.setdefault("original_max_position_embeddings", max_seq_len)
    if rope_type == "longrope" and "factor" not in fields:  # how far the model reaches past the original length
        fields["factor"] = max_seq_len / fields["original_max_position_embeddings"]
    if rope_type == "dynamic":  # HF's threshold: max_position_embeddings itself
        fields["original_max_position_embeddings"] = max_seq_len
    for key in ("short_factor", "long_factor"):
        if key in fields:
            fields[key] = [float(f) for f in fields[key]]
    return RopeScaling(type=rope_type, **fields)


def _family_features(source: str, cfg: dict, family: str, n_layers: int) -> dict:
    """The spec's fields for what a family beyond LLaMA adds, from its config."""
    out = {}
    if family == "qwen2":
        out["qkv_bias"] = True
    if family in ("qwen3", "gemma3"):
        out["qk_norm"] = True
    if family.startswith("gemma"):
        out.update(norm_offset=1.0, scale_embeddings=True, activation="gelu_tanh", sandwich_norms=True,
                   query_pre_attn_scalar=int(cfg["query_pre_attn_scalar"]))
        # Gemma 3's attention ignores attn_logit_softcapping, as transformers' does.
        caps = (("attn_logit_softcap", "attn_logit_softcapping"),) if family == "gemma2" else ()
        for ours, theirs in caps + (("final_logit_softcap", "final_logit_softcapping"),):
            if cfg.get(theirs) is not None:
                out[ours] = float(cfg[theirs])
    out.update(_windows(source, cfg, family, n_layers))
    return out


def _windows(source: str, cfg: dict, family: str, n_layers: int) -> dict:
    """sliding_window and global_every from the config's layer types (or the family's rule for them)."""
    window = cfg.get("sliding_window")
    types = cfg.get("layer_types")
    if types is None:
        if family == "gemma2":
            types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n_layers)]
        elif family == "gemma3":
            pattern = cfg["sliding_window_pattern"]
            types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)]
        elif family == "phi3":
            types = ["sliding_attention" if window is not None else "full_attention"] * n_layers
        else:  # Qwen: layers from max_window_layers on are windowed, when use_sliding_window
            first = cfg.get("max_window_layers", 28)
            types = ["sliding_attention" if cfg.get("use_sliding_window") and i >= first else "full_attention"
                     for i in range(n_layers)]
    windowed = [t == "sliding_attention" for t in types]
    if window is None or not any(windowed):
        return {}
    if all(windowed):
        return {"sliding_window": window}
    for every in range(2, n_layers + 1):
        if all(w == bool((i + 1) % every) for i, w in enumerate(windowed)):
            return {"sliding_window": window, "global_every": every}
    raise ConfigError([problem(source, KEY, "layer_types mixes windowed and global layers in a pattern runner does "
                               "not run; supported: every layer windowed, or every Nth layer global")])


def load(path: Path, spec: ModelSpec, progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """The native state dict; safetensors are read tensor by tensor as the conversion asks, .bin
    memory-mapped; progress is not called."""
    files = _weight_files(path)
    state = ChainMap(*(_SafetensorsFile(f) if f.suffix == ".safetensors" else _read_bin(f) for f in files))
    if any(name.startswith(tuple(TEXT_PREFIXES)) for name in state):
        state = _TextModel(state)
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


class _TextModel(Mapping):
    """A multimodal checkpoint's text model under the names a text-only one uses; vision weights dropped."""

    def __init__(self, state: Mapping):
        self.state = state
        self.names = {}
        for name in state:
            for prefix, text in TEXT_PREFIXES.items():
                if name.startswith(prefix):
                    self.names[text + name[len(prefix):]] = name
            if not name.startswith(VISION + tuple(TEXT_PREFIXES)):
                self.names.setdefault(name, name)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.state[self.names[name]]

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


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
