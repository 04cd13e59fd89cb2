"""mlx-sdft's benchmark: every figure is a ratio of two things measured side by side in this run.

Run: python bench/bench.py [--quick] [--json out.json] [--trl]
     (on Linux, OpenBLAS is loaded by `import mlx_sdft` where installed; MLX_SDFT_BLAS=reference opts out)

A randomly initialised llama with SmolLM2-135M-Instruct's shapes (--quick: a tiny one), LoRA rank 8
on every linear of every block, fixed prompt and completion lengths (no stop token), and the same
batch for every side. Repetitions interleave the sides, so load from other jobs on this shared
machine falls on both; the record gives each ratio from the median and from the best rep.
Ratios (targets in TARGETS; bench/README.md explains each and the FLOP count):
  sdft_vs_sft_step       wall-clock of one SDFT optimizer step / one SFT step on as many tokens
  sampling_vs_batch_gen  tokens/s of the trainer's sampling (rollout_batch) / `mlx_lm.batch_generate`
  peak_memory_sdft_vs_sft  peak memory of an SDFT step / an SFT step
  student_flops_vs_peak  student forward+backward FLOP/s / this run's float32 matmul FLOP/s
  mlx_vs_trl_step        (--trl) our SDFT step / TRL SDFTTrainer's step, see trl_bench.py
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # run from a checkout without installing
import mlx_sdft  # noqa: E402,F401  first: on Linux it loads OpenBLAS before MLX does

import mlx.core as mx  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
from mlx.utils import tree_map  # noqa: E402
from mlx_lm.generate import batch_generate  # noqa: E402
from mlx_lm.models import llama  # noqa: E402
from mlx_lm.sample_utils import make_sampler  # noqa: E402

from shapes import FULL, NoTokenizer, QUICK, SEED, emit, machine, student_flops  # noqa: E402

from mlx_sdft.core import train as trainer  # noqa: E402
from mlx_sdft.config import Config  # noqa: E402
from mlx_sdft.formats.models import attach_adapters  # noqa: E402
from mlx_sdft.core.prompts import PromptPair  # noqa: E402
from mlx_sdft.core.train import PhaseTimer  # noqa: E402
from mlx_sdft.core.teacher import init_teacher, step_teacher  # noqa: E402

TARGETS = {
    "sdft_vs_sft_step": ("<=", 2.0),
    "sampling_vs_batch_gen": (">=", 1.0),
    "peak_memory_sdft_vs_sft": ("<=", 1.25),
    "student_flops_vs_peak": (">=", 0.5),
    "mlx_vs_trl_step": ("<=", 0.5),
}
TRL_PYTHON = Path("/work/bench-venv/bin/python")


def build(s: dict):
    """The model with LoRA attached, the fixed prompt pairs, and the trainer's config."""
    mx.random.seed(SEED)
    model = llama.Model(llama.ModelArgs.from_dict(s["model"]))
    mx.eval(model.parameters())
    lora = {"rank": s["lora_rank"], "scale": 20.0, "dropout": 0.0}
    attach_adapters(model, "lora", len(model.layers), lora)
    ids = lambda n: mx.random.randint(0, s["model"]["vocab_size"], (n,)).tolist()  # noqa: E731
    pairs = [
        PromptPair(ids(s["student_len"]), ids(s["teacher_len"]), ids(s["completion"]), f"bench:{i}")
        for i in range(s["batch"])
    ]
    # Every completion runs to the cap (no stop token): kept, so that each one is scored and trains, as a
    # completion that ends in time does (masked, a row that trains nothing is not computed).
    cfg = Config(
        batch_size=s["batch"],
        max_completion_length=s["completion"],
        lora_parameters=lora,
        iters=100,
        truncated="keep",
    )
    return model, pairs, cfg


def update(model, optimizer, grads, cfg: Config):
    """train()'s update block for one micro-batch: average, clip, finiteness check, step."""
    grads = tree_map(lambda g: g / cfg.grad_accumulation_steps, grads)
    grads, grad_norm = optim.clip_grad_norm(grads, cfg.grad_clip)
    if not math.isfinite(
        grad_norm.item()
    ):  # train() skips such a step; a benchmark must not hide it
        raise FloatingPointError("non-finite gradient norm in the benchmark step")
    optimizer.update(model, grads)
    mx.eval(model.parameters(), optimizer.state)


def sdft_step(model, pairs, cfg, state) -> dict:
    """One SDFT optimizer step as train() runs it, timed by phase: the trainer's own sdft_step
    (sample, teacher, student), then its update block and the EMA."""
    timer, positions = PhaseTimer(), next_positions(state, len(pairs))
    loss, _, grads, stats = state["sdft_step"](
        model, state["teacher"], pairs, positions, grad=True, timer=timer
    )
    with timer("update"):
        loss.item()
        update(model, state["optimizer"], grads, cfg)
    with timer("ema"):
        state["teacher"] = step_teacher("ema", state["teacher"], model, cfg.teacher_update_rate)
    assert stats["length"] == len(pairs) * cfg.max_completion_length, (
        "completions must have the fixed length"
    )
    return timer.seconds


