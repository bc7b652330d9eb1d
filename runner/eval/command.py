"""`runner eval`: the checks before anything loads, one rank's evaluation, and the report."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from runner.config.errors import ConfigError, problem

EXTRA = "eval"
# Offline, always: datasets and the hub read these when imported.
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1",
           # lm-eval's and datasets' own bars would drown the table; runner's bar shows on a terminal.
           "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}


def require_lm_eval() -> None:
    """Import lm-eval offline, or say which extra installs it."""
    os.environ.update(OFFLINE)
    try:
        import lm_eval
        from lm_eval.api.model import TemplateLM

        del lm_eval, TemplateLM  # only whether they import was the question
    except ImportError as e:
        raise ConfigError([problem("runner eval", "lm-eval", f"is not installed ({e}); install the {EXTRA} extra: "
                                   f"pip install -e '.[{EXTRA}]' (or pip install 'lm-eval>=0.4,<0.5')")]) from None
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its warnings are about tasks and hubs we do not use


def check(tasks: str, limit: int | None, include: tuple[str, ...]) -> list[str]:
    """The task names, once the options and the tasks' local data are checked (fails fast, before torch)."""
    problems = []
    if limit is not None and limit < 1:
        problems.append(problem("command line", "--limit", "must be at least 1 (documents per task)", limit))
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        problems.append(problem("command line", "--tasks", "names no task", tasks))
    if problems:
        raise ConfigError(problems)
    require_lm_eval()
    from runner.eval import catalog

    catalog.specs(names, list(include))
    return names


def evaluate(rank, recipe, recipe_path: str, names: list[str], include: tuple[str, ...], limit: int | None,
             batch_size: int) -> dict | None:
    """lm-eval's results for the tasks on this rank (every rank runs the same forwards); JSON-safe."""
    require_lm_eval()
    from lm_eval import evaluator
    from lm_eval.utils import handle_non_serializable

    from runner import pipeline
    from runner.eval import catalog
    from runner.eval.adapter import RunnerLM
    from runner.report import Reporter

    report = Reporter(rank=rank.rank if rank else 0)
    built = pipeline.build(recipe, recipe_path, report.note, report.progress, rank=rank)
    lm = RunnerLM(built, batch_size, report.progress)
    results = evaluator.simple_evaluate(model=lm, tasks=catalog.specs(names, list(include)), limit=limit,
                                        task_manager=catalog.manager(list(include)), log_samples=False,
                                        bootstrap_iters=1000)
    if results is None:  # lm-eval reports on the first local rank only (every rank ran the same forwards)
        return None
    ops = built.model.ops
    quantized = sorted({m.kernel for m in built.model.modules() if isinstance(getattr(m, "kernel", None), str)})
    kernels_used = f"ops {getattr(ops, '__name__', type(ops).__name__).rsplit('.', 1)[-1]}" + \
        (f", quantized {'/'.join(quantized)}" if quantized else "")
    keep = {"kernels_used": kernels_used}
    keep |= {k: results[k] for k in ("results", "groups", "group_subtasks", "configs", "versions", "n-shot",
                                    "higher_is_better", "n-samples") if k in results}
    return json.loads(json.dumps(keep, default=handle_non_serializable))


def report(results: dict, recipe, recipe_path: str, limit: int | None, json_path: str | None) -> str:
    """The caption and the table; the JSON written where asked."""
    if json_path:
        write_json(json_path, results, recipe)
    return "\n".join([caption(recipe, recipe_path, limit) + f" ({results['kernels_used']})", *table(results)])


def table(results: dict) -> list[str]:
    """One markdown row per task and metric: value and standard error."""
    lines = ["| task | metric | value | stderr |", "|---|---|---|---|"]
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, _, flt = key.partition(",")
            if key in ("alias", "sample_len") or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            err = metrics.get(f"{metric}_stderr,{flt}")
            name = metric if flt in ("none", "") else f"{metric} ({flt})"
            lines.append(f"| {task} | {name} | {value:.4f} | {_fmt(err)} |")
    return lines


def _fmt(err) -> str:
    return f"{err:.4f}" if isinstance(err, (int, float)) else ""


def caption(recipe, recipe_path: str, limit: int | None) -> str:
    q = recipe.quant
    mode = q.mode.value + (f" g{q.groupsize}" if q.mode.is_int4 else "")
    return (f"{Path(recipe_path).stem}: dtype {recipe.dtype.value}, quant {mode}, kernels {recipe.kernels.value}, "
            f"draft {recipe.draft.kind.value}" + (f", --limit {limit}" if limit else ""))


def write_json(path: str, results: dict, recipe) -> None:
    """lm-eval's results dict, with the resolved recipe beside it."""
    import yaml

    from runner.config.resolve import to_yaml

    Path(path).write_text(json.dumps({**results, "recipe": yaml.safe_load(to_yaml(recipe))}, indent=2))
