"""The SciKnowEval Chemistry L-3 evaluator of the official SDFT code (`eval_science.py`), as an
mlx-sdft metric.

    PYTHONPATH=. mlx-sdft eval --metric recipes.science.metric:score ...     (from the repo root)

The answer is the text inside the last `<answer>`...`</answer>`, stripped, and it is correct
(1.0) when it equals the gold letter exactly (case matters), else 0.0. This is the official
extraction, quirks included (docs/method.md, "Sources"):
- text after the last `<answer>` counts even when `</answer>` is missing (a truncated answer);
- an answer with no `<answer>` tag at all is compared whole, so a bare "B" scores 1 but
  "The answer is B" scores 0;
- "<answer>b</answer>" does not match "B".

The reference is the test line's assistant message. `prepare.py` writes the gold letter there
as "<answer>B</answer>"; a bare letter, or a demonstration ending in `<answer>B</answer>`
(valid.jsonl, train.jsonl), gives the same gold through the same extraction.
"""

from __future__ import annotations


def extract_xml_answer(text: str) -> str:
    """The official extraction: after the last "<answer>", up to the next "</answer>", stripped."""
    return text.split("<answer>")[-1].split("</answer>")[0].strip()


def gold_letter(reference: str) -> str:
    """The gold answer of a reference: "<answer>B</answer>", a demonstration with it, or "B"."""
    return extract_xml_answer(reference)


def score(prediction: str, reference: str) -> float:
    """1.0 when the prediction's answer equals the gold one, else 0.0 (an empty gold never matches)."""
    gold = gold_letter(reference)
    return float(bool(gold) and extract_xml_answer(prediction) == gold)