def sft_step(model, pairs, cfg, state) -> dict:
    """One --method sft optimizer step on demonstrations as long as the SDFT completions."""
    timer, positions = PhaseTimer(), next_positions(state, len(pairs))
    sft_cfg = dataclasses.replace(cfg, method="sft")
    loss, _, grads, _ = trainer.make_step(trainer.TrainingArgs.of(sft_cfg), [])(
        model, None, pairs, positions, grad=True, timer=timer
    )
    with timer("update"):
        loss.item()
        update(model, state["optimizer"], grads, sft_cfg)
    return timer.seconds


def next_positions(state, n: int) -> list[int]:
    """The prompts' places in the data stream, which seed their samples; fresh every step."""
    state["cursor"] = state.get("cursor", -n) + n
    return list(range(state["cursor"], state["cursor"] + n))


def sampling(model, pairs, cfg, state, standalone: bool) -> float:
    """Seconds to sample cfg.max_completion_length tokens for every prompt: the trainer's
    rollout_batch (its `sample`, per-sequence seeds) or mlx-lm's batch_generate as a user calls it."""
    prompts, n = [p.student_ids for p in pairs], cfg.max_completion_length
    tic = time.perf_counter()
    if standalone:
        batch_generate(
            model,
            NoTokenizer(),
            prompts,
            max_tokens=n,
            sampler=make_sampler(temp=cfg.temperature, top_p=cfg.top_p),
        )
    else:
        trainer.rollout_batch(
            model, pairs, trainer.TrainingArgs.of(cfg), [], next_positions(state, len(pairs))
        )
    return time.perf_counter() - tic


def matmul_peak(n: int, reps: int = 3) -> float:
    """Best float32 FLOP/s of an n×n×n matmul: the machine's peak, measured now."""
    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    mx.eval(a, b, a @ b)
    best = math.inf
    for _ in range(reps):
        tic = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - tic)
    return 2 * n**3 / best


def peak_memory(fn) -> tuple[dict, int]:
    mx.synchronize()
    mx.reset_peak_memory()
    seconds = fn()
    return seconds, mx.get_peak_memory()


def backend() -> str:
    """MLX's backend: Metal, CUDA or the CPU (where the BLAS line matters)."""
    if mx.default_device().type == mx.gpu:
        return "metal" if mx.metal.is_available() else "cuda"
    return "cpu"


def run_trl(quick: bool, reps: int | None) -> dict:
    if not TRL_PYTHON.exists():
        return {"error": f"{TRL_PYTHON} not found (see bench/README.md to create the TRL venv)"}
    cmd = (
        [str(TRL_PYTHON), str(Path(__file__).with_name("trl_bench.py"))]
        + (["--quick"] if quick else [])
        + (["--reps", str(reps)] if reps else [])
    )
    # torch brings its own BLAS: keep our LD_PRELOAD (if any) out of its process.
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"} | {
        "TRL_EXPERIMENTAL_SILENCE": "1"
    }
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    record = json.loads(lines[-1]) if lines else {}
    if proc.returncode or not lines:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        return {
            **record,
            "error": f"trl_bench.py exited {proc.returncode}: {record.get('error', tail[0])}",
        }
    return record


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="tiny model and lengths: a smoke test in seconds"
    )
    ap.add_argument("--json", help="also write the JSON record to this file")
    ap.add_argument("--trl", action="store_true", help=f"also run trl_bench.py with {TRL_PYTHON}")
    ap.add_argument("--reps", type=int, help="timed repetitions (default: 2, quick 1)")
    ap.add_argument("--trl-reps", type=int, help="timed TRL steps (default: as trl_bench.py)")
    args = ap.parse_args(argv)
    s = dict(QUICK if args.quick else FULL)
    s["reps"] = args.reps or s["reps"]

    model, pairs, cfg = build(s)
    model.train()
    state = {
        "teacher": init_teacher("ema", model, {}),
        "optimizer": trainer.build_optimizer(trainer.TrainingArgs.of(cfg), cfg.iters),
        "sdft_step": trainer.make_step(trainer.TrainingArgs.of(cfg), []),
    }
    peaks = [matmul_peak(s["matmul_n"])]
    resident = mx.get_active_memory()
    runs = {"sdft": [], "sft": [], "sample": [], "batch_gen": [], "mem_sdft": [], "mem_sft": []}
    for rep in range(s["warmup"] + s["reps"]):
        sd, m_sd = peak_memory(lambda: sdft_step(model, pairs, cfg, state))
        sf, m_sf = peak_memory(lambda: sft_step(model, pairs, cfg, state))
        order = [False, True] if rep % 2 else [True, False]  # alternate which sampler goes first
        times = {standalone: sampling(model, pairs, cfg, state, standalone) for standalone in order}
        if rep >= s["warmup"]:
            for key, v in [
                ("sdft", sd),
                ("sft", sf),
                ("sample", times[False]),
                ("batch_gen", times[True]),
                ("mem_sdft", m_sd),
                ("mem_sft", m_sf),
            ]:
                runs[key].append(v)
    peaks.append(matmul_peak(s["matmul_n"]))
    return report(args, s, runs, peaks, resident)


