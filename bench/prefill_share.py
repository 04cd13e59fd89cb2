"""The sampler's prefill with the batch's common prompt prefix computed once (`decode.common_length`:
the chat template's header and system prompt) against every distinct prompt prefilled whole,
side by side in one process, on the real model.

Run: python bench/prefill_share.py [--quick] [--reps N] [--batches N] [--generations 1,4] [--json out.json]

The trainer's sampling phase (`core.train.rollout_batch`: each prompt --num-generations times, its
completion budget, the stop tokens, the per-sequence seeds) over the first --batches batches of 4
of the quickstart's training prompts (SmolLM2-135M-Instruct, its default system prompt), with fresh
LoRA adapters fused as in training. "shared" is the sampler as it runs; "whole" sets the common
prefix to 0. Repetitions alternate which side goes first, the first round is a warm-up; wall and
CPU seconds of this process, median (best). Both sides must draw the same tokens, or the script
stops. "prefill alone" times just the part that differs (`decode._prefill` of each batch's distinct
prompts, 4x the repetitions). --quick: the tiny test model (tests/tiny.py), one batch, one repetition.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]  # run from a checkout without installing
import mlx_sdft  # noqa: E402,F401  first: on Linux it loads OpenBLAS before MLX does

import mlx.core as mx  # noqa: E402
from shapes import emit, machine, parser  # noqa: E402

from mlx_sdft.config import load_config  # noqa: E402
from mlx_sdft.core import decode, rollout  # noqa: E402
from mlx_sdft.core.data import load_dataset  # noqa: E402
from mlx_sdft.core.prompts import apply_system_prompt, encode_examples  # noqa: E402
from mlx_sdft.core.train import TrainingArgs, rollout_batch  # noqa: E402
from mlx_sdft.formats.models import Adapters  # noqa: E402
from mlx_sdft.opening import open_model_for  # noqa: E402

CONFIG = ROOT / "recipes" / "quickstart" / "config.yaml"


def sampling(model, batches, cfg, stops, share: bool) -> tuple[float, float, list]:
    """Wall and CPU seconds of the sampling phase over every batch, and what it drew."""
    real = decode.common_length
    if not share:
        decode.common_length = lambda prompts: 0
    try:
        args, wall, cpu, drawn = TrainingArgs.of(cfg), time.perf_counter(), time.process_time(), []
        for i, pairs in enumerate(batches):
            drawn.append(
                rollout_batch(model, pairs, args, stops, positions=list(range(4 * i, 4 * i + 4)))[
                    1
                ].completions
            )
        return time.perf_counter() - wall, time.process_time() - cpu, drawn
    finally:
        decode.common_length = real


def prefill(model, prompts, share: bool) -> tuple[float, float]:
    """Wall and CPU seconds of the prefill alone (`decode._prefill`) of one batch's distinct prompts."""
    real = decode.common_length
    if not share:
        decode.common_length = lambda prompts: 0
    try:
        with rollout.fused_adapters(model):
            wall, cpu = time.perf_counter(), time.process_time()
            mx.eval([c.state for c in decode._prefill(model, prompts, 512)])
            return time.perf_counter() - wall, time.process_time() - cpu
    finally:
        decode.common_length = real


