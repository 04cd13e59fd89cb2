"""The teacher check: SDFT only helps when the model, shown the demonstration, is clearly better
than without it (the paper: 42% → 100% on ToolAlpaca at 7B; at 3B SDFT lost to SFT).

It compares, on a sample of demonstrations, the mean per-token log-likelihood of the
demonstration under the teacher context (demonstration in the prompt) and the student context
(the bare prompt), and optionally a task metric of greedy answers under both contexts. Then it
samples the student's own completions for the first --num-samples prompts (temperature 1, each
within the completion budget training would give it) and scores them under the teacher, as SDFT's
first step would: the mean per-token KL(teacher‖student), the fraction of tokens where the
teacher's most likely token is not the one sampled, the degenerate rate, and the fraction that
hit their budget (masked in training under --truncated mask). `recommend` turns all of it into
pure SDFT, SDFT with the defaults (the SFT term and the guards), or SFT, with the reason;
`small_model_note` says when the model is below the size where our own measurement saw both
methods lose much of what the base model knew. The numbers are measure/teacher.py's and
measure/task.py's; this module turns them into the verdict, the recommendation and the report.
"""

from __future__ import annotations

import dataclasses

from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from mlx_sdft.config import COMPLETION_BUDGET, SFT_WEIGHT, TRUNCATED
from mlx_sdft.core.guards import shared_prefix, skipped_prefix_warning
from mlx_sdft.measure.task import evaluate_task, predict
from mlx_sdft.measure.teacher import context_gain, score_samples

# Heuristics, not from the paper. Without a metric: nats per token the teacher context must add
# (the project's calibration saw SmolLM2-135M move −3.5 → −1.9); with one: the score it must add.
STRONG_GAP, WEAK_GAP = 1.0, 0.1
STRONG_SCORE_GAP = 0.2
# Heuristics for the recommendation: degenerate samples before any training, and the fraction
# of sampled tokens the teacher would not have chosen.
HIGH_DEGENERATE, SOME_DEGENERATE, HIGH_DISAGREEMENT = 0.5, 0.2, 0.5
# Below ~1.5B parameters the literature on on-policy distillation reports a weak self-teacher; at
# 135M recipes/retention-small measured both methods losing much of the prior task (its README, v2;
# tests/jobs/test_evaluate.py checks these numbers against its results/summary.json; docs/method.md).
SMALL_MODEL = 1.5e9
SMALL_MODEL_NOTE = (
    "a small model ({size} parameters, below {limit}): in this project's measurement at 135M "
    "(recipes/retention-small) both methods lost much of what the base model knew, prior-task score "
    "0.62 for SDFT vs 0.60 for SFT (base 0.99) at the learning rate each chose on validation, and at "
    "4x that rate SDFT forgot more than SFT (0.55 vs 0.67); train both (--method sft) and compare them "
    "on questions the base model answers (mlx-sdft eval --data PRIOR_TASK --adapter-path A)"
)


def recommend(report: dict) -> str:
    """Pure SDFT (--sft-weight 0), SDFT with the defaults (the SFT term and the guards), or SFT, and
    why (thresholds: the constants above; ours, not the paper's)."""
    strength = report["verdict"].split(":")[0]
    degenerate, disagreement = report["sample_degenerate"], report["teacher_disagreement"]
    numbers = (
        f"teacher context {strength}; {degenerate:.0%} of the student's samples degenerate; the teacher "
        f"would pick another token at {disagreement:.0%} of the sampled ones (KL {report['sample_kl']:.2f}/token)"
    )
    if strength == "POOR" or degenerate >= HIGH_DEGENERATE:
        why = (
            "the teacher adds little"
            if strength == "POOR"
            else "the student's own samples already collapse"
        )
        return f"recommend SFT (--method sft): {why} ({numbers})."
    if strength == "WEAK" or degenerate >= SOME_DEGENERATE or disagreement >= HIGH_DISAGREEMENT:
        return (
            f"recommend SDFT with the defaults (--sft-weight {SFT_WEIGHT:g}, --completion-budget "
            f"{COMPLETION_BUDGET:g}, --truncated {TRUNCATED}): the self-teacher alone is a weak or far-off "
            f"signal here ({numbers})."
        )
    return (
        f"recommend pure SDFT (--sft-weight 0): the teacher uses the demonstration and the student's samples "
        f"are sound ({numbers})."
    )


def small_model_note(parameters: int | None) -> str | None:
    """SMALL_MODEL_NOTE for a model below SMALL_MODEL parameters; None above it or when unknown."""
    if parameters is None or parameters >= SMALL_MODEL:
        return None
    size = (
        f"{parameters / 1e9:.1f}B"
        if parameters >= 1e9
        else f"{parameters / 1e6:.0f}M"
        if parameters >= 1e6
        else f"{parameters / 1e3:.0f}K"
    )
    return SMALL_MODEL_NOTE.format(size=size, limit=f"{SMALL_MODEL / 1e9:g}B")


def verdict(
    student_ll: float, teacher_ll: float, student_score: float | None, teacher_score: float | None
) -> str:
    gap = teacher_ll - student_ll
    numbers = f"demonstration log-likelihood {student_ll:.2f} → {teacher_ll:.2f} nats/token with it in context (gap {gap:+.2f})"
    if student_score is not None:
        numbers += f"; task score {student_score:.2f} → {teacher_score:.2f}"
    if student_score is not None:  # a task score says more than likelihoods
        strong = teacher_score - student_score >= STRONG_SCORE_GAP
        weak = gap >= WEAK_GAP or teacher_score > student_score
    else:
        strong, weak = gap >= STRONG_GAP, gap >= WEAK_GAP
    if strong:
        return f"GOOD: the model learns clearly from the demonstration in context; SDFT should help ({numbers})."
    if weak:
        return (
            f"WEAK: the demonstration in context helps, but not by much; SDFT may learn slowly, compare "
            f"with --method sft ({numbers})."
        )
    return (
        f"POOR: the model barely uses the demonstration in context; SDFT will teach little here. Use a "
        f"larger model, a different --teacher-template, or --method sft ({numbers})."
    )