def ratios(runs, trl, flops, peak, agg) -> dict:
    """Every ratio from one statistic over the repetitions: the median, or the best (min), which
    is what other jobs on a shared machine disturb least."""
    step = lambda key: agg(sum(r.values()) for r in runs[key])  # noqa: E731
    out = {
        "sdft_vs_sft_step": step("sdft") / step("sft"),
        "sampling_vs_batch_gen": agg(runs["batch_gen"]) / agg(runs["sample"]),  # = tokens/s ratio
        "peak_memory_sdft_vs_sft": max(runs["mem_sdft"]) / max(runs["mem_sft"]),
        "student_flops_vs_peak": flops / agg(r["student"] for r in runs["sdft"]) / peak,
    }
    trl_step = trl and trl.get("step_s" if agg is statistics.median else "step_min_s")
    if trl_step:
        out["mlx_vs_trl_step"] = step("sdft") / trl_step
    return {k: round(v, 4) for k, v in out.items()}


def report(args, s, runs, peaks, resident) -> dict:
    med = statistics.median
    phases = {k: round(med(r[k] for r in runs["sdft"]), 4) for k in runs["sdft"][0]}
    sft_phases = {k: round(med(r[k] for r in runs["sft"]), 4) for k in runs["sft"][0]}
    tokens = s["batch"] * s["completion"]
    flops = student_flops(
        s["model"],
        s["batch"],
        s["student_len"] + s["completion"] - 1,
        s["completion"],
        s["lora_rank"],
    )
    trl = run_trl(args.quick, args.trl_reps) if args.trl else None
    record = {
        "bench": "mlx-sdft",
        "quick": args.quick,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        "backend": backend(),
        **machine(),
        "settings": {k: v for k, v in s.items() if k != "model"},
        "model": "tiny llama" if args.quick else "llama, SmolLM2-135M shapes, random fp32",
        "ratios": ratios(runs, trl, flops["total"], max(peaks), med),
        "ratios_best": ratios(runs, trl, flops["total"], max(peaks), min),
        "targets": {k: f"{op} {v}" for k, (op, v) in TARGETS.items()},
        "sdft_phases_s": phases,
        "sft_phases_s": sft_phases,
        "sdft_steps_s": [round(sum(r.values()), 3) for r in runs["sdft"]],
        "sft_steps_s": [round(sum(r.values()), 3) for r in runs["sft"]],
        "sample_tok_s": round(tokens / med(runs["sample"]), 2),
        "batch_gen_tok_s": round(tokens / med(runs["batch_gen"]), 2),
        "peak_memory_gb": {
            "sdft": max(runs["mem_sdft"]) / 1e9,
            "sft": max(runs["mem_sft"]) / 1e9,
            "resident_before": resident / 1e9,
        },
        "student_gflop": round(flops["total"] / 1e9, 2),
        "student_gflop_s": round(flops["total"] / phases["student"] / 1e9, 2),
        "matmul_peak_gflop_s": [round(p / 1e9, 2) for p in peaks],
        "trl": trl,
    }
    print_table(record)
    return emit(record, args.json)


def print_table(r: dict):
    print(
        f"mlx {r['mlx']} on {r['device']} ({r['backend']} backend), {r['blas']}; {r['cpu']} ({r['cores']} cores, shared); {r['model']}"
    )
    print(f"{'ratio':<26}{'median':>9}{'best':>9}{'target':>10}  ok (median)")
    for key, (op, target) in TARGETS.items():
        if key in r["ratios"]:
            v = r["ratios"][key]
            ok = v <= target if op == "<=" else v >= target
            print(
                f"{key:<26}{v:>9.3f}{r['ratios_best'][key]:>9.3f}{op + ' ' + str(target):>10}  {'yes' if ok else 'NO'}"
            )
    phases = "  ".join(f"{k} {v:.2f}s" for k, v in r["sdft_phases_s"].items())
    print(
        f"SDFT step (median phases): {phases};  steps {r['sdft_steps_s']} s;  SFT steps {r['sft_steps_s']} s"
    )
    print(
        f"sampling {r['sample_tok_s']:.1f} tok/s in the trainer, {r['batch_gen_tok_s']:.1f} tok/s batch_generate; "
        f"student {r['student_gflop_s']:.1f} GFLOP/s vs matmul peak {max(r['matmul_peak_gflop_s']):.1f} GFLOP/s; "
        f"peak memory SDFT {r['peak_memory_gb']['sdft']:.2f} GB, SFT {r['peak_memory_gb']['sft']:.2f} GB"
    )
    if r["trl"]:
        t = r["trl"]
        print(
            f"TRL: {t['error']}"
            if "error" in t
            else f"TRL {t['trl']} SDFTTrainer ({t['training']}, torch {t['torch']}): steps {t['steps_s']} s, phases {t['phases_s']}"
        )


if __name__ == "__main__":
    main()
