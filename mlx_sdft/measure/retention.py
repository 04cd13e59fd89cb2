"""What adapters forgot, on general prompts (not the task's):

- retention KL: mean per-token KL(base‖adapted) on completions the *base* model samples
  (temperature 1); 0 for untrained adapters, growing as the adapted model drifts;
- general answers: greedy answers, each flagged degenerate (core/degeneration.py: truncated or
  repetitive) and repetitive (loops alone; a fluent answer longer than the budget is truncated,
  not repetitive), and the rate of either over the answers.
The base model is the same model with its adapters off (teacher.using with the base leaves), so
this needs no fusing and no second copy of the weights.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path

import mlx.nn as nn

from mlx_sdft.core.degeneration import is_degenerate, is_repetitive
from mlx_sdft.core.teacher import Leaves
from mlx_sdft.errors import InputError
from mlx_sdft.measure.rules import drift, greedy


def general_prompts_file() -> Path:
    """About 100 diverse prompts written for this project (facts, writing, code, advice, math)."""
    return Path(str(files("mlx_sdft") / "assets" / "general_prompts.jsonl"))


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
                raise InputError(f'{path}:{n}: expected {{"prompt": ...}}')
            prompt = row["prompt"]
            prompts.append(
                [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            )
    return prompts[:limit]


def retention_kl(
    model: nn.Module,
    tokenizer,
    base: Leaves,
    prompts: list[list[dict]],
    max_tokens: int,
    batch_size: int,
    advance: Callable[[int], None] | None = None,
) -> float:
    """Mean per-token KL(base‖adapted) over completions sampled (temperature 1) from the base model;
    `advance(n)` after each batch of n prompts."""
    return drift(
        model, tokenizer, base, [None], prompts, None, max_tokens, batch_size, None, advance
    )[0]


def general_answers(
    model: nn.Module,
    tokenizer,
    prompts: list[list[dict]],
    max_tokens: int,
    batch_size: int,
    advance: Callable[[int], None] | None = None,
) -> list[dict]:
    """Greedy answers to general prompts, each with its `degenerate` flag (core/degeneration.py);
    `advance(n)` after each batch of n prompts."""
    stops = sorted(tokenizer.eos_token_ids)
    answers = greedy(model, tokenizer, prompts, max_tokens, batch_size, advance)
    return [
        {
            "prompt": p[-1]["content"],
            "answer": text,
            "tokens": len(c),
            "truncated": t,
            "repetitive": is_repetitive(c, stops),
            "degenerate": is_degenerate(c, t, stops),
        }
        for p, text, c, t in zip(prompts, answers.texts, answers.ids, answers.truncated)
    ]


def rate(rows: list[dict], key: str = "degenerate") -> float:
    """The share of general answers flagged `key` ("degenerate", "repetitive" or "truncated")."""
    return sum(r[key] for r in rows) / max(len(rows), 1)
