"""Task metrics on hand-made cases, and the errors a bad metric option gives."""

import re

import pytest

from mlx_sdft.errors import InputError
from mlx_sdft.core.metrics import choice, exact, normalize, normalized, regex_metric, resolve_metric


def test_exact_and_normalized():
    assert exact(" Paris ", "Paris") == 1.0 and exact("paris", "Paris") == 0.0
    assert normalize("The  capital, of PERU is Lima!") == "the capital of peru is lima"
    assert normalized("the capital of peru is lima", "The capital of Peru is Lima.") == 1.0
    assert normalized("Lima", "The capital of Peru is Lima.") == 0.0


def test_regex_extracts_group_one_from_both_sides():
    metric = regex_metric(re.compile(r"answer is (\w+)"))
    assert metric("I think the answer is Lima.", "The answer is lima") == 1.0
    assert metric("I think the answer is Quito.", "The answer is Lima") == 0.0
    assert metric("no answer here", "The answer is Lima") == 0.0
    # a bare reference (no match in it) is compared whole
    assert regex_metric(re.compile(r"#### (\d+)"))("so #### 42", "42") == 1.0


def test_choice_letter():
    assert choice("The answer is (B).", "B") == 1.0
    assert choice("B) because", "Answer: C") == 0.0
    assert choice("none of them", "A") == 0.0


def test_user_metric_and_errors(tmp_path, monkeypatch):
    (tmp_path / "my_metrics.py").write_text(
        "def length_ratio(p, r):\n    return min(len(p), len(r)) / max(len(p), len(r))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_metric("my_metrics:length_ratio")("ab", "abcd") == 0.5
    with pytest.raises(InputError, match="cannot import 'nope_module:f'"):
        resolve_metric("nope_module:f")
    with pytest.raises(InputError, match="cannot import 'my_metrics:missing'"):
        resolve_metric("my_metrics:missing")
    with pytest.raises(InputError, match=r"--answer-regex: '\(' does not compile"):
        resolve_metric("regex", "(")
    with pytest.raises(InputError, match="needs --answer-regex"):
        resolve_metric("regex")
    with pytest.raises(InputError, match="'bleu' is not one of"):
        resolve_metric("bleu")
