"""Memory of --logits-chunk: the teacher and student passes of one SDFT micro-batch with long
completions, scored whole and in chunks, side by side in one run.

Run: python bench/chunk.py [--quick] [--completion 256] [--json out.json]

Sampling is left out (chunking does not touch it): the completions are fixed random tokens.
Each repetition runs every chunk size in turn, after one warm-up round; the record gives the
peak memory above the resident weights (mx.get_peak_memory after mx.reset_peak_memory) and the
median seconds of `teacher_logits` + the student's loss and gradient, each as a ratio to the
whole (unchunked) pass.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # run from a checkout without installing
import mlx_sdft  # noqa: E402,F401  first: on Linux it loads OpenBLAS before MLX does

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from bench import build  # noqa: E402
from shapes import FULL, QUICK, emit, machine, parser  # noqa: E402

from mlx_sdft.core.objective import ObjectiveArgs, sdft_objective  # noqa: E402
from mlx_sdft.core.teacher import init_teacher, using  # noqa: E402


def scored_pass(model, teacher, pairs, cfg) -> tuple[float, int]:
    """(seconds, peak bytes) of the teacher's scores and the student's loss and gradient."""
    completions, objective = [p.demo_ids for p in pairs], sdft_objective(ObjectiveArgs.of(cfg))
    mx.synchronize()
    mx.reset_peak_memory()
    tic = time.perf_counter()
    with using(model, teacher):
        scores = objective.teacher_scores(model, pairs, completions)
        mx.eval(scores)
    (loss, ntoks, _, _), grads = nn.value_and_grad(model, objective.student_loss)(
        model, pairs, completions, scores
    )
    mx.eval(loss, ntoks, grads)
    return time.perf_counter() - tic, mx.get_peak_memory()


def main(argv=None) -> dict:
    ap = parser(__doc__, reps=2)
    ap.add_argument("--completion", type=int, help="completion tokens (default 256, quick 32)")
    ap.add_argument(
        "--chunks", type=int, nargs="+", default=[0, 64, 16], help="chunk sizes; 0 = whole"
    )
    args = ap.parse_args(argv)
    s = {
        **(QUICK if args.quick else FULL),
        "completion": args.completion or (32 if args.quick else 256),
    }
    model, pairs, cfg = build(s)
    model.train()
    teacher = init_teacher("ema", model, {})
    resident = mx.get_active_memory()
    runs = {c: [] for c in args.chunks}
    for rep in range(1 + args.reps):
        for c in args.chunks:
            seconds, peak = scored_pass(
                model, teacher, pairs, dataclasses.replace(cfg, logits_chunk=c)
            )
            if rep:
                runs[c].append((seconds, peak - resident))
    whole = args.chunks[0]
    extra = {c: max(p for _, p in r) for c, r in runs.items()}
    secs = {c: statistics.median(t for t, _ in r) for c, r in runs.items()}
    record = {
        "bench": "mlx-sdft chunk",
        "quick": args.quick,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        **machine(),
        "settings": {k: v for k, v in s.items() if k != "model"},
        "vocab": s["model"]["vocab_size"],
        "resident_gb": resident / 1e9,
        "peak_above_resident_gb": {c: round(extra[c] / 1e9, 3) for c in args.chunks},
        "memory_vs_whole": {c: round(extra[c] / extra[whole], 3) for c in args.chunks},
        "seconds": {c: round(secs[c], 3) for c in args.chunks},
        "time_vs_whole": {c: round(secs[c] / secs[whole], 3) for c in args.chunks},
    }
    print(
        f"mlx {record['mlx']} on {record['device']}, {record['blas']}; batch {s['batch']}, completion {s['completion']}, "
        f"vocabulary {record['vocab']}; resident weights {record['resident_gb']:.2f} GB"
    )
    print(
        f"{'--logits-chunk':<16}{'peak above resident':>21}{'vs whole':>10}{'seconds':>10}{'vs whole':>10}"
    )
    for c in args.chunks:
        print(
            f"{c or 'whole':<16}{record['peak_above_resident_gb'][c]:>18.3f} GB{record['memory_vs_whole'][c]:>10.3f}"
            f"{record['seconds'][c]:>10.2f}{record['time_vs_whole'][c]:>10.3f}"
        )
    return emit(record, args.json)


if __name__ == "__main__":
    main()
