"""Per-token decode overhead: milliseconds per decoded token of the trainer's sampling
(`rollout.sample`, hence `decode.decode`) against mlx-lm's own loops on the same model and prompts,
side by side in one run.

Run: python bench/per_token.py [--quick] [--reps N] [--json out.json]

Batch 1: `rollout.sample` vs `mlx_lm.generate_step`, the loop `mlx_lm.generate` runs (without its
detokenizer, which would only add to mlx-lm's side). Batch 4: `rollout.sample` vs
`mlx_lm.batch_generate` (a tokenizer stub without EOS). Every side samples at temperature 1 to a
fixed length (no stop token) from a short prompt; the time includes that prompt's prefill. Two
models: the tiny llama of `--quick`, where per-token overhead is nearly all the time (as on a
GPU), and SmolLM2-135M's shapes (random float32 weights), where the arithmetic dominates on a
CPU. No LoRA: both sides run the same plain weights. Repetitions alternate which side goes first;
ratio = trainer / mlx-lm (< 1: the trainer is faster). On the tiny model (at SmolLM2 shapes too
with --levers), each decode shortcut of the trainer is also timed off against on ("trainer vs
without …": < 1, the shortcut pays): the compiled sampling step and the skipped mask. Two clocks:
wall seconds, and the CPU seconds this process used, which other jobs on a shared machine disturb
less. (The compiled whole decode step this once also timed is retired: bench/README.md.)
"""

from __future__ import annotations

import os
import tempfile
from contextlib import ExitStack, contextmanager
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # run from a checkout without installing
import mlx_sdft  # noqa: E402,F401  first: on Linux it loads OpenBLAS before MLX does

import mlx.core as mx  # noqa: E402
from mlx_lm.generate import batch_generate, generate_step  # noqa: E402
from mlx_lm.models import llama  # noqa: E402
from mlx_lm.models.cache import BatchKVCache  # noqa: E402
from mlx_lm.sample_utils import make_sampler  # noqa: E402
from shapes import NoTokenizer, SEED, SMOLLM2, TINY, emit, machine, parser  # noqa: E402

from mlx_sdft.core import decode, rollout  # noqa: E402

LEVERS = ("compiled sampling", "no mask when unpadded")
PROMPT = 16  # tokens per prompt: a short prefill, so the time is mostly decoding


def plain_model(shapes: dict):
    mx.random.seed(SEED)
    model = llama.Model(llama.ModelArgs.from_dict(shapes))
    mx.eval(model.parameters())
    model.eval()
    return model


def clocks() -> tuple[float, float]:
    """Wall-clock and CPU seconds of this process (all its threads: MLX evaluates on its own)."""
    return time.perf_counter(), time.process_time()


def trainer(model, prompts, n) -> tuple[float, float]:
    """The trainer's sampling as it runs."""
    start = clocks()
    out = rollout.sample(model, prompts, [n] * len(prompts), [], seeds=list(range(len(prompts))))
    assert all(len(c) == n for c in out.completions)
    return tuple(b - a for a, b in zip(start, clocks()))


def mlx_lm(model, prompts, n) -> tuple[float, float]:
    sampler = make_sampler(temp=1.0)
    start = clocks()
    if len(prompts) == 1:
        tokens = [
            t for t, _ in generate_step(mx.array(prompts[0]), model, max_tokens=n, sampler=sampler)
        ]
    else:
        tokens = batch_generate(model, NoTokenizer(), prompts, max_tokens=n, sampler=sampler).texts
    assert len(tokens) == (n if len(prompts) == 1 else len(prompts))
    return tuple(b - a for a, b in zip(start, clocks()))


@contextmanager
def without(*levers: str):
    """The trainer's sampling with some of its decode shortcuts off: the compiled sampling step
    (`decode.next_tokens_compiled`) or the skipped mask of unpadded batches (`decode.DecodeCache`)."""
    saved = decode.next_tokens_compiled, decode.DecodeCache.make_mask
    if "compiled sampling" in levers:
        decode.next_tokens_compiled = decode.next_tokens
    if "no mask when unpadded" in levers:
        decode.DecodeCache.make_mask = BatchKVCache.make_mask
    try:
        yield
    finally:
        decode.next_tokens_compiled, decode.DecodeCache.make_mask = saved


def lever(model, prompts, n, *names) -> tuple[float, float]:
    """The trainer's sampling with every shortcut on but `names`."""
    with without(*names):
        return trainer(model, prompts, n)


