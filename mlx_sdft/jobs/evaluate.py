"""`mlx-sdft eval`: the held-out task score of a set of adapters and how much they forgot, written
to predictions.jsonl, general.jsonl and summary.json (the numbers: measure/evaluation.py)."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx

from mlx_sdft.core.prompts import apply_system_prompt
from mlx_sdft.machine.report import progress_bars
from mlx_sdft.measure.evaluation import evaluate_adapters
from mlx_sdft.measure.perplexity import load_texts
from mlx_sdft.measure.retention import load_prompts
from mlx_sdft.measure.task import task_examples


def run_eval(cfg, console=None) -> dict:
    """Everything `mlx-sdft eval` does; writes predictions.jsonl and summary.json."""
    from mlx_sdft.machine.report import make_console
    from rich.table import Table

    from mlx_sdft.atomic import write_json
    from mlx_sdft.core.metrics import resolve_metric
    from mlx_sdft.opening import open_model_for

    console = console or make_console()
    metric = resolve_metric(cfg.metric, cfg.answer_regex)
    examples = apply_system_prompt(task_examples(cfg.data), cfg.system_prompt)
    if cfg.prior_text:
        load_texts(cfg.prior_text)  # check it before any weights load
    if cfg.retention:
        load_prompts(cfg.general_prompts, cfg.num_general_prompts)
    mx.random.seed(cfg.seed)
    model, tokenizer, base = open_model_for(
        cfg, adapters=cfg.adapter_path, console=console, note=True
    )
    with progress_bars(console) as progress:
        summary, rows, general = evaluate_adapters(
            model, tokenizer, base, examples, metric, cfg, progress
        )
    summary = {
        "model": cfg.model,
        "adapter_path": cfg.adapter_path,
        "data": str(cfg.data),
        "metric": cfg.metric,
        **summary,
    }

    out = Path(cfg.output or (Path(cfg.adapter_path) / "eval" if cfg.adapter_path else "eval"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "predictions.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8"
    )
    if general:
        (out / "general.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in general), encoding="utf-8"
        )
    write_json(out / "summary.json", summary)
    table = Table(title=f"{cfg.data} ({cfg.metric})")
    shown = [
        k
        for k in (
            "task_score",
            "retention_kl",
            "degenerate_rate",
            "degenerate_rate_base",
            "prior_ppl",
            "prior_ppl_base",
        )
        if k in summary
    ]
    for key in shown:
        table.add_column(key, justify="right")
    table.add_row(*(f"{summary[k]:.4f}" for k in shown))
    console.print(table)
    console.print(f"predictions and summary written to {out}")
    return summary
