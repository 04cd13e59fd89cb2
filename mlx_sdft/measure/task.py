"""Prediction and task score: greedy answers (temperature 0) to held-out prompts, each scored
against its demonstration by the task's metric; and which examples are held out (a data folder's
test split, else its valid split)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.nn as nn

from mlx_sdft.core.data import Example, load_dataset, load_examples, need_demonstrations
from mlx_sdft.core.hub_data import is_saved_dataset
from mlx_sdft.core.metrics import Metric
from mlx_sdft.errors import InputError
from mlx_sdft.measure.rules import greedy


def predict(
    model: nn.Module,
    tokenizer,
    prompts: list[list[dict]],
    max_tokens: int,
    batch_size: int,
    tools: list[list | None] | None = None,
    advance: Callable[[int], None] | None = None,
) -> list[str]:
    """Greedy answers (temperature 0), decoded without the stop token; `tools[i]` goes with prompts[i].
    `advance(n)` is called after each batch of n prompts (a progress bar)."""
    return greedy(model, tokenizer, prompts, max_tokens, batch_size, advance, tools).texts


@dataclass
class TaskResult:
    score: float
    rows: list[dict]


def evaluate_task(
    model,
    tokenizer,
    examples: list[Example],
    metric: Metric,
    max_tokens: int,
    batch_size: int,
    advance: Callable[[int], None] | None = None,
) -> TaskResult:
    """The mean of `metric(prediction, demonstration)` over the examples, and a row per example."""
    answers = predict(
        model,
        tokenizer,
        [ex.prompt for ex in examples],
        max_tokens,
        batch_size,
        [ex.tools for ex in examples],
        advance,
    )
    rows = [
        {
            "where": ex.where,
            "prompt": ex.prompt[-1]["content"],
            "prediction": answer,
            "reference": ex.demonstration,
            "score": float(metric(answer, ex.demonstration)),
        }
        for ex, answer in zip(examples, answers)
    ]
    return TaskResult(sum(r["score"] for r in rows) / max(len(rows), 1), rows)


def task_examples(data: str | Path) -> list[Example]:
    """A .jsonl file, or a data folder's test.jsonl (valid.jsonl if it has no test split); a Hugging
    Face dataset's test split (else its valid one)."""
    path = Path(data)
    held_out = [
        path / name
        for name in ("test.jsonl", "valid.jsonl")
        if path.is_dir() and (path / name).is_file()
    ]
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
