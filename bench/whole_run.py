"""What a whole run costs: `mlx-sdft train` on the quickstart's data and options, SDFT vs SFT at
equal optimizer steps, start to finish (Python start, model load, train, validation, save).

Run: python bench/whole_run.py [--iters N] [--reps N] [--quick] [--json out.json] [-- extra train flags]

Each run is a fresh `python -m mlx_sdft train -c recipes/quickstart/config.yaml --iters N` process
(SFT: the same with `--method sft`), so the time is what a user waits for. Repetitions alternate
which method goes first, so load from other jobs falls on both. Two clocks per run: wall-clock
seconds and the CPU seconds the process used (user + system, all its threads), which other jobs
on a shared machine disturb less. The phase times come from the run's own metrics.jsonl.
--quick: the tiny test model (tests/tiny.py) instead of SmolLM2-135M, one step, 8-token completions.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]
import mlx_sdft  # noqa: E402,F401  first: loads OpenBLAS as the runs' own processes do, so the BLAS line is theirs

from shapes import emit, machine, parser  # noqa: E402

CONFIG = ROOT / "recipes" / "quickstart" / "config.yaml"


def run_once(method: str, iters: int, out: Path, extra: list[str]) -> dict:
    """One `mlx-sdft train` process: wall and CPU seconds, and its mean phase times per step."""
    cmd = [
        sys.executable,
        "-m",
        "mlx_sdft",
        "train",
        "-c",
        str(CONFIG),
        "--iters",
        str(iters),
        "--method",
        method,
        "--adapter-path",
        str(out),
        *extra,
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    tic = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - tic
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("type") == "train"]
    phases = {
        k: round(statistics.mean(r[k] for r in train), 3)
        for k in ("sample_s", "teacher_s", "student_s")
    }
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "phases_per_step_s": phases,
        "completion_len": round(statistics.mean(r["completion_len"] for r in train), 1),
        "val_s": sum(r.get("val_s", 0) for r in records if r.get("type") == "eval"),
    }


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    ap = parser(__doc__, reps=2)
    ap.add_argument("--iters", type=int, help="optimizer steps of each run (default 8; --quick 1)")
    args = ap.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    iters = args.iters or (1 if args.quick else 8)
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            from tests.tiny import build_model

            extra = [
                "--model",
                str(build_model(Path(tmp) / "tiny")),
                "--max-completion-length",
                "8",
                "--num-layers",
                "-1",
                *extra,
            ]
        runs = {"sdft": [], "sft": []}
        load = [os.getloadavg()[0]]
        for rep in range(args.reps):
            for method in ["sdft", "sft"] if rep % 2 == 0 else ["sft", "sdft"]:
                runs[method].append(run_once(method, iters, Path(tmp) / f"{method}{rep}", extra))
            load.append(os.getloadavg()[0])
    med = lambda method, key: statistics.median(r[key] for r in runs[method])  # noqa: E731
    record = {
        "bench": "mlx-sdft whole run",
        "quick": args.quick,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        **machine(),
        "config": str(CONFIG.relative_to(ROOT)),
        "iters": iters,
        "extra_flags": extra[6:] if args.quick else extra,
        "load_average_1min": [round(x, 2) for x in load],
        "runs": runs,
        "ratios": {
            "sdft_vs_sft_wall": round(med("sdft", "wall_s") / med("sft", "wall_s"), 3),
            "sdft_vs_sft_cpu": round(med("sdft", "cpu_s") / med("sft", "cpu_s"), 3),
        },
        "ratios_best": {
            "sdft_vs_sft_wall": round(
                min(r["wall_s"] for r in runs["sdft"]) / min(r["wall_s"] for r in runs["sft"]), 3
            ),
            "sdft_vs_sft_cpu": round(
                min(r["cpu_s"] for r in runs["sdft"]) / min(r["cpu_s"] for r in runs["sft"]), 3
            ),
        },
    }
    print(
        f"{record['blas']}; {record['cpu']} ({record['cores']} cores); quickstart, {iters} steps each; "
        f"load average {record['load_average_1min']}"
    )
    for method, rs in runs.items():
        print(
            f"{method}: wall {[r['wall_s'] for r in rs]} s, CPU {[r['cpu_s'] for r in rs]} s, "
            f"per step {rs[0]['phases_per_step_s']}"
        )
    print(
        f"SDFT / SFT: wall {record['ratios']['sdft_vs_sft_wall']:.2f} (best {record['ratios_best']['sdft_vs_sft_wall']:.2f}), "
        f"CPU {record['ratios']['sdft_vs_sft_cpu']:.2f} (best {record['ratios_best']['sdft_vs_sft_cpu']:.2f})"
    )
    return emit(record, args.json)


if __name__ == "__main__":
    main()
