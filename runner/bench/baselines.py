"""The --vs baselines on the same weights, prompt and threads: HF transformers' generate (eager,
or with a static cache and torch.compile) and llama.cpp on the recipe's GGUF (in a child process:
python -m runner.bench.baselines JOB_JSON)."""
from __future__ import annotations

import importlib.util
import statistics
import time
from pathlib import Path

import torch

from runner import pipeline


class _Clock:
    """A generation streamer that notes when each new token arrives (the first put is the prompt)."""

    def __init__(self):
        self.times: list[float] = []
        self.prompt_seen = False
        self.start = time.perf_counter()

    def put(self, value) -> None:
        if self.prompt_seen:
            self.times.append(time.perf_counter())
        self.prompt_seen = True

    def end(self) -> None:
        pass

    def decode_rate(self) -> float:
        """Tokens/s after the first token, as ours are counted (prefill excluded)."""
        return (len(self.times) - 1) / (self.times[-1] - self.times[0])

    def prefill_rate(self, prompt_tokens: int) -> float:
        return prompt_tokens / (self.times[0] - self.start)


def hf_decode_speed(built: pipeline.Pipeline, prompt: list[int], new_tokens: int, runs: int,
                    compiled: bool = False) -> tuple[float, float]:
    """HF transformers' greedy `generate` on the same weights, dtype, threads and prompt: decode
    tokens/s and prompt tokens/s (medians).

    compiled: with a static cache and torch.compile (what HF offers for speed); compiling happens
    in the warm-up and is not counted.
    """
    try:
        import transformers
        from transformers import CompileConfig
    except ImportError:
        raise ValueError("needs HF transformers: pip install 'runner[hf]'") from None

    from runner.loaders import load_state_dict, stored_quant
    from runner.loaders.hf_layout import hf_class, hf_config, to_hf

    recipe = built.recipe
    path = Path(recipe.model.checkpoint)
    if stored_quant(path) is not None:
        raise ValueError("--vs hf needs a float checkpoint (HF runs the float weights)")
    spec = recipe.model.arch
    state = to_hf(load_state_dict(path, spec), spec)
    dtype = built.model.norm.weight.dtype
    model_class = getattr(transformers, hf_class(spec))  # the family's class (Gemma 3: the text model's)
    hf = model_class(model_class.config_class(**hf_config(spec), dtype=dtype)).to(dtype).eval()
    hf.load_state_dict(state, strict=False)
    if spec.tie_embeddings:
        hf.tie_weights()
    ids = torch.tensor([prompt])
    options = {}
    if compiled:
        # HF compiles generate's forward by itself only on accelerators; this asks for it on the CPU too.
        config = CompileConfig()
        config._compile_all_devices = True  # a class attribute, not an argument
        options = {"cache_implementation": "static", "compile_config": config}

    def rate() -> tuple[float, float]:
        clock = _Clock()
        with torch.inference_mode():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, streamer=clock, **options)
        return clock.decode_rate(), clock.prefill_rate(len(prompt))

    rate()  # warm-up (and compile)
    return _medians([rate() for _ in range(runs)])


def _medians(pairs: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)


def llamacpp_decode_speed(built: pipeline.Pipeline, recipe_path: str, prompt: list[int], new_tokens: int,
                          runs: int, note=None) -> tuple[float, float]:
    """llama.cpp's (llama-cpp-python) greedy decode and prompt tokens/s on the recipe's GGUF source,
    same prompt and threads.

    It runs in a child process, apart from torch's thread pool. Should llama.cpp crash there (its
    AMX weight repacking does in some sandboxes), it runs again without repacking, and says so.
    """
    import json
    import subprocess
    import sys

    if importlib.util.find_spec("llama_cpp") is None:
        raise ValueError("needs llama-cpp-python: pip install 'runner[llamacpp]'")
    from runner import sources

    source = built.recipe.model.source
    if source is None or not source.lower().endswith(".gguf"):
        raise ValueError(f"runs the recipe's GGUF model.source, but that is {source!r}")
    job = {"gguf": str(sources.fetch(source, recipe_path)), "prompt": prompt, "new_tokens": new_tokens,
           "runs": runs, "threads": torch.get_num_threads()}
    for repack in (True, False):
        done = subprocess.run([sys.executable, "-m", "runner.bench.baselines", json.dumps(job | {"repack": repack})],
                              capture_output=True, text=True)
        if done.returncode == 0:
            decode, prefill = json.loads(done.stdout.strip().splitlines()[-1])
            return decode, prefill
        if done.returncode > 0:  # an error, not a crash: running it again would not help
            break
        if repack and note is not None:
            note(f"bench: llama.cpp crashed (signal {-done.returncode}); running it again without weight repacking")
    raise ValueError(f"llama.cpp failed: {(done.stderr.strip().splitlines() or ['exit ' + str(done.returncode)])[-1]}")


def _llamacpp_rate(job: dict) -> tuple[float, float]:
    import llama_cpp.llama as llama_module
    from llama_cpp import Llama

    if not job["repack"]:
        defaults = llama_module.llama_cpp.llama_model_default_params

        def without_repacking():
            params = defaults()
            params.use_extra_bufts = False
            return params

        llama_module.llama_cpp.llama_model_default_params = without_repacking
    prompt, new_tokens = job["prompt"], job["new_tokens"]
    llm = Llama(model_path=job["gguf"], n_ctx=len(prompt) + new_tokens + 8, n_threads=job["threads"],
                n_threads_batch=job["threads"], verbose=False)

    def rate() -> tuple[float, float]:
        llm.reset()  # else generate reuses the prompt cached by the run before, and skips its prefill
        times, start = [], time.perf_counter()
        for _ in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
            times.append(time.perf_counter())
            if len(times) == new_tokens:
                break
        return (len(times) - 1) / (times[-1] - times[0]), len(prompt) / (times[0] - start)

    rate()  # warm-up
    return _medians([rate() for _ in range(job["runs"])])


if __name__ == "__main__":  # the llama.cpp baseline's child process
    import json
    import sys

    print(json.dumps(_llamacpp_rate(json.loads(sys.argv[1]))))
