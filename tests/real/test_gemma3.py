"""The real Gemma 3 270M GGUF (Q4_K_M, Gemma's terms): runner against HF transformers on the same
weights, greedy tokens and perplexity.

transformers dequantizes the GGUF itself into its Gemma3ForCausalLM; runner runs the recipe as
`runner recipes/gemma3-270m.yaml` builds it (its checkpoint converted once from the same file,
runner's CPU kernels where they apply). Both sides get the same token ids, so a tokenizer
difference can neither hide nor fake a model difference. One prompt is longer than the model's
512-token sliding window, so local layers mask and global ones do not.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from runner import sources
from runner.config.schema import TokenizerKind, TokenizerSection
from runner.decoders.plain import PlainDecoder
from runner.decoders.sampling import Sampling
from runner.recipes import load as resolve
from runner.tokenizers import build

pytestmark = pytest.mark.real

ROOT = Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "recipes" / "gemma3-270m.yaml")
NEW_TOKENS = 64
WINDOW = 512
PROMPTS = [
    ("prose", "The old lighthouse keeper climbed the stairs every evening because"),
    ("code", "def quicksort(items):\n    \"\"\"Sort a list of numbers.\"\"\"\n"),
    ("facts", "The capital of France is Paris. The capital of Japan is"),
    ("unicode", "Café, naïve, Straße, 東京 and Москва are words that"),
    ("long", None),  # longer than the window, built below
]


def long_prompt(tokenizer) -> str:
    """Numbered sentences until the prompt passes the window by a hundred tokens."""
    sentences, n = [], 0
    while len(tokenizer.encode(" ".join(sentences))) < WINDOW + 100:
        n += 1
        sentences.append(f"Sentence {n} says that the river {n % 7} flows past the mill {n % 5} on day {n}.")
    return " ".join(sentences) + " The last sentence says that the river"


@pytest.fixture(scope="module")
def tokenizer(gemma3_gguf):
    return build(TokenizerSection(kind=TokenizerKind.gguf, path=str(gemma3_gguf)))


@pytest.fixture(scope="module")
def hf(gemma3_gguf):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(gemma3_gguf.parent), gguf_file=gemma3_gguf.name,
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ours(gemma3_gguf):
    from runner import pipeline

    recipe = resolve(RECIPE, [], check_files=False)
    sources.prepare(recipe.model, RECIPE)
    built = pipeline.build(resolve(RECIPE, [], check_files=True), RECIPE)
    assert built.model.norm.weight.dtype == torch.float32  # the recipe's own dtype
    return built.model


@pytest.fixture(scope="module")
def as_stored(gemma3_gguf):
    """The recipe with quant.mode=gguf: the file's Q4_K, Q6_K, Q5_0 and Q8_0 blocks as stored."""
    from runner import pipeline

    built = pipeline.build(resolve(RECIPE, ["quant.mode=gguf"], check_files=True), RECIPE)
    assert built.model.layers[0].attention.wqkv.kinds == [6, 8]  # q and k Q5_0, v Q8_0, as in the file
    assert built.model.layers[0].feed_forward.w2.kinds == [14]  # Q6_K
    return built.model


def hf_greedy(hf, ids: list[int]) -> list[int]:
    x = torch.tensor([ids])
    out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def greedy_reference():
    """HF's greedy tokens per prompt, computed once for both modes."""
    return {}


@pytest.mark.parametrize("mode", ["none", "gguf"])
@pytest.mark.parametrize("name,text", PROMPTS, ids=[name for name, _ in PROMPTS])
def test_greedy_tokens_equal_transformers(request, hf, tokenizer, greedy_reference, name, text, mode,
                                          record_property):
    ours = request.getfixturevalue("as_stored" if mode == "gguf" else "ours")
    ids = tokenizer.encode(long_prompt(tokenizer) if text is None else text)
    assert ids[0] == tokenizer.bos_id  # Gemma wants its <bos>
    if text is None:
        assert len(ids) > WINDOW
    with torch.inference_mode():
        if name not in greedy_reference:
            greedy_reference[name] = hf_greedy(hf, ids)
        expected = greedy_reference[name]
        got, _ = PlainDecoder(ours, Sampling(temperature=0)).generate(ids, NEW_TOKENS)
        first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), None)
        assert got == expected, f"{name}: first difference at token {first}"

        sequence = torch.tensor([ids + got])  # logits over prompt and continuation, one pass each
        theirs = hf(sequence).logits[0]
        ours.setup_cache(1, sequence.shape[1])
        mine = ours(sequence, torch.arange(sequence.shape[1]))[0]
    diff, scale = (theirs - mine).abs().max().item(), theirs.abs().max().item()
    record_property("max_logit_diff", diff)
    print(f"{name}: max |logit difference| {diff:.3g} (logits up to {scale:.3g}); text: {tokenizer.decode(got)!r}")
    assert diff <= 1e-4 * scale, f"{name}: max logit difference {diff} against logits up to {scale}"


MAX_LEN = 256  # both sides window the long topics


@pytest.fixture(scope="module")
def hflm_perplexity(hf, gemma3_gguf):
    """lm-eval's HFLM on transformers' model: pydoc_perplexity's metrics."""
    pytest.importorskip("lm_eval", reason="the eval extra (lm-eval) is part of the test extra")
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    from tests.eval.test_reference import evaluate

    theirs = HFLM(pretrained=hf, tokenizer=AutoTokenizer.from_pretrained(str(gemma3_gguf.parent), gguf_file=gemma3_gguf.name),
                  batch_size=8, max_length=MAX_LEN, device="cpu")
    return evaluate(theirs, "pydoc_perplexity", 2)


@pytest.mark.parametrize("mode", ["none", "gguf"])
def test_perplexity_equals_hflm(hflm_perplexity, mode, record_property):
    """`runner eval`'s pydoc_perplexity against lm-eval's HFLM on transformers' model, both in
    float32 (the issue asks for 1%, 0.5% for quant.mode gguf; rolling windows and token
    boundaries agree far closer)."""
    from runner import pipeline
    from runner.eval.adapter import RunnerLM
    from runner.eval.command import require_lm_eval
    from tests.eval.test_reference import PERPLEXITIES, evaluate

    require_lm_eval()
    recipe = resolve(RECIPE, ["dtype=float32", f"model.arch.max_seq_len={MAX_LEN}", "generate.temperature=0",
                              f"quant.mode={mode}"], check_files=True)
    mine = evaluate(RunnerLM(pipeline.build(recipe, RECIPE), batch_size=8), "pydoc_perplexity", 2)
    reference = hflm_perplexity
    record_property("runner", mine)
    record_property("hflm", reference)
    print(mode, {k: v for k, v in mine.items() if "," in k}, {k: v for k, v in reference.items() if "," in k})
    for metric in PERPLEXITIES:
        assert mine[f"{metric},none"] == pytest.approx(reference[f"{metric},none"], rel=1e-3), metric
    assert reference["word_perplexity,none"] < 1000  # real text, scored as text
