"""quant.mode gguf on whole models (runner/quant/gguf_model.py): GGUF files written here, run with
their blocks as stored, against HF transformers and runner's float load of the same values."""
import dataclasses
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from runner import kernels, quant
from runner.config.errors import ConfigError
from runner.config.schema import ModelSpec
from runner.config.specs import load_spec
from runner.loaders import load_model, read_spec
from runner.quant import gguf_model
from runner.quant.gguf_layers import GGUFEmbedding, GGUFLinear
from tests.loaders.test_gguf import gguf_specs, save_one_quantized
from tests.loaders.writers import Q, llama_writer, save_gguf
from tests.properties.strategies import build_twins, logits_bound
from tests.quant.test_gguf_blocks import random_blocks

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[2]
LEGACY = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]


def on(model: torch.nn.Module, ops: str) -> torch.nn.Module:
    """The model in fp32 on torch's ops, or on runner's kernels with its GGUF layers packed for them."""
    model = model.to(dtype=torch.float32).eval()
    if ops == "runner":
        model.use_ops(kernels.KernelOps())
        quant.pack_for(model, CPU, "runner")
    return model


@pytest.fixture(scope="module", params=["torch", "runner"])
def ops(request):
    if request.param == "runner":
        kernels.load()
    return request.param


@settings(max_examples=25, deadline=None)
@given(spec=gguf_specs(), seed=st.integers(0, 2**32 - 1), qtype=st.sampled_from(LEGACY), data=st.data())
@torch.no_grad()
def test_a_gguf_runs_as_stored_to_hfs_logits(ops, spec, seed, qtype, data):
    """HF transformers with the values the file stores is the reference; layers whose rows do not
    fill whole blocks are written (and stay) F32."""
    tokens = torch.tensor([data.draw(st.lists(st.integers(0, spec.vocab_size - 1), min_size=1, max_size=12))])
    hf, _ = build_twins(spec, seed)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.gguf"
        decoded = save_gguf(path, hf.state_dict(), spec, qtype)
        declared = ModelSpec(**read_spec(path))
        model = on(gguf_model.read(path, declared), ops)
    hf.load_state_dict(decoded)
    model.setup_cache(1, tokens.shape[1])
    ours, reference = model(tokens, torch.arange(tokens.shape[1])), hf(tokens).logits
    diff = (ours - reference).abs().max().item()
    assert diff <= logits_bound(reference), f"max abs diff {diff:.3g}"
    if spec.dim % 32 == 0:  # whole blocks: the linears keep the file's type
        assert isinstance(model.layers[0].attention.wqkv, GGUFLinear)
        assert model.layers[0].attention.wqkv.kinds == [qtype]  # q, k and v joined: one type


# A file whose every matrix has its own type, as Q4_K_M files mix them (K-quants need rows of 256).
K_SPEC = ModelSpec(dim=256, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=64, intermediate_size=512, max_seq_len=32,
                   tie_embeddings=False)
K_TYPES = {"attn_q": Q.Q4_K, "attn_k": Q.Q5_K, "attn_v": Q.Q6_K, "attn_output": Q.Q8_0, "ffn_gate": Q.Q5_0,
           "ffn_up": Q.Q4_1, "ffn_down": Q.Q6_K, "token_embd": Q.Q8_0, "output": Q.Q4_K}


