"""Prior-task metric: the reference answer appears in the prediction (any format, any case)."""

from mlx_sdft.core.metrics import normalize


def contains(prediction: str, reference: str) -> float:
    return float(normalize(reference) in normalize(prediction))