SHOWN = 2  # example answers printed with and without the demonstration in context


def run_check(cfg, console=None) -> dict:
    from mlx_sdft.core.data import load_dataset, need_demonstrations
    from mlx_sdft.core.metrics import Metric, resolve_metric
    from mlx_sdft.core.prompts import apply_system_prompt, encode_examples, teacher_messages
    from mlx_sdft.atomic import write_json
    from mlx_sdft.machine.memory import base_parameters, model_config
    from mlx_sdft.machine.report import make_console
    from mlx_sdft.opening import open_model_for, open_tokenizer_for

    console = console or make_console()
    metric: Metric | None = resolve_metric(cfg.metric, cfg.answer_regex) if cfg.metric else None
    examples = apply_system_prompt(
        load_dataset(cfg.data)["train"][: cfg.num_examples], cfg.system_prompt
    )
    need_demonstrations(examples, "check")
    model_path, tokenizer = opened = open_tokenizer_for(cfg)
    pairs = encode_examples(tokenizer, examples, cfg.teacher_template, cfg.max_seq_length)
    model, _, _ = open_model_for(cfg, console=console, note=True, opened=opened)
    shown = [
        dataclasses.replace(ex, prompt=teacher_messages(ex, cfg.teacher_template))
        for ex in examples
    ]
    with console.status(f"scoring {len(pairs)} demonstrations under both contexts"):
        report = context_gain(model, pairs, cfg.batch_size)
        if metric is not None:
            without = evaluate_task(
                model, tokenizer, examples, metric, cfg.max_tokens, cfg.batch_size
            )
            with_demo = evaluate_task(
                model, tokenizer, shown, metric, cfg.max_tokens, cfg.batch_size
            )
            report["student_score"], report["teacher_score"] = without.score, with_demo.score
            answers = (
                [r["prediction"] for r in without.rows[:SHOWN]],
                [r["prediction"] for r in with_demo.rows[:SHOWN]],
            )
        else:
            answers = tuple(
                predict(
                    model,
                    tokenizer,
                    [ex.prompt for ex in some[:SHOWN]],
                    cfg.max_tokens,
                    cfg.batch_size,
                    [ex.tools for ex in some[:SHOWN]],
                )
                for some in (examples, shown)
            )
    report["verdict"] = verdict(
        report["student_loglik"],
        report["teacher_loglik"],
        report.get("student_score"),
        report.get("teacher_score"),
    )
    with console.status(
        f"sampling and scoring {min(cfg.num_samples, len(pairs))} student completions"
    ):
        scored = score_samples(model, tokenizer, pairs[: cfg.num_samples], cfg)
    completions = scored.pop("completions")
    report.update(scored)
    report["recommendation"] = recommend(report)
    if note := small_model_note(base_parameters(model_config(model_path))):
        report["small_model"] = note
    demos = [p.demo_ids for p in pairs]
    if warning := skipped_prefix_warning(demos, cfg.skip_first_tokens, tokenizer.decode):
        prefix = shared_prefix(demos, cfg.skip_first_tokens)[1]
        opens = sum(c[: len(prefix)] == prefix for c in completions) / max(len(completions), 1)
        report["warning"] = f"{warning}; {opens:.0%} of the student's samples open that way"
    report["answers"] = [
        {
            "where": ex.where,
            "prompt": ex.prompt[-1]["content"],
            "demonstration": ex.demonstration,
            "without_demonstration": a,
            "with_demonstration": b,
        }
        for ex, a, b in zip(examples, *answers)
    ]
    console.print(table(report))
    console.print(details(report))
    for row in report["answers"]:
        console.print(
            Panel(
                Text(
                    f"{row['prompt']}\n\nwithout the demonstration: {row['without_demonstration']}\n"
                    f"with the demonstration:    {row['with_demonstration']}"
                ),
                title=f"example {row['where'].rsplit('/', 1)[-1]}",
                expand=False,
            )
        )
    if path := cfg.output_file():
        write_json(path, {"model": cfg.model, "data": str(cfg.data), **report})
        console.print(f"wrote {path}", highlight=False, soft_wrap=True)
    return report


def table(report: dict) -> Table:
    """Student context (the bare prompt) against teacher context (the demonstration in the prompt)."""
    out = Table(
        title=f"{report['examples']} demonstrations; the context improves "
        f"{report['improved_fraction']:.0%} of them"
    )
    out.add_column("context")
    out.add_column("demonstration log-likelihood (nats/token)", justify="right")
    scored = "student_score" in report
    if scored:
        out.add_column("task score", justify="right")
    for name, role in (
        ("student: prompt only", "student"),
        ("teacher: prompt + demonstration", "teacher"),
    ):
        out.add_row(
            name,
            f"{report[f'{role}_loglik']:.3f}",
            *([f"{report[f'{role}_score']:.3f}"] if scored else []),
        )
    return out


CORE = {
    "examples",
    "student_loglik",
    "teacher_loglik",
    "improved_fraction",
    "student_score",
    "teacher_score",
}


def details(report: dict) -> Table:
    """The report's other numbers (the student's samples), one row each."""
    out = Table(title="the student's own samples", show_header=False)
    for key, value in report.items():
        if key not in CORE and isinstance(value, (int, float)) and not isinstance(value, bool):
            out.add_row(
                key.replace("_", " "), f"{value:.3f}" if isinstance(value, float) else str(value)
            )
    return out
