"""The loss's forward and backward pass over full-vocabulary logits: the closed-form gradient that
`losses.token_divergence` uses (`kl_of_logits`, `jsd_of_logits`), against automatic
differentiation of the same divergence written with plain MLX ops on `log_softmax` (what the
closed form replaced), side by side in one run.

Run: python bench/loss.py [--quick] [--json out.json]

Student and teacher logits of SmolLM2's vocabulary for 4 × 48 completion positions (--quick:
4 × 8 × 512). Each repetition times both sides after one warm-up; the record gives the best
seconds, the peak memory above what was resident before (mx.reset_peak_memory), and the ratios
autodiff / closed form (> 1: the closed form is faster or smaller).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # run from a checkout without installing
import mlx_sdft  # noqa: E402,F401  first: on Linux it loads OpenBLAS before MLX does

import mlx.core as mx  # noqa: E402
from shapes import FULL, QUICK, emit, machine, parser  # noqa: E402

from mlx_sdft.core import losses  # noqa: E402


def autodiff_divergence(
    student_logprobs_BTV, teacher_logprobs_BTV, divergence: str, beta: float = 0.5
):
    """forward KL(q‖p), reverse KL(p‖q) or jsd from log-probabilities, left to MLX's automatic VJP."""

    def kl(a_BTV, b_BTV):
        return (mx.exp(a_BTV) * (a_BTV - b_BTV)).sum(axis=-1)

    p_BTV, q_BTV = student_logprobs_BTV, teacher_logprobs_BTV
    if divergence == "forward":
        return kl(q_BTV, p_BTV)
    if divergence == "reverse":
        return kl(p_BTV, q_BTV)
    m_BTV = mx.logaddexp(math.log(1 - beta) + p_BTV, math.log(beta) + q_BTV)
    return beta * kl(q_BTV, m_BTV) + (1 - beta) * kl(p_BTV, m_BTV)


def measure(fn, student_BTV) -> tuple[float, int]:
    value_and_grad = mx.value_and_grad(fn)
    mx.eval(value_and_grad(student_BTV))
    mx.synchronize()
    mx.reset_peak_memory()
    resident = mx.get_active_memory()
    tic = time.perf_counter()
    mx.eval(value_and_grad(student_BTV))
    return time.perf_counter() - tic, mx.get_peak_memory() - resident


def main(argv=None) -> dict:
    ap = parser(__doc__, reps=3)
    args = ap.parse_args(argv)
    s = QUICK if args.quick else FULL
    shape = (s["batch"], s["completion"], s["model"]["vocab_size"])
    student_BTV, teacher_BTV = (
        mx.random.normal(shape, key=mx.random.key(0)),
        mx.random.normal(shape, key=mx.random.key(1)),
    )
    mask_BT = mx.ones(shape[:2])
    mx.eval(student_BTV, teacher_BTV, mask_BT)
    cases = {}
    for divergence in ("forward", "reverse", "jsd"):
        sides = {
            "closed_form": lambda z: losses.sdft_loss(
                z, teacher_BTV, mask_BT, divergence=divergence, skip=0, beta=0.5
            )[0],
            "autodiff": lambda z: losses.sequence_mean(
                autodiff_divergence(
                    losses.log_softmax(z), losses.log_softmax(teacher_BTV), divergence
                ),
                mask_BT,
                0,
            )[0],
        }
        runs = {
            name: [measure(fn, student_BTV) for _ in range(args.reps)] for name, fn in sides.items()
        }
        best = {name: min(t for t, _ in r) for name, r in runs.items()}
        peak = {name: max(m for _, m in r) for name, r in runs.items()}
        cases[divergence] = {
            "seconds": {k: round(v, 4) for k, v in best.items()},
            "peak_above_resident_gb": {k: round(v / 1e9, 4) for k, v in peak.items()},
            "time_ratio": round(best["autodiff"] / best["closed_form"], 3),
            "memory_ratio": round(peak["autodiff"] / peak["closed_form"], 3),
        }
    record = {
        "bench": "mlx-sdft loss",
        "quick": args.quick,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        **machine(),
        "shape_BTV": shape,
        "cases": cases,
    }
    print(f"mlx {record['mlx']} on {record['device']}, {record['blas']}; logits {shape}")
    print(
        f"{'divergence':<12}{'closed form s':>15}{'autodiff s':>12}{'ratio':>8}{'closed form GB':>16}{'autodiff GB':>13}{'ratio':>8}"
    )
    for name, c in cases.items():
        print(
            f"{name:<12}{c['seconds']['closed_form']:>15.3f}{c['seconds']['autodiff']:>12.3f}{c['time_ratio']:>8.2f}"
            f"{c['peak_above_resident_gb']['closed_form']:>16.3f}{c['peak_above_resident_gb']['autodiff']:>13.3f}"
            f"{c['memory_ratio']:>8.2f}"
        )
    return emit(record, args.json)


if __name__ == "__main__":
    main()
