"""Held-out evaluation: task metrics on greedy answers, and how much the adapters forgot.

- task: greedy answers to held-out prompts, scored against their demonstrations;
- retention_kl: mean per-token KL(base‖adapted) on completions the *base* model samples for
  general prompts (0 for untrained adapters; grows as the adapted model drifts);
- degenerate_rate: the fraction of greedy answers to the general prompts that are degenerate
  (core/degeneration.py), for the adapted model and (degenerate_rate_base) the base model;
  repetitive_rate(_base): the part of the definition that is loops alone, truncated or not
  (a fluent answer longer than the budget is truncated, not repetitive);
- perplexity of prior text (a JSONL of {"text": ...}) under the adapted and the base model.
The base model is the same model with its adapters off (teacher.using with the base leaves),
so evaluation needs no fusing and no second copy of the weights.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from mlx_sdft.core.data import Example, load_dataset, load_examples, need_demonstrations
from mlx_sdft.core.degeneration import is_degenerate, is_repetitive
from mlx_sdft.core.hub_data import is_saved_dataset
from mlx_sdft.errors import InputError
from mlx_sdft.core.losses import sft_loss
from mlx_sdft.core.metrics import Metric
from mlx_sdft.core.prompts import apply_system_prompt
from mlx_sdft.core.scoring import completion_logits, completion_mask, pad_rows
from mlx_sdft.core.teacher import Leaves, using
from mlx_sdft.measure.rules import drift, greedy


def general_prompts_file() -> Path:
    """About 100 diverse prompts written for this project (facts, writing, code, advice, math)."""
    return Path(str(files("mlx_sdft") / "assets" / "general_prompts.jsonl"))


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def predict(model: nn.Module, tokenizer, prompts: list[list[dict]], max_tokens: int, batch_size: int,
            tools: list[list | None] | None = None, advance: Callable[[int], None] | None = None) -> list[str]:
    """Greedy answers (temperature 0), decoded without the stop token; `tools[i]` goes with prompts[i].
    `advance(n)` is called after each batch of n prompts (a progress bar)."""
    return greedy(model, tokenizer, prompts, max_tokens, batch_size, advance, tools).texts


@dataclass
class TaskResult:
    score: float
    rows: list[dict]


def evaluate_task(model, tokenizer, examples: list[Example], metric: Metric, max_tokens: int,
                  batch_size: int, advance: Callable[[int], None] | None = None) -> TaskResult:
    answers = predict(model, tokenizer, [ex.prompt for ex in examples], max_tokens, batch_size,
                      [ex.tools for ex in examples], advance)
    rows = [{"where": ex.where, "prompt": ex.prompt[-1]["content"], "prediction": answer,
             "reference": ex.demonstration, "score": float(metric(answer, ex.demonstration))}
            for ex, answer in zip(examples, answers)]
    return TaskResult(sum(r["score"] for r in rows) / max(len(rows), 1), rows)


def retention_kl(model: nn.Module, tokenizer, base: Leaves, prompts: list[list[dict]], max_tokens: int,
                 batch_size: int, advance: Callable[[int], None] | None = None) -> float:
    """Mean per-token KL(base‖adapted) over completions sampled (temperature 1) from the base model;
    `advance(n)` after each batch of n prompts."""
    return drift(model, tokenizer, base, [None], prompts, None, max_tokens, batch_size, None, advance)[0]


def general_answers(model: nn.Module, tokenizer, prompts: list[list[dict]], max_tokens: int,
                    batch_size: int, advance: Callable[[int], None] | None = None) -> list[dict]:
    """Greedy answers to general prompts, each with its `degenerate` flag (core/degeneration.py);
    `advance(n)` after each batch of n prompts."""
    stops = sorted(tokenizer.eos_token_ids)
    answers = greedy(model, tokenizer, prompts, max_tokens, batch_size, advance)
    return [{"prompt": p[-1]["content"], "answer": text, "tokens": len(c), "truncated": t,
             "repetitive": is_repetitive(c, stops), "degenerate": is_degenerate(c, t, stops)}
            for p, text, c, t in zip(prompts, answers.texts, answers.ids, answers.truncated)]


def _rate(rows: list[dict], key: str = "degenerate") -> float:
    return sum(r[key] for r in rows) / max(len(rows), 1)


def perplexity(model: nn.Module, tokenizer, texts: list[str], max_seq_length: int, batch_size: int) -> float:
    """exp of the mean next-token cross-entropy over all tokens of the texts."""
    total, count = 0.0, 0
    for batch in _batches([tokenizer.encode(t)[:max_seq_length] for t in texts], batch_size):
        batch = [ids for ids in batch if len(ids) > 1]
        if not batch:
            continue
        targets = [ids[1:] for ids in batch]
        logits_BTV = completion_logits(model, [ids[:1] for ids in batch], targets)
        loss, ntoks = sft_loss(logits_BTV, pad_rows(targets), completion_mask([len(t) for t in targets]))
        total += loss.item() * ntoks.item()
        count += ntoks.item()
    return math.exp(total / max(count, 1))


def progress_bars(console) -> Progress:
    """Bars with counts ("task prompts 8/12"), elapsed and remaining time."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console)


