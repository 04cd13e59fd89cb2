"""Prior-task metric: one of the reference's answers appears in the prediction as whole words
(any case; "90-degree" holds 90, but a decimal stays one number, so "3.09" does not hold 3).
References list alternatives with "|": "eight|8", "Leonardo|da Vinci". The same metric as the
gate's prior-answers check, which owns it."""

from mlx_sdft.measure.rules import contains  # noqa: F401
