"""The real SmolLM2-135M-Instruct GGUF: our model against HF transformers on the same weights.

Both sides get the same token ids, so a tokenizer difference can neither hide nor fake a model
difference. transformers dequantizes the GGUF itself (it needs accelerate for that). Ours runs
twice: loaded as float weights (quant.mode none), and on the file's Q4_1/Q8_0 blocks as stored
(quant.mode gguf, the default recipe's pipeline in fp32 on runner's kernels).
"""
from __future__ import annotations

import pytest
import torch

from runner.config.schema import ModelSpec, TokenizerKind, TokenizerSection
from runner.decoders.plain import PlainDecoder
from runner.decoders.sampling import Sampling
from runner.loaders import load_model, read_spec
from runner.tokenizers import build
from runner.tokenizers.chat import render_chat

pytestmark = pytest.mark.real

NEW_TOKENS = 64
PROMPTS = [
    ("prose", "The old lighthouse keeper climbed the stairs every evening because"),
    ("code", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"),
    ("chat", None),  # a chat-templated question, below
    ("list", "Here are 5 tips for staying focused while studying:\n1."),
    ("numbers", "In 1969, 3 astronauts flew 384,400 km to the Moon; the mission lasted"),
]
QUESTION = "Why is the sky blue? Answer in two sentences."


@pytest.fixture(scope="module")
def models(smollm2_gguf):
    from transformers import AutoModelForCausalLM

    spec = ModelSpec(**read_spec(smollm2_gguf))
    ours = load_model(smollm2_gguf, spec, torch.device("cpu"), torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()
    return ours, hf


@pytest.fixture(scope="module")
def as_stored(smollm2_gguf):
    from runner import pipeline
    from runner.recipes import load as resolve

    recipe = "recipes/smollm2-135m.yaml"
    built = pipeline.build(resolve(recipe, ["quant.mode=gguf", "dtype=float32"], check_files=True), recipe)
    assert built.model.layers[0].attention.wqkv.kinds == [3]  # q, k and v: Q4_1 as the file stores them
    return built.model


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf):
    return build(TokenizerSection(kind=TokenizerKind.gguf, path=str(smollm2_gguf)))


def prompt_ids(tokenizer, text):
    if text is None:
        return tokenizer.encode(render_chat(tokenizer, QUESTION), bos=False, allow_special=True)
    return tokenizer.encode(text)


def hf_greedy(hf, ids: list[int]) -> list[int]:
    x = torch.tensor([ids])
    # No EOS stop, and an explicit mask: SmolLM2's pad id is <|im_end|>, which chat prompts contain.
    out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("mode", ["none", "gguf"])
@pytest.mark.parametrize("name,text", PROMPTS, ids=[name for name, _ in PROMPTS])
def test_greedy_tokens_equal_transformers(models, as_stored, tokenizer, name, text, mode, record_property):
    floats, hf = models
    ours = as_stored if mode == "gguf" else floats
    ids = prompt_ids(tokenizer, text)
    with torch.inference_mode():
        expected = hf_greedy(hf, ids)
        got, _ = PlainDecoder(ours, Sampling(temperature=0)).generate(ids, NEW_TOKENS)
        assert got == expected, f"{name}: first difference at token {next(i for i, (a, b) in enumerate(zip(got, expected)) if a != b)}"

        # Logits over every position of prompt + continuation, in one pass each.
        sequence = torch.tensor([ids + got])
        theirs = hf(sequence).logits[0]
        ours.setup_cache(1, sequence.shape[1])
        mine = ours(sequence, torch.arange(sequence.shape[1]))[0]
    diff = (theirs - mine).abs().max().item()
    scale = theirs.abs().max().item()
    record_property("max_logit_diff", diff)
    print(f"{name}: max |logit difference| {diff:.3g} (logits up to {scale:.3g})")
    assert diff <= 1e-4 * scale, f"{name}: max logit difference {diff} against logits up to {scale}"
