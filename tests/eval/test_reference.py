"""The shipped tasks scored by lm-eval's own HFLM on HF transformers (the SmolLM2 GGUF loaded by
transformers in float32) give the metrics `runner eval` gives in float32: the same accuracy,
perplexities within 1e-3 relative. That checks token boundaries, BOS handling and rolling
windows (max_seq_len is cut to 256 on both sides so the long topics are windowed)."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.real
lm_eval = pytest.importorskip("lm_eval", reason="the eval extra (lm-eval) is part of the test extra")

from tests.eval.conftest import ROOT  # noqa: E402

RECIPE = str(ROOT / "recipes" / "smollm2-135m.yaml")
MAX_LEN = 256
TASKS = {"pydoc_perplexity": 2, "basic_knowledge_mc": 40}  # task: --limit
PERPLEXITIES = ("word_perplexity", "byte_perplexity", "bits_per_byte")


def evaluate(lm, name: str, limit: int) -> dict:
    from lm_eval import evaluator

    from runner.eval import catalog

    out = evaluator.simple_evaluate(model=lm, tasks=catalog.specs([name], []), limit=limit,
                                    task_manager=catalog.manager([]), log_samples=False, bootstrap_iters=0)
    return out["results"][name]


@pytest.fixture(scope="module")
def both(smollm2_gguf):
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from runner import pipeline
    from runner.recipes import load as resolve
    from runner.eval.adapter import RunnerLM
    from runner.eval.command import require_lm_eval

    require_lm_eval()  # offline, as the command runs
    folder, name = str(smollm2_gguf.parent), smollm2_gguf.name
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    theirs = HFLM(pretrained=hf, tokenizer=tokenizer, batch_size=8, max_length=MAX_LEN, device="cpu")
    recipe = resolve(RECIPE, ["dtype=float32", f"model.arch.max_seq_len={MAX_LEN}", "generate.temperature=0"],
                     check_files=True)
    ours = RunnerLM(pipeline.build(recipe, RECIPE), batch_size=8)
    return ours, theirs


@pytest.fixture(scope="module")
def as_stored(smollm2_gguf):
    """`runner eval` on the file's blocks as stored (quant.mode gguf), in float32."""
    from runner import pipeline
    from runner.eval.adapter import RunnerLM
    from runner.recipes import load as resolve

    recipe = resolve(RECIPE, ["dtype=float32", f"model.arch.max_seq_len={MAX_LEN}", "generate.temperature=0",
                              "quant.mode=gguf"], check_files=True)
    return RunnerLM(pipeline.build(recipe, RECIPE), batch_size=8)


def test_runner_eval_on_gguf_blocks_matches_hflm(both, as_stored, record_property):
    """HF dequantizes the same blocks, so the perplexities agree as closely as float weights'."""
    _, theirs = both
    mine, reference = evaluate(as_stored, "pydoc_perplexity", 2), evaluate(theirs, "pydoc_perplexity", 2)
    record_property("runner", mine)
    record_property("hflm", reference)
    print({k: v for k, v in mine.items() if "," in k}, {k: v for k, v in reference.items() if "," in k})
    for metric in PERPLEXITIES:
        assert mine[f"{metric},none"] == pytest.approx(reference[f"{metric},none"], rel=1e-3), metric


@pytest.mark.parametrize("task", list(TASKS))
def test_runner_eval_matches_hflm_on_transformers(both, task, record_property):
    ours, theirs = both
    mine, reference = evaluate(ours, task, TASKS[task]), evaluate(theirs, task, TASKS[task])
    record_property("runner", mine)
    record_property("hflm", reference)
    print(task, {k: v for k, v in mine.items() if "," in k}, {k: v for k, v in reference.items() if "," in k})
    if task == "basic_knowledge_mc":
        assert mine["acc,none"] == reference["acc,none"]
        assert mine["acc_norm,none"] == reference["acc_norm,none"]
        assert 0.3 < mine["acc,none"]  # the model knows some answers: the task is not scored at random
    else:
        for metric in PERPLEXITIES:
            assert mine[f"{metric},none"] == pytest.approx(reference[f"{metric},none"], rel=1e-3), metric
        assert reference["word_perplexity,none"] < 1000  # real text, scored as text