def operations(model, batch: int, shortcuts: str) -> int:
    """Operations in the graph of one decode step of the trainer's loop (model call + sampling;
    MLX's DOT export) on `batch` unpadded rows: `plain` (no shortcut) or `shortcuts` (the loop's
    own). On a GPU each is about one kernel launch."""
    with ExitStack() as stack:
        if shortcuts == "plain":
            stack.enter_context(without(*LEVERS))
        cache = decode._prefill(model, [[1] * PROMPT] * batch, 512)
        keys = decode.row_keys(list(range(batch)))
        outputs = decode.next_tokens_compiled(
            model(mx.array([[1]] * batch), cache=cache)[:, -1, :], keys, 1.0, 1.0
        )
        with tempfile.TemporaryDirectory() as tmp:
            mx.export_to_dot(f"{tmp}/step.dot", *outputs)
            return Path(f"{tmp}/step.dot").read_text().count("shape=rectangle")


def side_by_side(reps: int, n: int, sides: dict, base: str = "mlx_lm") -> dict:
    """ms per decoded token of each side (per sequence step, not per token of the batch), by
    the wall clock and by the CPU time this process used; ratio = trainer / mlx-lm."""
    runs = {clock: {name: [] for name in sides} for clock in ("wall", "cpu")}
    for rep in range(1 + reps):  # one warm-up round
        for name in list(sides) if rep % 2 else list(sides)[::-1]:
            for clock, t in zip(("wall", "cpu"), sides[name]()):
                if rep:
                    runs[clock][name].append(1000 * t / n)
    out = {}
    for clock, r in runs.items():
        out[f"{clock}_ms_per_token"] = {k: [round(x, 3) for x in v] for k, v in r.items()}
        out[f"{clock}_ratio"] = round(
            statistics.median(r["trainer"]) / statistics.median(r[base]), 3
        )
        out[f"{clock}_ratio_best"] = round(min(r["trainer"]) / min(r[base]), 3)
    return out


def main(argv=None) -> dict:
    ap = parser(__doc__, reps=3)
    ap.add_argument(
        "--models", default="tiny,smollm2", help="which of tiny, smollm2 (--quick: tiny only)"
    )
    ap.add_argument(
        "--levers", action="store_true", help="time each shortcut off vs on at SmolLM2 shapes too"
    )
    args = ap.parse_args(argv)
    chosen = ["tiny"] if args.quick else args.models.split(",")
    models = {
        name: shape
        for name, shape in {
            "tiny": (TINY, 8 if args.quick else 128),
            "smollm2": (SMOLLM2, 48),
        }.items()
        if name in chosen
    }
    cases, start_load, operations_per_step = {}, os.getloadavg()[0], {}
    for name, (shapes, n) in models.items():
        model = plain_model(shapes)
        prompts = mx.random.randint(0, shapes["vocab_size"], (4, PROMPT)).tolist()
        for batch in (1, 4):
            p = prompts[:batch]
            cases[f"{name}, batch {batch}"] = {
                "tokens": n,
                **side_by_side(
                    args.reps,
                    n,
                    {
                        "trainer": lambda: trainer(model, p, n),
                        "mlx_lm": lambda: mlx_lm(model, p, n),
                    },
                ),
            }
            for name_ in LEVERS if name == "tiny" or args.levers else ():
                cases[f"{name}, batch {batch}, trainer vs without {name_}"] = {
                    "tokens": n,
                    **side_by_side(
                        args.reps,
                        n,
                        {
                            "trainer": lambda: lever(model, p, n),
                            "without": lambda: lever(model, p, n, name_),
                        },
                        "without",
                    ),
                }
        ops = {
            f"{name}, batch {b}": {k: operations(model, b, k) for k in ("plain", "shortcuts")}
            for b in (1, 4)
        }
        operations_per_step.update(ops)
    record = {
        "bench": "mlx-sdft per-token decode",
        "quick": args.quick,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        **machine(),
        "prompt": PROMPT,
        "load_average_1min": [round(start_load, 2), round(os.getloadavg()[0], 2)],
        "cases": cases,
        "operations_per_decode_step": operations_per_step,
    }
    print(
        f"mlx {record['mlx']} on {record['device']}, {record['blas']}; prompts of {PROMPT} tokens, temperature 1"
    )
    print(
        f"load average {os.getloadavg()[0]:.1f}; median ms per decoded token, trainer / other (best rep in brackets)"
    )
    print(
        f"{'case':<84}{'tokens':>7}{'wall: trainer':>15}{'other':>8}{'ratio':>15}{'CPU: trainer':>14}{'other':>8}{'ratio':>15}"
    )
    for name, c in cases.items():
        cols = ""
        for clock in ("wall", "cpu"):
            t, m = (statistics.median(v) for v in c[f"{clock}_ms_per_token"].values())
            cols += (
                f"{t:>14.2f}{m:>8.2f}{c[f'{clock}_ratio']:>7.3f} ({c[f'{clock}_ratio_best']:.3f})"
            )
        print(f"{name:<84}{c['tokens']:>7}{cols}")
    for name, ops in operations_per_step.items():
        print(
            f"operations per decode step, {name}: {ops['plain']} plain, {ops['shortcuts']} with the loop's shortcuts"
        )
    return emit(record, args.json)


if __name__ == "__main__":
    main()
