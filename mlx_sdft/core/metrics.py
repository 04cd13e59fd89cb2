"""Task metrics: pure functions of (prediction, reference) → score in [0, 1].

`exact`       the strings are equal after stripping surrounding whitespace
`normalized`  equal after lower-casing, dropping punctuation and collapsing whitespace
`regex`       the first match of --answer-regex (group 1 if it has one) is equal, normalized
`choice`      the first standalone multiple-choice letter (A–J) is equal
`module:fn`   a user function fn(prediction, reference) -> float, the module importable from the
              current folder (as `python -c "import module"` there would find it)
`file.py:fn`  the same from a file, by its path
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import string
import sys
from collections.abc import Callable
from pathlib import Path

from mlx_sdft.errors import InputError, one_line

Metric = Callable[[str, str], float]
BUILTIN = ("exact", "normalized", "regex", "choice")

_PUNCT = str.maketrans("", "", string.punctuation)
_CHOICE = re.compile(r"\b([A-J])\b")


def normalize(text: str) -> str:
    return " ".join(text.lower().translate(_PUNCT).split())


def exact(prediction: str, reference: str) -> float:
    return float(prediction.strip() == reference.strip())


def normalized(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def extract(pattern: re.Pattern, text: str) -> str | None:
    match = pattern.search(text)
    if match is None:
        return None
    return match.group(1) if pattern.groups else match.group(0)


def regex_metric(pattern: re.Pattern) -> Metric:
    def score(prediction: str, reference: str) -> float:
        # The reference may be the bare answer or a full demonstration that contains it.
        want = extract(pattern, reference)
        got = extract(pattern, prediction)
        return float(
            got is not None and normalize(got) == normalize(want if want is not None else reference)
        )

    return score


def choice(prediction: str, reference: str) -> float:
    got, want = _CHOICE.search(prediction), _CHOICE.search(reference)
    return float(got is not None and want is not None and got.group(1) == want.group(1))


def resolve_metric(name: str, answer_regex: str | None = None) -> Metric:
    """A metric by name; a bad regex or an unimportable user function is an InputError."""
    if name == "exact":
        return exact
    if name == "normalized":
        return normalized
    if name == "choice":
        return choice
    if name == "regex":
        if not answer_regex:
            raise InputError("--metric regex needs --answer-regex")
        try:
            return regex_metric(re.compile(answer_regex))
        except re.error as e:
            raise InputError(f"--answer-regex: {answer_regex!r} does not compile ({e})") from None
    if ":" in name:
        target, _, fn = name.rpartition(":")
        try:
            metric = getattr(_user_module(target), fn)
        except (ImportError, AttributeError) as e:
            raise InputError(
                f"--metric: cannot import {name!r} ({type(e).__name__}: {e})"
            ) from None
        except Exception as e:  # the user's module itself failed while it ran
            raise InputError(
                one_line(f"--metric: {target} raised {type(e).__name__}: {e}")
            ) from None
        if not callable(metric):
            raise InputError(f"--metric: {name!r} is not callable")
        return metric
    raise InputError(f"--metric: {name!r} is not one of {', '.join(BUILTIN)} or module:function")


def _user_module(target: str):
    """`path/to/file.py` loaded from that file; otherwise a module name imported with the current
    folder first on the path (a console script's sys.path lacks it, unlike `python -m`)."""
    if target.endswith(".py"):
        path = Path(target).expanduser()
        if not path.is_file():
            raise ImportError(f"no such file {target}")
        spec = importlib.util.spec_from_file_location(f"mlx_sdft_metric_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    return importlib.import_module(target)
