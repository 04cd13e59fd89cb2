"""The teacher check: SDFT only helps when the model, shown the demonstration, is clearly better
than without it (the paper: 42% → 100% on ToolAlpaca at 7B; at 3B SDFT lost to SFT).

It compares, on a sample of demonstrations, the mean per-token log-likelihood of the
demonstration under the teacher context (demonstration in the prompt) and the student context
(the bare prompt), and optionally a task metric of greedy answers under both contexts.
"""

from __future__ import annotations

import dataclasses

import mlx.core as mx

from mlx_sdft.core.losses import log_softmax
from mlx_sdft.core.prompts import PromptPair
from mlx_sdft.core.scoring import completion_logits, completion_mask, pad_rows

# Heuristics, not from the paper. Without a metric: nats per token the teacher context must add
# (the project's calibration saw SmolLM2-135M move −3.5 → −1.9); with one: the score it must add.
STRONG_GAP, WEAK_GAP = 1.0, 0.1
STRONG_SCORE_GAP = 0.2


def demonstration_loglik(model, pairs: list[PromptPair], role: str, batch_size: int) -> list[float]:
    """Mean log-probability per demonstration token, after the student's or the teacher's prompt."""
    out = []
    for i in range(0, len(pairs), batch_size):
        batch = pairs[i:i + batch_size]
        prompts = [p.student_ids if role == "student" else p.teacher_ids for p in batch]
        targets = [p.demo_ids for p in batch]
        logprobs_BTV = log_softmax(completion_logits(model, prompts, targets))
        token_BT = mx.take_along_axis(logprobs_BTV, pad_rows(targets)[..., None], axis=-1).squeeze(-1)
        mask_BT = completion_mask([len(t) for t in targets])
        out += ((token_BT * mask_BT).sum(-1) / mask_BT.sum(-1)).tolist()
    return out


def verdict(student_ll: float, teacher_ll: float, student_score: float | None, teacher_score: float | None) -> str:
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
        return (f"WEAK: the demonstration in context helps, but not by much; SDFT may learn slowly, compare "
                f"with --method sft ({numbers}).")
    return (f"POOR: the model barely uses the demonstration in context; SDFT will teach little here. Use a "
            f"larger model, a different --teacher-template, or --method sft ({numbers}).")


def run_check(cfg, console=None) -> dict:
    from rich.console import Console

    from mlx_sdft.core.data import load_dataset, need_demonstrations
    from mlx_sdft.jobs.evaluate import evaluate_task
    from mlx_sdft.core.metrics import Metric, resolve_metric
    from mlx_sdft.formats.models import open_model, open_tokenizer
    from mlx_sdft.core.prompts import encode_examples, teacher_messages

    console = console or Console(stderr=True)
    metric: Metric | None = resolve_metric(cfg.metric, cfg.answer_regex) if cfg.metric else None
    examples = load_dataset(cfg.data)["train"][: cfg.num_examples]
    need_demonstrations(examples, "check")
    model_path, tokenizer = open_tokenizer(cfg.model, chat_template=cfg.chat_template)
    pairs = encode_examples(tokenizer, examples, cfg.teacher_template, cfg.max_seq_length)
    model, _ = open_model(model_path)
    with console.status(f"scoring {len(pairs)} demonstrations under both contexts"):
        student = demonstration_loglik(model, pairs, "student", cfg.batch_size)
        teacher = demonstration_loglik(model, pairs, "teacher", cfg.batch_size)
        report = {"examples": len(pairs), "student_loglik": sum(student) / len(student),
                  "teacher_loglik": sum(teacher) / len(teacher),
                  "improved_fraction": sum(t > s for s, t in zip(student, teacher)) / len(pairs)}
        if metric is not None:
            report["student_score"] = evaluate_task(model, tokenizer, examples, metric, cfg.max_tokens, cfg.batch_size).score
            shown = [dataclasses.replace(ex, prompt=teacher_messages(ex, cfg.teacher_template)) for ex in examples]
            report["teacher_score"] = evaluate_task(model, tokenizer, shown, metric, cfg.max_tokens, cfg.batch_size).score
    report["verdict"] = verdict(report["student_loglik"], report["teacher_loglik"],
                                report.get("student_score"), report.get("teacher_score"))
    console.print({k: v for k, v in report.items() if k != "verdict"})
    return report
