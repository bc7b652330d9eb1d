"""The tasks `runner eval` can run: those shipped in runner/eval/tasks/ and the user's
--include-path folders, lm-eval task YAMLs whose data are local files (no network, ever)."""
from __future__ import annotations

from pathlib import Path

from runner.config.errors import ConfigError, problem

SHIPPED = Path(__file__).with_name("tasks")
# datasets' builders that read local files named by dataset_kwargs.data_files.
LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow")
WHERE = "command line"


def manager(include: list[str]):
    """lm-eval's TaskManager over the shipped tasks and `include` (never lm-eval's own: they download)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(SHIPPED), *include], include_defaults=False)


def specs(names: list[str], include: list[str]) -> list:
    """What simple_evaluate takes for `names`: each task's config, its data files made absolute
    (relative ones are relative to the task's YAML) and checked; a group by its name."""
    problems = [problem(WHERE, "--include-path", "is not a folder", p) for p in include if not Path(p).is_dir()]
    if problems:
        raise ConfigError(problems)
    tasks = manager(include)
    known = tasks.all_tasks
    out = []
    for name in names:
        entry = tasks.task_index.get(name)
        if entry is None:
            problems.append(problem(WHERE, "--tasks", f"unknown task; available: {', '.join(known) or 'none'}"
                                    " (add one with --include-path DIR)", name))
        elif entry.yaml_path is None or entry.kind.name != "TASK":
            out.append(name)  # a group, a tag or a Python task: lm-eval builds it
        else:
            config, found = _with_local_data(name, Path(entry.yaml_path))
            problems += found
            out.append(config)
    if problems:
        raise ConfigError(problems)
    return out


def _with_local_data(name: str, yaml_path: Path) -> tuple[dict, list]:
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(yaml_path, resolve_func=True)
    key = f"--tasks {name}"
    source = config.get("dataset_path")
    kwargs = dict(config.get("dataset_kwargs") or {})
    files = kwargs.get("data_files")
    if source not in LOCAL_BUILDERS:
        if source is not None and (yaml_path.parent / source).is_dir():
            config["dataset_path"] = str(yaml_path.parent / source)
            return config, []
        return config, [problem(str(yaml_path), key, "dataset_path must be a local folder or one of "
                                f"{', '.join(LOCAL_BUILDERS)} with dataset_kwargs.data_files: runner eval "
                                "never downloads", source)]
    if not files:
        return config, [problem(str(yaml_path), key, f"dataset_path {source} needs dataset_kwargs.data_files")]
    problems = []

    def local(path: str) -> str:
        full = Path(path) if Path(path).is_absolute() else yaml_path.parent / path
        if not full.is_file():
            problems.append(problem(str(yaml_path), key, "data file is missing", str(full)))
        return str(full)

    if isinstance(files, dict):
        files = {split: [local(p) for p in ([v] if isinstance(v, str) else v)] for split, v in files.items()}
    else:
        files = [local(p) for p in ([files] if isinstance(files, str) else files)]
    config["dataset_kwargs"] = {**kwargs, "data_files": files}
    return config, problems