def main(argv=None) -> dict:
    ap = parser(__doc__, reps=5)
    ap.add_argument(
        "--batches", type=int, default=3, help="quickstart batches of 4 prompts per timed run"
    )
    ap.add_argument("--generations", default="1,4", help="--num-generations values to time")
    args = ap.parse_args(argv)
    reps, n_batches = (1, 1) if args.quick else (args.reps, args.batches)
    with tempfile.TemporaryDirectory() as tmp:
        flags = {}
        if args.quick:
            from tests.tiny import build_model

            flags = {
                "model": str(build_model(Path(tmp) / "tiny")),
                "max_completion_length": 8,
                "num_layers": -1,
            }
        cfg = load_config(str(CONFIG), flags)
        model, tokenizer, _ = open_model_for(
            cfg, adapters=Adapters(cfg.fine_tune_type, cfg.num_layers, cfg.lora_parameters)
        )
        examples = apply_system_prompt(load_dataset(cfg.data)["train"], cfg.system_prompt)
        pairs = encode_examples(tokenizer, examples, cfg.teacher_template, cfg.max_seq_length)
        stops = sorted(tokenizer.eos_token_ids)
    batches = [pairs[4 * i : 4 * i + 4] for i in range(n_batches)]
    prompts = [[p.student_ids for p in b] for b in batches]
    cases, load = {}, [os.getloadavg()[0]]
    for G in map(int, args.generations.split(",")):
        cfg.num_generations = G
        runs = {"shared": [], "whole": []}
        for rep in range(1 + reps):  # round 0: a warm-up, not kept
            for side in ["shared", "whole"] if rep % 2 else ["whole", "shared"]:
                wall, cpu, drawn = sampling(model, batches, cfg, stops, side == "shared")
                runs[side].append(
                    {
                        "wall_s": round(wall, 3),
                        "cpu_s": round(cpu, 3),
                        "tokens": sum(map(len, sum(drawn, []))),
                    }
                )
                if side == "shared":
                    shared_drawn = drawn
                elif rep and drawn != shared_drawn:
                    raise SystemExit(
                        f"--generations {G}: the shared prefill drew other tokens than the whole one"
                    )
            load.append(os.getloadavg()[0])
        timed = {side: r[1:] for side, r in runs.items()}
        med = {
            f"{side}_{clock}": statistics.median(r[clock] for r in timed[side])
            for side in timed
            for clock in ("wall_s", "cpu_s")
        }
        cases[f"num_generations {G}"] = {
            "runs": timed,
            "tokens_drawn": timed["shared"][0]["tokens"],
            "ratio_wall": round(med["shared_wall_s"] / med["whole_wall_s"], 3),
            "ratio_cpu": round(med["shared_cpu_s"] / med["whole_cpu_s"], 3),
            "ratio_wall_best": round(
                min(r["wall_s"] for r in timed["shared"])
                / min(r["wall_s"] for r in timed["whole"]),
                3,
            ),
        }
    model.eval()
    alone = {"shared": [], "whole": []}
    for rep in range(1 + 4 * reps):  # the prefill alone: short, so more repetitions
        for side in ["shared", "whole"] if rep % 2 else ["whole", "shared"]:
            for p in prompts:
                wall, cpu = prefill(model, decode.distinct_rows(p)[0], side == "shared")
                if rep:
                    alone[side].append({"wall_s": round(wall, 4), "cpu_s": round(cpu, 4)})
    load.append(os.getloadavg()[0])
    cases["prefill alone"] = {
        "runs": alone,
        **{
            f"ratio_{clock[:-2]}": round(
                statistics.median(r[clock] for r in alone["shared"])
                / statistics.median(r[clock] for r in alone["whole"]),
                3,
            )
            for clock in ("wall_s", "cpu_s")
        },
        "ratio_wall_best": round(
            min(r["wall_s"] for r in alone["shared"]) / min(r["wall_s"] for r in alone["whole"]), 3
        ),
    }
    common = [decode.common_length(list(map(list, dict.fromkeys(map(tuple, p))))) for p in prompts]
    record = {
        "bench": "mlx-sdft prefill sharing",
        "quick": args.quick,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        **machine(),
        "model": cfg.model,
        "batches": n_batches,
        "prompt_tokens": [sorted(map(len, p)) for p in prompts],
        "common_prefix": common,
        "load_average_1min": [round(x, 2) for x in load],
        "cases": cases,
    }
    print(
        f"mlx {record['mlx']} on {record['device']}, {record['blas']}; {cfg.model}; {n_batches} batches of 4 prompts "
        f"of {min(map(min, record['prompt_tokens']))}-{max(map(max, record['prompt_tokens']))} tokens, common prefix "
        f"{common}; load {record['load_average_1min']}"
    )
    print(
        "sampling phase, seconds: median (best) over the timed reps; ratio shared / whole (< 1: sharing pays)"
    )
    for name, c in cases.items():
        cols = "; ".join(
            f"{side}: "
            + ", ".join(
                f"{clock[:-2]} {statistics.median(r[clock] for r in c['runs'][side]):.4f} ({min(r[clock] for r in c['runs'][side]):.4f})"
                for clock in ("wall_s", "cpu_s")
            )
            for side in ("shared", "whole")
        )
        drawn = (
            f"{c['tokens_drawn']} tokens drawn"
            if "tokens_drawn" in c
            else "one batch's distinct prompts"
        )
        print(
            f"{name}: {drawn}; {cols}; ratio wall {c['ratio_wall']} "
            f"(best {c['ratio_wall_best']}), CPU {c['ratio_cpu']}"
        )
    return emit(record, args.json)


if __name__ == "__main__":
    main()
