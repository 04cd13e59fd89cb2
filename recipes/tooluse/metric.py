"""The ToolAlpaca evaluator of the official SDFT code (`eval_tooluse.py`), as an mlx-sdft metric.

    PYTHONPATH=. mlx-sdft eval --metric recipes.tooluse.metric:score ...     (from the repo root)

An answer is correct (1.0) when, as in the official evaluator (docs/method.md, "Sources"):
- the multiset of actions equals the gold one (order does not matter, repeats do), and
- the merged argument dict equals the gold one (every action's input dict merged in order, a
  later key overriding an earlier one; argument order does not matter).
Otherwise 0.0.

The prediction is parsed exactly as the official code parses a model's answer:
- actions: every `Action:\\s*(\\w+)` (so a name with a hyphen or dot is cut at it);
- inputs: every `Action Input:\\s*({.*?})` (non-greedy, across lines) that `json.loads` reads;
  the others are skipped. The non-greedy match ends at the first `}`, so a *nested* JSON
  input never parses: an official quirk, kept so that scores stay comparable.

The reference is the test line's assistant message. `prepare.py` writes the gold
(`golden_answer`) there as `render_gold` does, one "Action: NAME" / "Action Input: JSON" pair
per gold action, and `reference_gold` reads it back the way the official code reads
`golden_answer`: the whole name, and the whole input through `json.loads` (nested values
included), skipping an input that is not a JSON object. A demonstration (valid.jsonl,
train.jsonl) is read the same way, so `mlx-sdft check --metric` works on it too.
"""

from __future__ import annotations

import json
import re
from collections import Counter

# The official evaluator's two regular expressions (eval_tooluse.py).
_ACTION = re.compile(r"Action:\s*(\w+)")
_ACTION_INPUT = re.compile(r"Action Input:\s*({.*?})", re.DOTALL)
# For references: the rest of the line after "Action:", and the position after "Action Input:".
_GOLD_ACTION = re.compile(r"Action:[ \t]*([^\n]*)")
_GOLD_INPUT = re.compile(r"Action Input:\s*")
_DECODER = json.JSONDecoder()


def extract_actions(text: str) -> list[str]:
    """Every action name in a model's answer, as the official evaluator finds them."""
    return _ACTION.findall(text)


def extract_action_inputs(text: str) -> dict:
    """Every parseable `Action Input: {...}` of a model's answer, merged in order."""
    merged: dict = {}
    for block in _ACTION_INPUT.findall(text):
        try:
            merged.update(json.loads(block))  # "{...}" that parses is always an object
        except json.JSONDecodeError:
            continue
    return merged


def render_gold(pairs: list[tuple[str, str]]) -> str:
    """The gold (action name, action input JSON string) pairs as reference text."""
    return "\n".join(f"Action: {name}\nAction Input: {args.strip()}" for name, args in pairs)


def reference_gold(reference: str) -> tuple[list[str], dict]:
    """(gold actions, merged gold arguments) from a reference written by `render_gold`, or a demonstration."""
    actions = [name.strip() for name in _GOLD_ACTION.findall(reference) if name.strip()]
    merged: dict = {}
    for match in _GOLD_INPUT.finditer(reference):
        try:
            value, _ = _DECODER.raw_decode(reference, match.end())
        except json.JSONDecodeError:
            continue  # the official code skips an input json.loads cannot read
        if isinstance(value, dict):
            merged.update(value)
    return actions, merged


def gold_from_answer(pairs: list[tuple[str, str]]) -> tuple[list[str], dict]:
    """(gold actions, merged gold arguments) straight from `golden_answer`, as the official code builds them."""
    merged: dict = {}
    for _, args in pairs:
        try:
            value = json.loads(args)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            merged.update(value)
    return [name for name, _ in pairs], merged


def score(prediction: str, reference: str) -> float:
    """1.0 when the actions (as a multiset) and the merged arguments equal the gold ones, else 0.0."""
    gold_actions, gold_inputs = reference_gold(reference)
    same_actions = Counter(extract_actions(prediction)) == Counter(gold_actions)
    return float(same_actions and extract_action_inputs(prediction) == gold_inputs)
