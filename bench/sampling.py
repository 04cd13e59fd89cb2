"""The trainer's sampling, with and without its two shortcuts, side by side in one run:
LoRA adapters fused into a copy of the weights (--fuse-sampling) and one shared prefill per
distinct prompt (--num-generations > 1); and against a bare decode loop, to show what mlx-lm's
BatchGenerator (under the trainer's sampling) costs on this device.

Run: python bench/sampling.py [--quick] [--json out.json]

Every case samples the same prompts with the same per-sequence seeds through `rollout.sample`
(the trainer's sampler), to a fixed length (no stop token). Repetitions alternate the order of
the two sides; the record gives the median and best seconds and each ratio slow/fast (> 1:
the shortcut is faster).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # run from a checkout without installing
import mlx_sdft  # noqa: E402,F401  first: on Linux it loads OpenBLAS before MLX does

import mlx.core as mx  # noqa: E402
from bench import build  # noqa: E402
from mlx_lm.models.cache import BatchKVCache, make_prompt_cache  # noqa: E402
from shapes import FULL, QUICK, emit, machine, parser  # noqa: E402

from mlx_sdft.core import decode
from mlx_sdft.core import rollout  # noqa: E402


def timed(model, prompts, n, fuse=True, share=True) -> float:
    real = decode.distinct_rows
    if not share:  # every copy prefills its own prompt, as before the shortcut
        decode.distinct_rows = lambda prompts: (prompts, list(range(len(prompts))))
    try:
        tic = time.perf_counter()
        rollout.sample(
            model, prompts, [n] * len(prompts), [], seeds=list(range(len(prompts))), fuse=fuse
        )
        return time.perf_counter() - tic
    finally:
        decode.distinct_rows = real


def bare_loop(model, prompts, n, seeds) -> float:
    """A lower bound: the fused model, one BatchKVCache, one vectorised keyed sampling op per
    step, asynchronous evaluation, no stop handling. Not the trainer's code (no stop tokens, no
    fallback for other cache types): a yardstick only."""
    vsplit, vsample = (
        mx.vmap(mx.random.split),
        mx.vmap(lambda key, logits: mx.random.categorical(logits, key=key)),
    )
    tic = time.perf_counter()
    model.eval()
    with rollout.fused_adapters(model):
        lens = [len(p) - 1 for p in prompts]
        cache = [BatchKVCache([max(lens) - n_ for n_ in lens]) for _ in model.layers]
        model.model(
            mx.array([[0] * (max(lens) - n_) + p[:-1] for p, n_ in zip(prompts, lens)]), cache=cache
        )

        def step(y, keys):
            split = vsplit(keys)
            return vsample(split[:, 1], model(y[:, None], cache=cache)[:, -1, :]), split[:, 0]

        y, keys = step(
            mx.array([p[-1] for p in prompts]), mx.stack([mx.random.key(x) for x in seeds])
        )
        mx.async_eval(y, keys)
        for t in range(n):
            nxt = step(y, keys) if t < n - 1 else None
            if nxt:
                mx.async_eval(*nxt)
            y.tolist()
            y, keys = nxt or (y, keys)
    model.train()
    return time.perf_counter() - tic


def primitives_per_token(model, prompt: list[int]) -> int:
    """Operations in the graph of one decoded token (MLX's DOT export): on a GPU each is about
    one kernel launch, which is what batch-4 decoding waits on."""
    cache = make_prompt_cache(model)
    model(mx.array([prompt]), cache=cache)
    mx.eval([c.state for c in cache])
    with tempfile.TemporaryDirectory() as tmp:
        mx.export_to_dot(f"{tmp}/step.dot", model(mx.array([[prompt[-1]]]), cache=cache))
        return Path(f"{tmp}/step.dot").read_text().count("shape=rectangle")


def side_by_side(reps, fast, slow) -> dict:
    runs = {"fast": [], "slow": []}
    for rep in range(1 + reps):  # one warm-up round
        order = [("fast", fast), ("slow", slow)] if rep % 2 else [("slow", slow), ("fast", fast)]
        for name, fn in order:
            t = fn()
            if rep:
                runs[name].append(t)
    med, best = statistics.median, min
    return {
        "fast_s": [round(t, 3) for t in runs["fast"]],
        "slow_s": [round(t, 3) for t in runs["slow"]],
        "ratio": round(med(runs["slow"]) / med(runs["fast"]), 3),
        "ratio_best": round(best(runs["slow"]) / best(runs["fast"]), 3),
    }


def main(argv=None) -> dict:
    ap = parser(__doc__, reps=2)
    args = ap.parse_args(argv)
    s = dict(QUICK if args.quick else FULL)
    n, long = s["completion"], 8 * s["student_len"]
    model, pairs, _ = build({**s, "student_len": long})
    short = [p.student_ids[: s["student_len"]] for p in pairs]
    G = 4
    cases = {
        f"fused vs unfused adapters ({len(short)} prompts of {s['student_len']})": side_by_side(
            args.reps, lambda: timed(model, short, n), lambda: timed(model, short, n, fuse=False)
        ),
        f"bare decode loop vs the trainer's sampling ({len(short)} prompts of {s['student_len']})": side_by_side(
            args.reps,
            lambda: bare_loop(model, short, n, list(range(len(short)))),
            lambda: timed(model, short, n),
        ),
        f"shared vs separate prefill (1 prompt of {s['student_len']} x {G} generations)": side_by_side(
            args.reps,
            lambda: timed(model, short[:1] * G, n),
            lambda: timed(model, short[:1] * G, n, share=False),
        ),
        f"shared vs separate prefill (1 prompt of {long} x {G} generations)": side_by_side(
            args.reps,
            lambda: timed(model, [pairs[0].student_ids] * G, n),
            lambda: timed(model, [pairs[0].student_ids] * G, n, share=False),
        ),
    }
    model.eval()
    unfused = primitives_per_token(model, short[0])
    with rollout.fused_adapters(model):
        fused = primitives_per_token(model, short[0])
    model.train()
    record = {
        "bench": "mlx-sdft sampling",
        "quick": args.quick,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        **machine(),
        "completion": n,
        "cases": cases,
        "primitives_per_token": {"unfused": unfused, "fused": fused},
    }
    print(
        f"mlx {record['mlx']} on {record['device']}, {record['blas']}; {n} tokens per completion, LoRA rank "
        f"{s['lora_rank']} on every linear"
    )
    print(f"{'case':<62}{'median':>8}{'best':>8}   (slower / faster)")
    for name, c in cases.items():
        print(f"{name:<62}{c['ratio']:>8.3f}{c['ratio_best']:>8.3f}")
    print(
        f"operations per decoded token: {unfused} with LoRA adapters, {fused} fused ({fused / unfused:.2f}x)"
    )
    return emit(record, args.json)


if __name__ == "__main__":
    main()