def load_texts(path: str | Path) -> list[str]:
    """A JSONL of {"text": ...} lines, checked line by line like training data."""
    texts = []
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line).get("text")
        except (ValueError, AttributeError):
            raise InputError(f"{path}:{n}: expected a JSON object with a \"text\" string") from None
        if not isinstance(text, str) or not text:
            raise InputError(f"{path}:{n}: \"text\" must be a non-empty string")
        texts.append(text)
    if not texts:
        raise InputError(f"{path}: no texts")
    return texts


def load_prompts(path: str | Path | None, limit: int) -> list[list[dict]]:
    """General prompts for retention: any training-data format, or {"prompt": ...} lines."""
    path = Path(path) if path else general_prompts_file()
    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), (str, list)):
                raise InputError(f"{path}:{n}: expected {{\"prompt\": ...}}")
            prompt = row["prompt"]
            prompts.append([{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt)
    return prompts[:limit]


def task_examples(data: str | Path) -> list[Example]:
    """A .jsonl file, or a data folder's test.jsonl (valid.jsonl if it has no test split); a Hugging
    Face dataset's test split (else its valid one)."""
    path = Path(data)
    held_out = [path / name for name in ("test.jsonl", "valid.jsonl") if path.is_dir() and (path / name).is_file()]
    if path.is_file() or held_out:
        examples = load_examples(held_out[0] if held_out else path)
    elif path.is_dir() and not is_saved_dataset(path):
        raise InputError(f"{path}: no test.jsonl or valid.jsonl to evaluate on")
    else:
        examples = _held_out(load_dataset(data), data)
    need_demonstrations(examples, "eval (the reference answer)")
    return examples


def _held_out(splits: dict[str, list[Example]], data) -> list[Example]:
    for name in ("test", "valid"):
        if name in splits:
            return splits[name]
    raise InputError(f"{data}: no test or valid split to evaluate on")


def evaluate_adapters(model, tokenizer, base: Leaves | None, examples: list[Example], metric: Metric,
                      cfg, progress: Progress | None = None) -> tuple[dict, list[dict], list[dict]]:
    """All numbers of one evaluation: the task score, the degenerate rate of greedy answers to the
    general prompts, and with a base to compare, retention and the base's degenerate rate.
    Returns (summary, task rows, general-prompt rows). With a rich `progress`, bars count the task
    prompts, the general prompts answered and the retention prompts."""
    def bar(name: str, total: int):
        if progress is None:
            return None
        task_id = progress.add_task(name, total=total)
        return lambda n: progress.advance(task_id, n)

    task = evaluate_task(model, tokenizer, examples, metric, cfg.max_tokens, cfg.batch_size,
                         bar("task prompts", len(examples)))
    summary, general = {"task_score": task.score, "examples": len(examples)}, []
    if cfg.retention:
        prompts = load_prompts(cfg.general_prompts, cfg.num_general_prompts)
        general = general_answers(model, tokenizer, prompts, cfg.general_max_tokens, cfg.batch_size,
                                  bar("general prompts", len(prompts)))
        summary["degenerate_rate"], summary["repetitive_rate"] = _rate(general), _rate(general, "repetitive")
    if base is not None and cfg.retention:
        summary["retention_kl"] = retention_kl(model, tokenizer, base, prompts, cfg.retention_max_tokens, cfg.batch_size,
                                               bar("retention prompts", len(prompts)))
        with using(model, base):
            base_rows = general_answers(model, tokenizer, prompts, cfg.general_max_tokens, cfg.batch_size,
                                        bar("general prompts, base", len(prompts)))
        summary["degenerate_rate_base"], summary["repetitive_rate_base"] = _rate(base_rows), _rate(base_rows, "repetitive")
        general = [{**r, "base_answer": b["answer"], "base_degenerate": b["degenerate"], "base_repetitive": b["repetitive"]}
                   for r, b in zip(general, base_rows)]
    if cfg.prior_text:
        texts = load_texts(cfg.prior_text)
        summary["prior_ppl"] = perplexity(model, tokenizer, texts, cfg.max_seq_length, cfg.batch_size)
        if base is not None:
            with using(model, base):
                summary["prior_ppl_base"] = perplexity(model, tokenizer, texts, cfg.max_seq_length, cfg.batch_size)
    return summary, task.rows, general


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
    model, tokenizer, base = open_model_for(cfg, adapters=cfg.adapter_path, console=console, note=True)
    with progress_bars(console) as progress:
        summary, rows, general = evaluate_adapters(model, tokenizer, base, examples, metric, cfg, progress)
    summary = {"model": cfg.model, "adapter_path": cfg.adapter_path, "data": str(cfg.data), "metric": cfg.metric, **summary}

    out = Path(cfg.output or (Path(cfg.adapter_path) / "eval" if cfg.adapter_path else "eval"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    if general:
        (out / "general.jsonl").write_text("".join(json.dumps(r) + "\n" for r in general), encoding="utf-8")
    write_json(out / "summary.json", summary)
    table = Table(title=f"{cfg.data} ({cfg.metric})")
    shown = [k for k in ("task_score", "retention_kl", "degenerate_rate", "degenerate_rate_base", "prior_ppl",
                         "prior_ppl_base") if k in summary]
    for key in shown:
        table.add_column(key, justify="right")
    table.add_row(*(f"{summary[k]:.4f}" for k in shown))
    console.print(table)
    console.print(f"predictions and summary written to {out}")
    return summary
