"""Prior-task metric: one of the reference's answers appears in the prediction as whole words
(any case; "90-degree" holds 90, but a decimal stays one number, so "3.09" does not hold 3).
References list alternatives with "|": "eight|8", "Leonardo|da Vinci"."""

import re

_TOKEN = re.compile(r"\d+(?:[.,]\d+)*|[^\W\d_]+")


def _words(text: str) -> str:
    return f" {' '.join(_TOKEN.findall(text.lower()))} "


def contains(prediction: str, reference: str) -> float:
    said = _words(prediction)
    return float(any(_words(answer) in said for answer in reference.split("|")))
