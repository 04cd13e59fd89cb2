"""Degenerate completions: what a collapsing SDFT student writes, as a pure definition.

A completion (token ids, the stop token included when one was sampled) is **degenerate** when

- it was truncated: it hit its token budget without a stop token, or
- it repeats itself: some run of `NGRAM` = 4 consecutive tokens occurs `REPEATS` = 3 or more
  times in it (occurrences may overlap, so 6 copies of one token count).

Token ids, not words, so the same definition serves training (sampled ids), `eval` and `check`
without a tokenizer. A loop of period p is caught once it is 2p + 4 tokens long; a fluent
answer rarely repeats a 4-token run three times (code and lists can: a heuristic, which is why
`eval` reports the base model's rate next to the adapted one's). The stop token itself is
not part of any n-gram.

`len_ratio` is a completion's length over its demonstration's (both in tokens, stop token
included): a student that inflates its answers shows a ratio well above 1.
"""

from __future__ import annotations

from collections import Counter

NGRAM, REPEATS = 4, 3


def max_ngram_repeats(ids: list[int], n: int = NGRAM) -> int:
    """How often the most frequent run of n consecutive ids occurs (overlapping); 0 if shorter than n."""
    counts = Counter(tuple(ids[i : i + n]) for i in range(len(ids) - n + 1))
    return max(counts.values(), default=0)


def is_repetitive(ids: list[int], stop_ids=(), n: int = NGRAM, repeats: int = REPEATS) -> bool:
    body = ids[:-1] if ids and ids[-1] in set(stop_ids) else ids
    return max_ngram_repeats(body, n) >= repeats


def is_degenerate(
    ids: list[int], truncated: bool, stop_ids=(), n: int = NGRAM, repeats: int = REPEATS
) -> bool:
    """Truncated without a stop token, or some n-gram repeated `repeats` times (module docstring)."""
    return bool(truncated) or is_repetitive(ids, stop_ids, n, repeats)


def degenerate_rate(completions: list[list[int]], truncated: list[bool], stop_ids=()) -> float:
    """Fraction of completions that are degenerate; 0.0 for none."""
    flags = [is_degenerate(c, t, stop_ids) for c, t in zip(completions, truncated, strict=True)]
    return sum(flags) / max(len(flags), 1)


def len_ratio(completions: list[list[int]], demonstrations: list[list[int]]) -> float:
    """Mean over completions of len(completion) / len(its demonstration); 0.0 for none."""
    ratios = [len(c) / max(len(d), 1) for c, d in zip(completions, demonstrations, strict=True)]
    return sum(ratios) / max(len(ratios), 1)


def degeneration_sums(
    completions: list[list[int]],
    truncated: list[bool],
    demonstrations: list[list[int]],
    stop_ids=(),
) -> dict:
    """Per-batch sums that a report turns into means over its completions: `degenerate` (count)
    and `len_ratio` (sum of ratios)."""
    n = len(completions)
    return {
        "degenerate": n * degenerate_rate(completions, truncated, stop_ids),
        "len_ratio": n * len_ratio(completions, demonstrations),
    }
