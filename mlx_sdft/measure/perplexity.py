"""Perplexity of prior text (a JSONL of {"text": ...}): exp of the mean next-token cross-entropy,
under the adapted model or, with the adapters off, the base model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.nn as nn

from mlx_sdft.core.losses import sft_loss
from mlx_sdft.core.scoring import completion_logits, completion_mask, pad_rows
from mlx_sdft.errors import InputError


def perplexity(
    model: nn.Module, tokenizer, texts: list[str], max_seq_length: int, batch_size: int
) -> float:
    """exp of the mean next-token cross-entropy over all tokens of the texts."""
    total, count = 0.0, 0
    encoded = [tokenizer.encode(t)[:max_seq_length] for t in texts]
    for start in range(0, len(encoded), batch_size):
        batch = [ids for ids in encoded[start : start + batch_size] if len(ids) > 1]
        if not batch:
            continue
        targets = [ids[1:] for ids in batch]
        logits_BTV = completion_logits(model, [ids[:1] for ids in batch], targets)
        loss, ntoks = sft_loss(
            logits_BTV, pad_rows(targets), completion_mask([len(t) for t in targets])
        )
        total += loss.item() * ntoks.item()
        count += ntoks.item()
    return math.exp(total / max(count, 1))


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
            raise InputError(f'{path}:{n}: expected a JSON object with a "text" string') from None
        if not isinstance(text, str) or not text:
            raise InputError(f'{path}:{n}: "text" must be a non-empty string')
        texts.append(text)
    if not texts:
        raise InputError(f"{path}: no texts")
    return texts