def write_mixed(path: Path, spec: ModelSpec, seed: int, types: dict = K_TYPES) -> None:
    """A llama GGUF of random blocks, each matrix of its `types` type, unit norms."""
    writer = llama_writer(path, spec)
    hd = spec.head_size
    rows = {"attn_q": spec.n_heads * hd, "attn_k": spec.kv_heads * hd, "attn_v": spec.kv_heads * hd,
            "attn_output": spec.dim, "ffn_gate": spec.intermediate_size, "ffn_up": spec.intermediate_size,
            "ffn_down": spec.dim, "token_embd": spec.vocab_size, "output": spec.vocab_size}
    cols = {"attn_output": spec.n_heads * hd, "ffn_down": spec.intermediate_size}
    names = [("token_embd", "token_embd.weight"), ("output", "output.weight")]
    names += [(kind, f"blk.{i}.{kind}.weight") for i in range(spec.n_layers) for kind in rows if kind not in dict(names)]
    for n, (kind, name) in enumerate(names):
        qtype = types[kind]
        width = cols.get(kind, spec.dim)
        size = gguf.GGML_QUANT_SIZES[qtype][0]
        # Weights of about 1 / sqrt(width), so activations stay O(1): a K-quant's level is d * sc * q,
        # 6-bit sub-block scales times levels up to 63, a legacy type's d * q.
        data = random_blocks(qtype, rows[kind], width // size, seed + n, 1e-4 if size == 256 else 2e-3)
        writer.add_tensor(name, data, raw_dtype=qtype)
    for name in ["output_norm.weight"] + [f"blk.{i}.{n}_norm.weight" for i in range(spec.n_layers) for n in ("attn", "ffn")]:
        writer.add_tensor(name, np.ones(spec.dim, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("seed", [0, 1])
@torch.no_grad()
def test_a_file_of_mixed_k_quants_runs_as_its_float_load_does(ops, seed, tmp_path):
    """Every supported type in one model. The reference is runner's float load of the same file
    (the gguf package's dequantized values, checked against HF in tests/loaders/test_gguf.py)."""
    path = tmp_path / "mixed.gguf"
    write_mixed(path, K_SPEC, seed)
    model = on(gguf_model.read(path, K_SPEC), ops)
    layer = model.layers[1]
    assert layer.attention.wqkv.kinds == [Q.Q4_K, Q.Q5_K, Q.Q6_K]
    assert layer.feed_forward.w13.kinds == [Q.Q5_0, Q.Q4_1] and layer.feed_forward.w2.kinds == [Q.Q6_K]
    assert isinstance(model.tok_embeddings, GGUFEmbedding) and model.output.kinds == [Q.Q4_K]
    reference = load_model(path, K_SPEC, CPU, torch.float32)
    assert torch.equal(layer.attention.wqkv.dequantize(), reference.layers[1].attention.wqkv.weight)
    tokens = torch.randint(0, K_SPEC.vocab_size, (2, 9), generator=torch.Generator().manual_seed(seed))
    for each in (model, reference):
        each.setup_cache(2, 16)
    prompt = model(tokens, torch.arange(9)), reference(tokens, torch.arange(9))
    step = model(tokens[:, :1], torch.tensor([9])), reference(tokens[:, :1], torch.tensor([9]))
    for ours, theirs in (prompt, step):
        diff = (ours - theirs).abs().max().item()
        assert diff <= logits_bound(theirs), f"max abs diff {diff:.3g}"


def test_a_tied_embedding_is_one_table_of_blocks(tmp_path):
    spec = ModelSpec(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=48, intermediate_size=64, max_seq_len=16,
                     tie_embeddings=True)
    hf, _ = build_twins(spec, 0)
    path = tmp_path / "tied.gguf"
    save_gguf(path, hf.state_dict(), spec, Q.Q8_0)
    model = gguf_model.read(path, spec)
    assert model.output.blocks0 is model.tok_embeddings.blocks0
    file_bytes = sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)
    parts = sum(len(m.types) for m in model.modules() if isinstance(m, (GGUFLinear, GGUFEmbedding)))
    assert quant.model_bytes(model) == file_bytes + 8 * parts  # the tied table once, nothing widened; int64 types


@pytest.mark.parametrize("qtype", [Q.Q2_K, Q.Q3_K, Q.IQ4_NL])
def test_an_unsupported_type_is_one_line_naming_tensor_type_and_the_supported(qtype, tmp_path):
    spec = dataclasses.replace(load_spec("tiny-llama"), n_layers=1, intermediate_size=256, tie_embeddings=True)
    size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    data = np.random.default_rng(0).integers(0, 256, (spec.dim, spec.intermediate_size // size * type_size), dtype=np.uint8)
    path = tmp_path / "odd.gguf"
    save_one_quantized(path, spec, data, qtype)
    with pytest.raises(ConfigError, match=f"'blk.0.ffn_down.weight' has type {qtype.name}.*supported: Q4_0, Q4_1"):
        gguf_model.read(path, spec)
    cli = subprocess.run([sys.executable, "-m", "runner", "recipes/tiny-random.yaml", f"model.checkpoint={path}",
                          "quant.mode=gguf", "model.arch.n_layers=1", "model.arch.intermediate_size=256",
                          "model.arch.tie_embeddings=true",
                          "generate.max_new_tokens=2"], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "RUNNER_HOME": str(tmp_path)})
    assert cli.returncode == 2, cli.stderr
    assert "Traceback" not in cli.stderr and qtype.name in cli.stderr and "blk.0.ffn_down.weight" in cli.stderr


def test_gguf_mode_without_a_gguf_file_names_the_key(tmp_path):
    cli = subprocess.run([sys.executable, "-m", "runner", "recipes/tiny-random.yaml", "quant.mode=gguf",
                          "generate.max_new_tokens=2"], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "RUNNER_HOME": str(tmp_path)})
    assert cli.returncode == 2 and "quant.mode" in cli.stderr and "GGUF" in cli.stderr and "Traceback" not in cli.stderr


def test_blocks_of_another_shape_than_the_spec_are_named(tmp_path):
    path = tmp_path / "mixed.gguf"
    write_mixed(path, K_SPEC, 0)
    wider = dataclasses.replace(K_SPEC, intermediate_size=768)
    with pytest.raises(ConfigError, match=r"'layers.0.feed_forward.w13' holds blocks of 1024 rows of 256 values, "
                                          r"but the spec \(model.arch\) needs \(1536, 256\)"):
        gguf_model.read(path, wider)
