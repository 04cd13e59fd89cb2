"""Lesson fit: how close a version is to what each one-off lesson asks (nats per token, higher
is closer), the gate's measure of new and earlier lessons:

- a lesson with a demonstration (kind demonstration, import): the mean per-token log-likelihood
  of the demonstration after the bare prompt (the student's context), teacher.demonstration_loglik;
- a lesson with a teacher context instead (feedback, hindsight): the feedback fit, minus the mean
  per-token KL(teacher‖student) on a fresh sample of the student, the teacher being the same
  weights shown the feedback.

The same fit on a lesson's held-out paraphrases (its prompt reworded by the model, never trained
on) says whether what it taught reaches other wordings of the prompt (`held_out_fit`).
"""

from __future__ import annotations

from mlx_sdft.core.losses import kl_of_logits
from mlx_sdft.core.prompts import encode_examples
from mlx_sdft.core.rollout import sample
from mlx_sdft.core.scoring import completion_logits, completion_mask
from mlx_sdft.measure.teacher import demonstration_loglik
from mlx_sdft.store.lessons import paraphrased, to_example


def feedback_fit(
    model, pairs, stops: list[int], max_tokens: int, temperature: float, seed: int
) -> list[float]:
    """−mean per-token KL(teacher‖student) on one fresh student sample per prompt (seed + i)."""
    out = []
    for i, pair in enumerate(pairs):  # one at a time: teacher prompts differ in length
        rollout = sample(
            model,
            [pair.student_ids],
            [max_tokens],
            stops,
            temperature=temperature,
            batch_size=1,
            seeds=[seed + i],
        )
        completion = rollout.completions[0]
        student_BTV = completion_logits(model, [pair.student_ids], [completion]) / temperature
        teacher_BTV = completion_logits(model, [pair.teacher_ids], [completion]) / temperature
        mask_BT = completion_mask([len(completion)])
        kl_BT = kl_of_logits(teacher_BTV, student_BTV)[0]
        out.append(-((kl_BT * mask_BT).sum() / mask_BT.sum()).item())
    return out


def lesson_fit(model, tokenizer, rows: list[dict], cfg) -> dict[int, float]:
    """Lesson id → fit (module docstring) under the model's present leaves; `cfg`: the learn
    options (--teacher-template, --max-seq-length, --gate-batch-size, --gate-max-tokens, --seed)."""
    return dict(
        zip(
            [r["id"] for r in rows],
            example_fit(model, tokenizer, [to_example(r) for r in rows], cfg),
        )
    )


def held_out_fit(model, tokenizer, rows: list[dict], cfg) -> dict[int, list[float]]:
    """Lesson id → the fit on each of its held-out paraphrases (of the first --lesson-paraphrases
    stored), for the lessons that have any."""
    held = {r["id"]: paraphrased(r, cfg.lesson_paraphrases)[1] for r in rows}
    examples = [ex for part in held.values() for ex in part]
    fits, out = iter(example_fit(model, tokenizer, examples, cfg)), {}
    for id, part in held.items():
        if part:
            out[id] = [next(fits) for _ in part]
    return out


def example_fit(model, tokenizer, examples: list, cfg) -> list[float]:
    """The fit of each example, as `lesson_fit` measures a lesson's."""
    pairs = encode_examples(tokenizer, examples, cfg.teacher_template, cfg.max_seq_length)
    demo = [i for i, ex in enumerate(examples) if ex.demonstration]
    context = [i for i, ex in enumerate(examples) if not ex.demonstration]
    fits = [0.0] * len(examples)
    if demo:
        values = demonstration_loglik(
            model, [pairs[i] for i in demo], "student", cfg.gate_batch_size
        )
        for i, v in zip(demo, values):
            fits[i] = v
    if context:
        values = feedback_fit(
            model,
            [pairs[i] for i in context],
            sorted(tokenizer.eos_token_ids),
            cfg.gate_max_tokens,
            1.0,
            cfg.seed,
        )
        for i, v in zip(context, values):
            fits[i] = v
    return fits
