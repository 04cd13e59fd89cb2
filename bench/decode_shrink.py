"""When should the compiled decode step drop finished rows? Each drop changes the batch shape, so
the step retraces (once per shape: traces are kept across rollouts); keeping a finished row costs
its arithmetic at every later step. Times `rollout.sample` on 8 prompts whose completion budgets
end one row after another (n/8, 2n/8, …, n tokens), under `static_cache.SHRINK_AT` = 0 (never
drop), 0.5 (drop once at most half the rows still sample: the default) and 1 (drop at every
finish), and the plain loop (every finish drops, nothing to retrace). Per setting: the first
call (traces included) and the median of warm calls (shapes already traced), wall and CPU ms.

Run: python bench/decode_shrink.py [--models tiny,smollm2] [--reps N] [--json out.json]
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
import mlx_sdft  # noqa: E402,F401  first: on Linux it loads OpenBLAS before MLX does

import mlx.core as mx  # noqa: E402
from per_token import plain_model  # noqa: E402
from shapes import SMOLLM2, TINY, emit, machine, parser  # noqa: E402

from mlx_sdft.core import rollout, static_cache  # noqa: E402

BATCH, PROMPT = 8, 16
SETTINGS = {"never": 0.0, "half": 0.5, "every": 1.0, "plain loop": None}


def timed(model, prompts, budget, compiled: bool) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    rollout.sample(model, prompts, budget, [], seeds=list(range(len(prompts))), compiled=compiled)
    return 1000 * (time.perf_counter() - wall), 1000 * (time.process_time() - cpu)


def main(argv=None) -> dict:
    ap = parser(__doc__, reps=3)
    ap.add_argument("--models", default="tiny,smollm2", help="which of tiny, smollm2 (--quick: tiny only)")
    args = ap.parse_args(argv)
    chosen = ["tiny"] if args.quick else args.models.split(",")
    start_load, cases = os.getloadavg()[0], {}
    for name, (shapes, n) in {"tiny": (TINY, 128), "smollm2": (SMOLLM2, 48)}.items():
        if name not in chosen:
            continue
        model = plain_model(shapes)
        prompts = mx.random.randint(0, shapes["vocab_size"], (BATCH, PROMPT)).tolist()
        budget = [max(1, n * (i + 1) // BATCH) for i in range(BATCH)]
        runs = {s: {"first": None, "warm": []} for s in SETTINGS}
        for rep in range(1 + args.reps):
            for setting, shrink in (SETTINGS.items() if rep % 2 else list(SETTINGS.items())[::-1]):
                static_cache.SHRINK_AT = shrink or 0.0
                if rep == 0:
                    static_cache._compiled.clear()  # every setting pays its own traces once
                    runs[setting]["first"] = timed(model, prompts, budget, shrink is not None)
                else:
                    runs[setting]["warm"].append(timed(model, prompts, budget, shrink is not None))
        static_cache.SHRINK_AT = 0.5
        cases[name] = {s: {"first_wall_ms": round(r["first"][0], 1), "first_cpu_ms": round(r["first"][1], 1),
                           "warm_wall_ms": [round(w, 1) for w, _ in r["warm"]],
                           "warm_cpu_ms": [round(c, 1) for _, c in r["warm"]]} for s, r in runs.items()}
    record = {"bench": "mlx-sdft compiled decode: when to drop finished rows", "quick": args.quick, "date": time.strftime("%Y-%m-%d %H:%M"),
              "mlx": mx.__version__, "device": str(mx.default_device()), **machine(), "batch": BATCH, "prompt": PROMPT,
              "load_average_1min": [round(start_load, 2), round(os.getloadavg()[0], 2)], "cases": cases}
    print(f"mlx {record['mlx']} on {record['device']}; {BATCH} prompts, budgets ending one row after another")
    print(f"{'model':<10}{'setting':<12}{'first wall ms':>15}{'warm wall ms':>14}{'warm CPU ms':>13}")
    for name, case in cases.items():
        for s, c in case.items():
            print(f"{name:<10}{s:<12}{c['first_wall_ms']:>15.1f}{statistics.median(c['warm_wall_ms']):>14.1f}"
                  f"{statistics.median(c['warm_cpu_ms']):>13.1f}")
    return emit(record, args.json)


if __name__ == "__main__":
    main()
