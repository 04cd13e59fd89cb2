"""MLX float32 loss vs the numpy float64 reference: largest errors of values and gradients.

Run: python bench/parity.py     (uses MLX's default device; prints a table, then one JSON line)

Cases per divergence: SmolLM2's vocabulary (V = 49152) with independent logits and with a
teacher close to the student (teacher = student + 0.03·noise, the regime SDFT trains in), plus
two small ones. Value errors are over the per-token divergences and the loss; the gradient's
relative error is max|Δ| / max|reference|, since entrywise ratios are meaningless near 0.
"""

import json
import sys
from pathlib import Path

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # run from a checkout without installing
import mlx_sdft  # noqa: E402,F401  first: on Linux it loads OpenBLAS before MLX does

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from mlx_sdft.core import losses
from mlx_sdft.core import reference  # noqa: E402

CASES = [  # name, B, T, V, logit scale, teacher noise (None = independent teacher)
    ("V49152 indep", 4, 64, 49152, 3.0, None),
    ("V49152 near", 4, 64, 49152, 3.0, 0.03),
    ("V1000 x1", 3, 9, 1000, 1.0, None),
    ("V7 x10", 3, 9, 7, 10.0, None),
]


def make_case(seed, B, T, V, scale, noise):
    rng = np.random.default_rng(seed)
    student_BTV = scale * rng.standard_normal((B, T, V))
    teacher_BTV = (
        student_BTV + noise * rng.standard_normal((B, T, V))
        if noise
        else scale * rng.standard_normal((B, T, V))
    )
    lengths_B = rng.integers(T // 2, T + 1, size=B)
    mask_BT = (np.arange(T)[None, :] < lengths_B[:, None]).astype(np.float32)
    return student_BTV.astype(np.float32), teacher_BTV.astype(np.float32), mask_BT


def errors(student_BTV, teacher_BTV, mask_BT, divergence):
    s, t, m = mx.array(student_BTV), mx.array(teacher_BTV), mx.array(mask_BT)
    options = dict(divergence=divergence, skip=3, beta=0.5)
    (loss, _), grad_BTV = mx.value_and_grad(lambda s: losses.sdft_loss(s, t, m, **options))(s)
    div_BT = losses.token_divergence(s, t, divergence=divergence, beta=0.5)
    mx.eval(loss, grad_BTV, div_BT)
    values = np.append(np.array(div_BT), loss.item())
    ref_values = np.append(
        reference.token_divergence(student_BTV, teacher_BTV, divergence=divergence, beta=0.5),
        reference.sdft_loss(student_BTV, teacher_BTV, mask_BT, **options)[0],
    )
    ref_grad_BTV = reference.sdft_loss_grad(student_BTV, teacher_BTV, mask_BT, **options)
    grad_err = np.abs(np.array(grad_BTV) - ref_grad_BTV).max()
    return {
        "value_abs": float(np.abs(values - ref_values).max()),
        "value_rel": float((np.abs(values - ref_values) / np.abs(ref_values)).max()),
        "grad_abs": float(grad_err),
        "grad_rel": float(grad_err / np.abs(ref_grad_BTV).max()),
    }


def main():
    print(f"device: {mx.default_device()}, mlx {mx.__version__}")
    print(
        f"{'divergence':<10} {'case':<14} {'value abs':>10} {'value rel':>10} {'grad abs':>10} {'grad rel':>10}"
    )
    worst = {}
    for divergence in losses.DIVERGENCES:
        for seed, (name, *shape) in enumerate(CASES):
            err = errors(*make_case(seed, *shape), divergence)
            print(f"{divergence:<10} {name:<14} " + " ".join(f"{v:>10.2e}" for v in err.values()))
            for key, v in err.items():
                worst[f"{divergence}_{key}"] = max(worst.get(f"{divergence}_{key}", 0.0), v)
    print(
        json.dumps(
            {"device": str(mx.default_device()), **{k: float(f"{v:.3e}") for k, v in worst.items()}}
        )
    )


if __name__ == "__main__":
    main()
